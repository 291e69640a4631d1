"""URLs in messages and logs: credentials never shown."""

from __future__ import annotations

from urllib.parse import urlsplit


def masked(url: str) -> str:
    """``url`` with its user and password (a Redis password, a camera's login) as ``***``."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    netloc = f"***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()
