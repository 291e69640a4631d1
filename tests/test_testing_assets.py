"""Tests for the synthetic test assets: YOWOv3-layout ONNX models and sample media."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from zroact_tasks.testing import sample_media
from zroact_tasks.testing.onnx_models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    make_bad_models,
    make_yowo_model,
    num_anchors,
    write_labels,
)
from zroact_tasks.testing.sample_media import (
    VideoVerificationError,
    count_frames,
    make_bad_videos,
    make_sample,
    make_video,
    render_frame,
    square_bbox,
    square_box_in_input,
    square_position,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = 224
A = 1029
W, H, SIDE, N_FRAMES = 320, 240, 40, 419
KEYFRAMES = (15, 100, 250, 418)
BOX_TOL = 3.0


# ---------------------------------------------------------------------------------------------
# reference preprocessing (independent of the production code, follows the Stage 1 contract)


def preprocess_clip(
    frames_bgr: list[np.ndarray], size: int = SIZE, *, to_rgb: bool = True, normalise: bool = True
) -> np.ndarray:
    """16 BGR uint8 frames (keyframe LAST) -> float32 [3, 16, size, size]."""
    assert len(frames_bgr) == 16
    mean = np.asarray(IMAGENET_MEAN, np.float32)
    std = np.asarray(IMAGENET_STD, np.float32)
    out = []
    for f in frames_bgr:
        img = cv2.cvtColor(f, cv2.COLOR_BGR2RGB) if to_rgb else f
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
        if normalise:
            img = (img - mean) / std
        out.append(img)
    return np.ascontiguousarray(np.stack(out).transpose(3, 0, 1, 2), dtype=np.float32)


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    return sess.run(["output"], {"input": batch})[0]


def assert_box(actual: np.ndarray, expected, tol: float = BOX_TOL) -> None:
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), atol=tol)


def iou_cxcywh(a, b) -> float:
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict[str, Path]:
    return make_sample(tmp_path_factory.mktemp("sample"))


@pytest.fixture(scope="module")
def frames(sample) -> dict[int, np.ndarray]:
    """Decoded BGR frames of sample.mp4 needed for the clips of KEYFRAMES (index -> frame)."""
    wanted = {i for k in KEYFRAMES for i in range(k - 15, k + 1)}
    cap = cv2.VideoCapture(str(sample["video"]))
    assert cap.isOpened()
    out: dict[int, np.ndarray] = {}
    i = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if i in wanted:
            out[i] = frame
        i += 1
    cap.release()
    assert i == N_FRAMES
    return out


@pytest.fixture(scope="module")
def model(sample) -> ort.InferenceSession:
    return session(sample["model"])


def clips(frames, *, reverse: bool = False, **kw) -> np.ndarray:
    batch = []
    for k in KEYFRAMES:
        seq = [frames[i] for i in range(k - 15, k + 1)]
        if reverse:
            seq = seq[::-1]
        batch.append(preprocess_clip(seq, **kw))
    return np.stack(batch)


# ---------------------------------------------------------------------------------------------
# model: layout


def test_num_anchors():
    assert num_anchors(224) == A
    assert num_anchors(224, 224) == A
    assert num_anchors(320) == 40 * 40 + 20 * 20 + 10 * 10
    assert num_anchors(256, 320) == 32 * 40 + 16 * 20 + 8 * 10


def test_model_declared_io(sample, model):
    (inp,) = model.get_inputs()
    (out,) = model.get_outputs()
    assert inp.name == "input" and inp.type == "tensor(float)"
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 16, SIZE, SIZE]
    assert out.name == "output" and out.type == "tensor(float)"
    assert isinstance(out.shape[0], str) and out.shape[1:] == [7, A]
    assert sample["model"].stat().st_size < 1_000_000


def test_dynamic_batch_and_shapes(model):
    for b in (1, 4):
        y = run(model, np.zeros((b, 3, 16, SIZE, SIZE), np.float32))
        assert y.shape == (b, 7, A) and y.dtype == np.float32


def test_fixed_batch_rejects_other_batch(tmp_path):
    sess = session(make_yowo_model(tmp_path / "b1.onnx", batch=1))
    assert sess.get_inputs()[0].shape == [1, 3, 16, SIZE, SIZE]
    assert sess.get_outputs()[0].shape == [1, 7, A]
    assert run(sess, np.zeros((1, 3, 16, SIZE, SIZE), np.float32)).shape == (1, 7, A)
    with pytest.raises(Exception, match="(?i)dimension|shape|invalid"):
        run(sess, np.zeros((2, 3, 16, SIZE, SIZE), np.float32))


def test_generation_is_small_and_fast(tmp_path):
    t0 = time.perf_counter()
    p = make_yowo_model(tmp_path / "m.onnx")
    assert time.perf_counter() - t0 < 1.0
    assert p.stat().st_size < 1_000_000


def test_other_sizes_and_class_counts(tmp_path):
    sess = session(make_yowo_model(tmp_path / "m.onnx", num_classes=5, size=(256, 320)))
    assert sess.get_inputs()[0].shape[1:] == [3, 16, 256, 320]
    rgb = np.full((1, 3, 16, 256, 320), 0.1, np.float32)
    rgb[0, :, 15, 40:60, 200:250] = np.array([0, 1, 0], np.float32).reshape(3, 1, 1)  # green
    mean = np.asarray(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1, 1)
    std = np.asarray(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1, 1)
    y = run(sess, (rgb - mean) / std)
    assert y.shape == (1, 9, num_anchors(256, 320))
    assert_box(y[0, :4, 1], (225, 50, 50, 20), tol=1e-4)
    assert y[0, 5, 1] == pytest.approx(1.0, abs=1e-5)
    y_wo = y.copy()
    y_wo[0, 5, 1] = 0
    y_wo[0, :4, 1] = 0
    assert np.all(y_wo == 0)  # everything else (incl. extra classes 3, 4) is zero
    with pytest.raises(ValueError):
        make_yowo_model(tmp_path / "bad.onnx", size=225)


@pytest.mark.parametrize("opset", [13, 18, 21])
def test_opsets_agree(tmp_path, opset):
    rng = np.random.default_rng(0)
    rgb = rng.uniform(0, 0.3, (2, 3, 16, 64, 64)).astype(np.float32)
    rgb[0, :, 15, 5:20, 30:60] = np.array([0.9, 0.1, 0.2], np.float32).reshape(3, 1, 1)
    rgb[1, :, 0, 40:64, 0:8] = np.array([0.95, 0.0, 0.0], np.float32).reshape(3, 1, 1)
    rgb[1, :, 15, 0:3, 0:3] = np.array([0.0, 0.0, 0.8], np.float32).reshape(3, 1, 1)
    mean = np.asarray(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1, 1)
    std = np.asarray(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1, 1)
    x = ((rgb - mean) / std).astype(np.float32)
    ref = run(session(make_yowo_model(tmp_path / "ref.onnx", size=64)), x)
    got = run(session(make_yowo_model(tmp_path / f"o{opset}.onnx", size=64, opset=opset)), x)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert_box(ref[0, :4, 0], (45, 12.5, 30, 15), tol=1e-4)
    assert ref[0, 4, 0] == pytest.approx(0.9, abs=1e-4)
    assert_box(ref[1, :4, 3], (4, 52, 8, 24), tol=1e-4)  # first-frame red
    assert ref[1, 4, 3] == pytest.approx(0.95 * 0.5, abs=1e-4)
    assert_box(ref[1, :4, 2], (1.5, 1.5, 3, 3), tol=1e-4)  # blue keyframe
    assert ref[1, 6, 2] == pytest.approx(0.8, abs=1e-4)
    assert np.all(ref[1, :, 0] == 0) and np.all(ref[1, :, 4] == 0)  # empty red mask -> zeros


# ---------------------------------------------------------------------------------------------
# model + sample video: pre-processing bugs must be visible


def test_correct_preprocessing_detects_square(model, frames):
    y = run(model, clips(frames))
    assert y.shape == (len(KEYFRAMES), 7, A)
    for b, k in enumerate(KEYFRAMES):
        box0 = y[b, :4, 0]
        assert_box(box0, square_box_in_input(k))
        assert y[b, 4, 0] > 0.8
        assert np.all(y[b, 5:, 0] == 0)
        # green/blue anchors empty
        assert np.all(y[b, :, 1] == 0) and np.all(y[b, :, 2] == 0)
        # temporal anchor: the oldest frame's square, half score
        assert_box(y[b, :4, 3], square_box_in_input(k - 15))
        assert 0.4 < y[b, 4, 3] < 0.55
        # near duplicate of anchor 0 for NMS
        assert_box(y[b, :4, 4], box0 + np.array([2, 0, 0, 0], np.float32), tol=1e-4)
        assert y[b, 4, 4] == pytest.approx(0.95 * y[b, 4, 0], rel=1e-5)
        assert iou_cxcywh(y[b, :4, 0], y[b, :4, 4]) > 0.5
        # the best class-0 detection is anchor 0
        assert int(np.argmax(y[b, 4])) == 0
        assert np.all(y[b, :, 5:] == 0)


def test_bgr_not_converted_looks_blue(model, frames):
    y = run(model, clips(frames, to_rgb=False))
    for b, k in enumerate(KEYFRAMES):
        assert y[b, 4].max() < 0.05  # no red at all
        assert y[b, 6, 2] > 0.8  # blue anchor, class 2
        assert_box(y[b, :4, 2], square_box_in_input(k))


def test_reversed_frame_order_is_visible(model, frames):
    y = run(model, clips(frames, reverse=True))
    for b, k in enumerate(KEYFRAMES):
        assert_box(y[b, :4, 0], square_box_in_input(k - 15))  # "keyframe" is the oldest frame
        assert_box(y[b, :4, 3], square_box_in_input(k))
        assert y[b, 4, 3] < y[b, 4, 0]
        # and it really is a different place than the correct answer
        assert np.abs(y[b, :4, 0] - np.asarray(square_box_in_input(k))).max() > 10


def test_missing_normalisation_detects_nothing(model, frames):
    y = run(model, clips(frames, normalise=False))
    assert np.all(y[:, 4:] == 0)


def test_green_square(model):
    seq = [render_frame(i, colour="green") for i in range(84, 100)]
    y = run(model, preprocess_clip(seq)[None])
    assert y[0, 5, 1] > 0.9 and y[0, 4].max() == 0 and y[0, 6].max() == 0
    assert_box(y[0, :4, 1], square_box_in_input(99))


# ---------------------------------------------------------------------------------------------
# sample media


def test_square_positions_distinct_and_in_frame():
    pos = [square_position(i, W, H, SIDE) for i in range(N_FRAMES)]
    assert len(set(pos)) == N_FRAMES
    for x1, y1 in pos:
        assert 0 <= x1 <= W - SIDE and 0 <= y1 <= H - SIDE
    assert square_position(7, W, H, SIDE) == square_position(7, W, H, SIDE)
    assert square_bbox(0, W, H, SIDE)[2:] == (pos[0][0] + SIDE, pos[0][1] + SIDE)
    with pytest.raises(ValueError):
        square_position(0, 30, 30, 40)


def test_sample_video(sample, frames):
    assert count_frames(sample["video"]) == N_FRAMES
    cap = cv2.VideoCapture(str(sample["video"]))
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(30.0)
    assert int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == W and int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) == H
    cap.release()
    for i, f in frames.items():
        rgb = f[..., ::-1].astype(np.float32) / 255
        red = (rgb[..., 0] > 0.6) & (rgb[..., 1] < 0.4) & (rgb[..., 2] < 0.4)
        ys, xs = np.nonzero(red)
        got = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert np.abs(np.subtract(got, square_bbox(i, W, H, SIDE))).max() <= 2, i
        # outside the square (with a small margin) the background is dark and unsaturated
        x1, y1, x2, y2 = square_bbox(i, W, H, SIDE)
        outside = np.ones(red.shape, bool)
        outside[max(0, y1 - 3) : y2 + 3, max(0, x1 - 3) : x2 + 3] = False
        assert f[outside].max() < 120


def test_labels(sample, tmp_path):
    assert sample["labels"].read_text().splitlines() == ["red_action", "green_action", "blue_action"]
    p = write_labels(tmp_path / "l.txt", ["a", "b"])
    assert p.read_text() == "a\nb\n"


def test_make_video_verifies_frame_count(tmp_path, monkeypatch):
    p = make_video(tmp_path / "v.mp4", frames=12, width=160, height=120, side=20, colour="blue")
    assert count_frames(p) == 12
    monkeypatch.setattr(sample_media, "count_frames", lambda path: 3)
    with pytest.raises(VideoVerificationError, match="12 frames"):
        make_video(tmp_path / "w.mp4", frames=12, width=160, height=120, side=20)


def test_bad_videos(tmp_path):
    bad = make_bad_videos(tmp_path)
    assert set(bad) == {"empty", "text", "truncated", "short", "partial", "no_frames"}
    assert bad["empty"].stat().st_size == 0
    for kind in ("empty", "text", "truncated"):
        cap = cv2.VideoCapture(str(bad[kind]))
        assert not cap.isOpened(), kind  # truncated: moov atom is at the end -> unopenable
        cap.release()
        assert count_frames(bad[kind]) == 0
    assert count_frames(bad["short"]) == 5
    assert 0 < count_frames(bad["partial"]) < 100
    assert count_frames(bad["no_frames"]) == 0
    assert not (tmp_path / "_full_for_truncation.mp4").exists()


def test_bad_models(tmp_path):
    bad = make_bad_models(tmp_path)
    assert set(bad) >= {"not_onnx", "wrong_input", "wrong_output"}
    with pytest.raises(Exception):
        session(bad["not_onnx"])
    s = session(bad["wrong_input"])
    assert s.get_inputs()[0].shape == ["B", 3, SIZE, SIZE]
    assert run(s, np.zeros((2, 3, SIZE, SIZE), np.float32)).shape == (2, 7, A)
    s = session(bad["wrong_output"])
    assert s.get_inputs()[0].shape == ["B", 3, 16, SIZE, SIZE]
    assert run(s, np.zeros((2, 3, 16, SIZE, SIZE), np.float32)).shape == (2, 7)
    s = session(bad["wrong_anchors"])
    assert run(s, np.zeros((1, 3, 16, SIZE, SIZE), np.float32)).shape == (1, 7, A - 1)


def test_cli(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "zroact_tasks.testing.sample_media", str(tmp_path / "out")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    paths = json.loads(proc.stdout)
    assert set(paths) == {"video", "model", "labels"}
    assert Path(paths["video"]).name == "sample.mp4" and Path(paths["video"]).is_file()
    assert Path(paths["model"]).name == "model.onnx" and Path(paths["model"]).is_file()
    assert Path(paths["labels"]).name == "labels.txt" and Path(paths["labels"]).is_file()
