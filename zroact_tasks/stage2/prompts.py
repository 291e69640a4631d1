"""The text of a Stage 2 request: the user's prompt plus the slot's Stage 1 detections."""

from __future__ import annotations

from ..models import Detection

ANSWER_FORMAT = (
    "Answer with JSON only: action (a few words, \"none\" if nothing happens), confirmed "
    "(true if the detector's top detection is really happening), confidence (0 to 1), reason "
    "(one or two sentences)."
)


def describe_detections(frame: int, time_s: float, detections: list[Detection], top: int = 5) -> str:
    if not detections:
        return f"- image for frame {frame} (t={time_s:.2f}s): no detections"
    parts = [
        f"{d.label or f'class {d.class_id}'} {d.score:.2f} at "
        f"[{d.box[0]:.0f},{d.box[1]:.0f},{d.box[2]:.0f},{d.box[3]:.0f}]"
        for d in sorted(detections, key=lambda d: -d.score)[:top]
    ]
    return f"- image for frame {frame} (t={time_s:.2f}s): " + "; ".join(parts)


def slot_text(prompt: str, keyframes: list[int], fps: float,
              detections: dict[int, list[Detection]]) -> str:
    lines = [prompt.strip(), "", "The images are in time order. Action detector output:"]
    lines += [describe_detections(kf, kf / fps, detections.get(kf, [])) for kf in keyframes]
    return "\n".join(lines + ["", ANSWER_FORMAT])
