"""A live RTSP camera for tests: GStreamer's RTSP server (Debian's gir1.2-gst-rtsp-server-1.0,
run by the system ``python3``, which has ``gi``), serving a live 30 fps test picture as RTP/JPEG.

    /usr/bin/python3 -m zroact_tasks.testing.rtsp_server PORT   # rtsp://127.0.0.1:PORT/cam

It prints "ready" once it listens and serves until killed. Each client gets the live picture
(``is-live``), as from an IP camera.
"""

from __future__ import annotations

import sys

PIPELINE = ("( videotestsrc is-live=true pattern=ball ! video/x-raw,format=I420,width=320,height=240,"
            "framerate=30/1 ! jpegenc quality=90 ! rtpjpegpay name=pay0 pt=26 )")


def main(argv: list[str]) -> int:
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(argv[0])
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(PIPELINE)
    factory.set_shared(True)  # one live picture for every client
    server.get_mount_points().add_factory("/cam", factory)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{argv[0]}", file=sys.stderr)
        return 1
    print("ready", flush=True)
    GLib.MainLoop().run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
