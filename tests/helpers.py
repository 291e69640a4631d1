"""Small helpers shared by tests: reading frames back from a video, image comparison."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import cv2
import jsonschema
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def read_frames(video: Path, indices: set[int]) -> dict[int, np.ndarray]:
    cap = cv2.VideoCapture(str(video))
    frames, i = {}, 0
    while len(frames) < len(indices):
        ok, frame = cap.read()
        if not ok:
            break
        if i in indices:
            frames[i] = frame
        i += 1
    cap.release()
    return frames


def decode_data_url(url: str) -> np.ndarray:
    header, data = url.split(",", 1)
    assert header == "data:image/jpeg;base64"
    return cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def validate_report(data: dict) -> None:
    schema = json.loads((ROOT / "docs" / "report.schema.json").read_text())
    jsonschema.validate(data, schema)


def wait_for_success(recorder, task_id: str, timeout: float = 60) -> None:
    """Until the recorder has seen ``task_id`` succeed (a task-succeeded event)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with recorder.log.lock:
            task = recorder.log.tasks.get(task_id)
            if task is not None and task.succeeded:
                return
        time.sleep(0.05)
    raise AssertionError(f"{task_id} did not succeed within {timeout:g} s")


def assert_revoked_after(recorder, job_id: str, returned_at: float) -> int:
    """The job's tasks after ``job.cancel()`` returned: pending ones were revoked (a task-revoked
    event, never a start), none started later. Bookkeeping that ends the job may still run:
    finalize (the cancel sends it) and slot_failed (the errback of a chord whose header was
    revoked). Returns how many Stage 2 runs of the job started before the cancel returned."""
    time.sleep(2.0)  # anything left pending is delivered now: discarded, or (a bug) run
    ending = (f"{job_id}:finalize", f"{job_id}:slotfail:")
    with recorder.log.lock:
        tasks = [t for t in recorder.log.tasks.values()
                 if t.id.startswith(job_id) and not t.id.startswith(ending)]
    revoked = [t.id for t in tasks if t.revoked]
    assert revoked, ("no pending task of the job was revoked", [(t.id, t.starts, t.succeeded) for t in tasks])
    assert [t.id for t in tasks if t.revoked and t.starts] == []
    # (a start in the ~ms between the cancel flag and the revoke broadcast is allowed for)
    late = [(t.id, [round(s - returned_at, 3) for s in t.start_times], t.start_hosts)
            for t in tasks if any(s > returned_at + 0.2 for s in t.start_times)]
    assert late == [], late
    # A judge that passed its cancel check before the cancel still asks the VLM (its next step);
    # one that starts later cannot. The bound for the job's VLM requests:
    return sum(1 for t in tasks if ":s2:" in t.id for s in t.start_times if s <= returned_at)


def text_match(img: np.ndarray, text: str, scale: float = 0.45) -> tuple[float, tuple[int, int]]:
    """How well ``text`` (OpenCV's Hershey simplex at ``scale``, as render.py draws it) matches
    somewhere in ``img``, and where (x, y of the top-left corner): the best normalised
    correlation, 1.0 for the same pixels. No OCR: the text is drawn light on dark, then searched
    for by template matching. Another slot's verdict (same words, other digits) scores < 0.8."""
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    template = np.full((h + base + 4, w + 4), 30, np.uint8)
    cv2.putText(template, text, (2, h + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, 240, 1, cv2.LINE_AA)
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if img.ndim == 3 else img
    if gray.shape[0] < template.shape[0] or gray.shape[1] < template.shape[1]:
        return 0.0, (-1, -1)
    _, best, _, at = cv2.minMaxLoc(cv2.matchTemplate(gray, template, cv2.TM_CCOEFF_NORMED))
    return float(best), (int(at[0]), int(at[1]))


def verdict_words(slot) -> list[str]:
    """The texts of a slot's verdict a picture of it must show."""
    v = slot.verdict
    return [v.reason, v.action, f"{v.confidence:.2f}", "confirmed" if v.confirmed else "not confirmed"]


def in_ci() -> bool:
    """CI sets CI=true (.ci/run): there, a test that cannot run its real part is a failure."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_unless_ci(reason: str) -> None:
    """Skip locally; fail in CI, where a skipped check would pass the run without checking."""
    if in_ci():
        pytest.fail(f"CI: {reason}", pytrace=False)
    pytest.skip(reason)
