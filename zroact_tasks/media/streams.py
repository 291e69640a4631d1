"""Live sources: which URLs a job may read, and opening them through FFmpeg.

A stream is named by its URL (``rtsp://``, ``rtsps://``, ``http(s)://`` MJPEG, MPEG-TS or an HLS
playlist). Only URLs under an operator's ``STREAM_SOURCES`` prefix are read, checked where the
URL is opened (the control workers), not only by clients. FFmpeg then may use only the network
protocols such sources need, with a read timeout so a silent source is noticed.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import cv2

from ..errors import StreamError, StreamNotAllowedError
from ..urls import masked

SCHEMES = ("rtsp", "rtsps", "http", "https")

NETWORK_PROTOCOLS = "rtsp,rtsps,rtp,srtp,udp,tcp,tls,http,https,httpproxy,crypto,hls"
"""What a live source may use inside FFmpeg (HLS segments come over http(s); never ``file``)."""

READ_TIMEOUT_S = 5.0
"""A source silent this long is a dropped connection (then reopened with backoff)."""


def is_stream(video: str) -> bool:
    """Whether ``video`` names a live source (a URL of one of ``SCHEMES``) rather than a file."""
    return urlsplit(str(video)).scheme.lower() in SCHEMES


def check_allowed(url: str, prefixes: list[str]) -> str:
    """``url`` if an allowed prefix covers it; StreamNotAllowedError otherwise (none allowed
    by default). Prefixes match whole URL text, so ``http://cam1/`` does not allow ``http://cam10``."""
    if not is_stream(url):
        raise StreamNotAllowedError(url, f"not a live source URL ({', '.join(SCHEMES)})")
    if not any(url.startswith(p) for p in prefixes):
        allowed = ", ".join(prefixes) if prefixes else "none"
        raise StreamNotAllowedError(
            masked(url), f"not under an allowed ZROACT_STREAM_SOURCES prefix (allowed: {allowed})")
    return url


def open_stream(url: str) -> cv2.VideoCapture:
    """A capture of the live source, or StreamError when it cannot be opened."""
    timeout_us = str(int(READ_TIMEOUT_S * 1e6))
    options = [f"protocol_whitelist;{NETWORK_PROTOCOLS}", f"rw_timeout;{timeout_us}"]
    if urlsplit(url).scheme.lower().startswith("rtsp"):
        options += ["rtsp_transport;tcp", f"timeout;{timeout_us}"]
    os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = "|".join(options)
    cap = cv2.VideoCapture(url, cv2.CAP_FFMPEG)
    if not cap.isOpened():
        cap.release()
        raise StreamError(masked(url), "cannot be opened as a video stream")
    return cap
