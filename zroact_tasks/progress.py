"""Follow a job while it runs: a live line on a terminal, plain lines otherwise."""

from __future__ import annotations

import time
from typing import TextIO

from .client import Job
from .models import FINAL_STATES, JobReport, JobStatus

POLL_S = 0.25
"""How often the display refreshes (a progress display; waiting itself uses pub/sub)."""


def _line(s: JobStatus) -> str:
    s1 = f"stage 1 {s.stage1_done}/{s.stage1_total or '?'} clips"
    s2 = f"stage 2 {s.stage2_done}/{s.stage2_total} slots"
    done = s.stage1_done + 3 * s.stage2_done  # a VLM request costs about 3 clips' worth of time
    total = s.stage1_total + 3 * s.stage2_total
    eta = ""
    if s.state not in FINAL_STATES and 0 < done < total:
        eta = f", ETA {s.elapsed_s * (total - done) / done:.0f} s"
    return f"{s.state:9} {s1}, {s2}, {s.elapsed_s:.1f} s{eta}"


def _bar(s: JobStatus, width: int = 24) -> str:
    total = s.stage1_total + 3 * s.stage2_total
    frac = (s.stage1_done + 3 * s.stage2_done) / total if total else 0.0
    filled = int(round(frac * width))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def follow(job: Job, stream: TextIO, timeout: float | None = None) -> JobReport:
    """Show progress until the job ends, then return its report."""
    tty = stream.isatty()
    last, started = "", time.monotonic()
    while True:
        status = job.status()
        line = _line(status)
        if tty:
            stream.write("\r\x1b[2K" + _bar(status) + " " + line)
            stream.flush()
        elif line.split(",")[:2] != last.split(",")[:2]:  # plain lines only when counts change
            stream.write(line + "\n")
            stream.flush()
        last = line
        if status.state in FINAL_STATES:
            if tty:
                stream.write("\n")
            return job.wait(timeout=30)
        if timeout is not None and time.monotonic() - started > timeout:
            return job.wait(timeout=0.001)  # raises JobTimeoutError
        time.sleep(POLL_S)
