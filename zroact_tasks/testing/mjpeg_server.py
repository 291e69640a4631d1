"""A live camera for tests: MJPEG over HTTP (``multipart/x-mixed-replace``), served in real time.

Each client gets the frames of "now": frame ``n`` is sent at ``start + n / fps`` (the sample
video's moving square, its index drawn in the corner), as an IP camera sends its live picture —
a client that connects late or reconnects gets the live frame, not the ones it missed. The
server records when each frame went out (``sent``), can drop every connection once at a
given moment (``drop_at_s``) and stops after ``duration_s`` (the stream's end).
"""

from __future__ import annotations

import http.server
import threading
import time

import cv2

from .sample_media import render_frame

BOUNDARY = "zroactframe"


class MjpegCamera:
    def __init__(self, *, fps: float = 30.0, duration_s: float = 60.0,
                 drop_at_s: float | None = None, width: int = 320, height: int = 240) -> None:
        self.fps, self.duration_s, self.drop_at_s = fps, duration_s, drop_at_s
        self.width, self.height = width, height
        self.sent: list[tuple[int, float]] = []
        """(frame number, time.time()) of every frame sent, in order, over all connections: a
        reader that takes every frame of one connection after the other reads them in this order."""
        self.connections = 0
        self.start = 0.0
        self._dropped = threading.Event()
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/live.mjpg"

    def start_serving(self) -> MjpegCamera:
        camera = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self) -> None:  # noqa: N802
                with camera._lock:
                    camera.connections += 1
                self.send_response(200)
                self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                try:
                    camera._stream(self.wfile)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.start = time.time()
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def frame_number(self, at: float) -> int:
        return int((at - self.start) * self.fps)

    def _stream(self, out) -> None:
        n = self.frame_number(time.time())
        while True:
            due = self.start + n / self.fps
            now = time.time()
            if due - self.start >= self.duration_s:
                return  # the stream's end
            if self.drop_at_s is not None and not self._dropped.is_set() and \
                    now - self.start >= self.drop_at_s:
                self._dropped.set()
                return  # the connection drops once, mid-stream
            if due > now:
                time.sleep(due - now)
            frame = render_frame(n, width=self.width, height=self.height)
            ok, jpeg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])
            data = jpeg.tobytes()
            out.write(f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(data)}"
                      f"\r\n\r\n".encode() + data + b"\r\n")
            out.flush()
            with self._lock:
                self.sent.append((n, time.time()))
            n = max(n + 1, self.frame_number(time.time()))  # a slow reader skips, as live does

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> MjpegCamera:
        return self.start_serving()

    def __exit__(self, *exc: object) -> None:
        self.stop()
