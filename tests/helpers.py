"""Small helpers shared by tests: reading frames back from a video, image comparison."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import cv2
import jsonschema
import numpy as np

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
