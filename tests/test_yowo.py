"""YOWOv3 pre/post-processing against hand-computed values."""

import numpy as np
import pytest

import cv2

from zroact_tasks.stage1.yowo import anchors_for, model_frame, postprocess, preprocess_clip


def test_preprocess_layout_colour_order_and_normalisation():
    frames = [np.full((32, 40, 3), (0, 0, 255), np.uint8) for _ in range(15)]  # BGR red
    frames.append(np.full((32, 40, 3), (255, 0, 0), np.uint8))  # the keyframe is blue
    clip = preprocess_clip(frames, 32, 40)
    assert clip.shape == (3, 16, 32, 40) and clip.dtype == np.float32
    red_r = (1.0 - 0.485) / 0.229
    assert clip[0, 0].mean() == pytest.approx(red_r, rel=1e-5)  # channel 0 is R
    assert clip[2, 0].mean() == pytest.approx((0 - 0.406) / 0.225, rel=1e-5)
    assert clip[2, 15].mean() == pytest.approx((1.0 - 0.406) / 0.225, rel=1e-5)  # keyframe last


def test_preprocess_refuses_frames_not_at_the_model_size():
    """Frames are resized once, at ingest, as YOWOv3 does; a frame of another size here means
    it was stored for another model, and resizing it again would not be YOWOv3's input."""
    with pytest.raises(ValueError, match="frame is 64x48, the model takes 40x32"):
        preprocess_clip([np.zeros((48, 64, 3), np.uint8)] * 16, 32, 40)


def test_model_frame_is_pillows_bicubic_and_keeps_channel_order():
    from PIL import Image

    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (90, 160, 3), dtype=np.uint8)  # BGR
    ours = model_frame(frame, 56, 40)
    rgb = Image.fromarray(np.ascontiguousarray(frame[..., ::-1])).resize((56, 40))  # default filter
    assert np.array_equal(ours[..., ::-1], np.asarray(rgb))
    assert not np.array_equal(ours, cv2.resize(frame, (56, 40), interpolation=cv2.INTER_LINEAR))


def _output(boxes, scores):
    """[4+C, A] from per-anchor (cx, cy, w, h) and per-anchor class scores."""
    return np.concatenate([np.array(boxes, np.float32).T, np.array(scores, np.float32).T])


def test_postprocess_maps_boxes_thresholds_and_nms_per_class():
    out = _output(
        boxes=[(112, 112, 56, 56), (114, 112, 56, 56), (112, 112, 56, 56), (220, 220, 20, 20)],
        scores=[(0.9, 0.0), (0.8, 0.0), (0.0, 0.7), (0.2, 0.31)],
    )
    dets = postprocess(out, frame_size=(448, 224), input_size=(224, 224), score_threshold=0.3,
                       nms_iou=0.5, max_detections=10, labels=["a", "b"])
    assert [(d.class_id, round(d.score, 2)) for d in dets] == [(0, 0.9), (1, 0.7), (1, 0.31)]
    assert dets[0].box == pytest.approx((168.0, 84.0, 280.0, 140.0))  # x scaled by 2
    assert dets[0].label == "a"
    assert dets[2].box == pytest.approx((420.0, 210.0, 448.0, 224.0))  # clipped to the frame


def test_nms_runs_on_unclipped_boxes_as_yowov3_does():
    """Two boxes reaching out of the frame on the left: unclipped they barely overlap (IoU 0.14,
    both kept, as YOWOv3 keeps them); clipped to the frame first they would be the same box."""
    out = _output(boxes=[(-45, 112, 110, 56), (2.5, 112, 15, 56)], scores=[(0.9,), (0.8,)])
    dets = postprocess(out, frame_size=(224, 224), input_size=(224, 224), score_threshold=0.3,
                       nms_iou=0.5, max_detections=10, labels=None)
    assert [round(d.score, 2) for d in dets] == [0.9, 0.8]
    assert [d.box for d in dets] == [pytest.approx((0, 84, 10, 140)), pytest.approx((0, 84, 10, 140))]


def test_postprocess_max_detections_and_no_labels():
    boxes = [(10 + 30 * i, 20, 10, 10) for i in range(6)]
    scores = [(0.4 + 0.1 * i,) for i in range(6)]
    dets = postprocess(_output(boxes, scores), frame_size=(224, 224), input_size=(224, 224),
                       score_threshold=0.3, nms_iou=0.5, max_detections=2, labels=None)
    assert [round(d.score, 2) for d in dets] == [0.9, 0.8]
    assert all(d.label is None for d in dets)


def test_anchor_count_of_yowov3_at_224():
    assert anchors_for(224, 224) == 1029
