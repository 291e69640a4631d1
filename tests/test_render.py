"""Pictures of a report: the contact sheet and the annotated video show what the report says."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from zroact_tasks.render import PALETTE, annotate_video, contact_sheet


@pytest.fixture(scope="module")
def report(client, assets):
    return client.submit(assets["video"]).wait(timeout=180)


def test_contact_sheet_has_a_row_per_slot_with_the_boxes(report, assets, tmp_path):
    out = contact_sheet(assets["video"], report, tmp_path / "sheet.png", thumb_width=320, max_slots=5)
    sheet = cv2.imread(str(out))
    assert sheet is not None
    thumb_h = 240  # 320x240 frames at thumb width 320
    assert sheet.shape[0] == 40 + 5 * (thumb_h + 16)
    # Slot 0, first keyframe: the box outline of the top detection is drawn in class 0's colour.
    x1, y1, x2, y2 = (int(round(v)) for v in report.keyframes[0].detections[0].box)
    edge = sheet[40 + 8 + y2 - 1, 8 + (x1 + x2) // 2]
    assert np.abs(edge.astype(int) - np.array(PALETTE[0])).max() < 60


def test_annotated_video_keeps_every_frame_and_draws_boxes(report, assets, tmp_path):
    out = annotate_video(assets["video"], report, tmp_path / "a.mp4")
    cap = cv2.VideoCapture(str(out))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == report.video.frames
    kf = report.keyframes[5]
    x1, y1, x2, y2 = (int(round(v)) for v in kf.detections[0].box)
    edge = frames[kf.index][y2 - 1, (x1 + x2) // 2]
    assert np.abs(edge.astype(int) - np.array(PALETTE[0])).max() < 60
