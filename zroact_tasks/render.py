"""Pictures of a report: the video with boxes and verdicts drawn on it, and a contact sheet."""

from __future__ import annotations

import textwrap
from pathlib import Path

import cv2
import numpy as np

from .media.video import decode
from .models import JobReport, Keyframe, SlotResult

FONT = cv2.FONT_HERSHEY_SIMPLEX
PALETTE = [(60, 200, 255), (90, 220, 90), (255, 160, 60), (200, 110, 255), (80, 80, 255),
           (255, 230, 80)]  # BGR, one per class id
INK, PAPER = (245, 245, 245), (32, 32, 32)


def _text(img: np.ndarray, text: str, org: tuple[int, int], scale: float, colour=INK,
          bg=PAPER, thickness: int = 1) -> int:
    """Text on a solid box (readable on any frame); returns the box height."""
    (w, h), base = cv2.getTextSize(text, FONT, scale, thickness)
    x, y = org
    x = max(0, min(x, img.shape[1] - w - 6))  # keep labels inside the picture
    cv2.rectangle(img, (x, y - h - 4), (x + w + 6, y + base + 2), bg, cv2.FILLED)
    cv2.putText(img, text, (x + 3, y), FONT, scale, colour, thickness, cv2.LINE_AA)
    return h + base + 6


def draw_detections(img: np.ndarray, keyframe: Keyframe, scale: float = 1.0) -> None:
    font = max(0.35, 0.45 * scale)
    for d in keyframe.detections:
        colour = PALETTE[d.class_id % len(PALETTE)]
        x1, y1, x2, y2 = (int(round(v * scale)) for v in d.box)
        cv2.rectangle(img, (x1, y1), (x2, y2), colour, max(1, int(2 * scale)), cv2.LINE_AA)
        name = d.label or f"class {d.class_id}"
        _text(img, f"{name} {d.score:.2f}", (x1, max(14, y1 - 2)), font, colour=(20, 20, 20), bg=colour)


def _verdict_lines(slot: SlotResult, width_chars: int) -> list[str]:
    if slot.error:
        return textwrap.wrap(f"error: {slot.error}", width_chars)[:3]
    if slot.verdict is None:
        return ["no verdict (Stage 2 skipped)"]
    v = slot.verdict
    head = f"{v.action} | {'confirmed' if v.confirmed else 'not confirmed'} | {v.confidence:.2f}"
    return [head] + textwrap.wrap(v.reason, width_chars)[:2]


BROWSER_CODECS = {".webm": "VP80", ".mkv": "VP80"}
"""Codecs browsers play that opencv-python's FFmpeg (LGPL: no H.264 encoder) can write: VP8 in
WebM, and VP9 in MP4 for every other name (MPEG-4 Part 2, OpenCV's usual ``mp4v``, plays in no
browser). VP9 encodes ~4x slower than VP8 (14 vs 54 frames/s at 720p here), hence WebM's VP8."""


def browser_codec(out: Path) -> str:
    return BROWSER_CODECS.get(Path(out).suffix.lower(), "vp09")


def annotate_video(video: Path, report: JobReport, out: Path) -> Path:
    """Write ``video`` with each keyframe's boxes (held until the next keyframe) and the verdict
    of the slot the frame belongs to."""
    info = report.video
    if info is None:
        raise ValueError("the report has no video information (the job failed at ingest)")
    keyframes = {k.index: k for k in report.keyframes}
    slot_of = {kf: s for s in report.slots for kf in s.keyframes}
    slot_start = {s.keyframes[0]: s for s in report.slots}
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*browser_codec(out)), info.fps,
                             (info.width, info.height))
    if not writer.isOpened():
        raise OSError(f"cannot write {out}: OpenCV's FFmpeg has no {browser_codec(out)} encoder "
                      "for it (use .mp4 or .webm)")
    current: Keyframe | None = None
    slot: SlotResult | None = None
    try:
        for index, frame in decode(Path(video), max_frames=info.frames):
            current = keyframes.get(index, current)
            if index in slot_start:
                slot = slot_start[index]
            elif current is not None and current.index not in slot_of:
                slot = None  # past the last full slot: Stage 1 only
            if current is not None:
                draw_detections(frame, current)
            held = f"  boxes of #{current.index}" if current is not None else ""
            _text(frame, f"frame {index}  t={index / info.fps:.2f}s{held}", (4, 18), 0.45)
            if slot is not None:  # the verdict at the bottom, clear of most boxes
                lines = _verdict_lines(slot, max(20, info.width // 9))
                y = info.height - 8 - 20 * (len(lines) - 1)
                for line in lines:
                    y += _text(frame, line, (4, y), 0.45) - 2
            writer.write(frame)
    finally:
        writer.release()
    return out


def contact_sheet(video: Path, report: JobReport, out: Path, *, thumb_width: int = 320,
                  max_slots: int = 24) -> Path:
    """One PNG: a row per slot, its three keyframes with their detections, and its verdict."""
    info = report.video
    if info is None:
        raise ValueError("the report has no video information (the job failed at ingest)")
    slots = report.slots[:max_slots]
    wanted = {kf for s in slots for kf in s.keyframes}
    frames = {}
    for index, frame in decode(Path(video), max_frames=info.frames):
        if index in wanted:
            frames[index] = frame
        if len(frames) == len(wanted):
            break
    scale = thumb_width / info.width
    th = int(round(info.height * scale))
    text_w, pad = 420, 8
    row_h = th + 2 * pad
    width = pad + 3 * (thumb_width + pad) + text_w
    header = 40
    sheet = np.full((header + row_h * max(1, len(slots)), width, 3), 24, np.uint8)
    title = (f"job {report.job_id[:12]}  {report.status}  {info.frames} frames "
             f"{info.width}x{info.height} @ {info.fps:g} fps  stage 2: {report.stage2.status}"
             + (f" ({report.stage2.model})" if report.stage2.model else ""))
    cv2.putText(sheet, title, (pad, 26), FONT, 0.55, INK, 1, cv2.LINE_AA)
    keyframes = {k.index: k for k in report.keyframes}
    for row, slot in enumerate(slots):
        y0 = header + row * row_h + pad
        for col, kf in enumerate(slot.keyframes):
            thumb = cv2.resize(frames[kf], (thumb_width, th), interpolation=cv2.INTER_AREA)
            draw_detections(thumb, keyframes[kf], scale)
            _text(thumb, f"#{kf}  {kf / info.fps:.2f}s", (2, th - 6), 0.4)
            x0 = pad + col * (thumb_width + pad)
            sheet[y0:y0 + th, x0:x0 + thumb_width] = thumb
        tx = pad + 3 * (thumb_width + pad)
        cv2.putText(sheet, f"slot {slot.slot}", (tx, y0 + 18), FONT, 0.55, INK, 1, cv2.LINE_AA)
        colour = (120, 120, 255) if slot.error else (150, 230, 150)
        for i, line in enumerate(_verdict_lines(slot, 46)):
            cv2.putText(sheet, line, (tx, y0 + 42 + 20 * i), FONT, 0.45,
                        colour if i == 0 else INK, 1, cv2.LINE_AA)
    cv2.imwrite(str(out), sheet)
    return out
