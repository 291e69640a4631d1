"""The real-compute conv model (layout, both batch forms, input-dependent output) and smoke runs
of the two CPU benches built on it (bench/stage1_batching.py, bench/frame_path.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import frame_path, stage1_batching
from zroact_tasks.stage1.detector import OnnxDetector
from zroact_tasks.stage1.yowo import anchors_for
from zroact_tasks.testing.conv_model import make_conv_yowo_model


@pytest.fixture(scope="module")
def conv_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("conv")
    return {"dynamic": make_conv_yowo_model(d / "conv.onnx"),
            "b1": make_conv_yowo_model(d / "conv_b1.onnx", batch=1)}


def _clips(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 16, 224, 224), dtype=np.float32)


@pytest.mark.parametrize("form, max_batch", [("dynamic", None), ("b1", 1)])
def test_loads_in_onnx_detector_with_the_yowo_layout(conv_models, form, max_batch):
    det = OnnxDetector(conv_models[form])
    assert det.max_batch == max_batch
    assert (det.clip_length, det.input_height, det.input_width, det.num_classes) == (16, 224, 224, 3)
    out = det.infer(_clips(2, 0))  # a fixed batch of one runs clip by clip
    assert out.shape == (2, 4 + 3, 1029) == (2, 7, anchors_for(224, 224))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    scores = out[:, 4:]
    assert (scores >= 0).all() and (scores <= 1).all()
    assert (out[:, :4] >= 0).all()


def test_output_depends_on_the_input_and_on_the_seed(conv_models, tmp_path):
    det = OnnxDetector(conv_models["dynamic"])
    a, b = _clips(1, 1), _clips(1, 2)
    out_a, out_b = det.infer(a), det.infer(b)
    assert not np.allclose(out_a, out_b)
    np.testing.assert_allclose(det.infer(np.concatenate([a, b])), np.concatenate([out_a, out_b]),
                               rtol=1e-4, atol=1e-4)  # batching does not mix clips
    other = OnnxDetector(make_conv_yowo_model(tmp_path / "seed1.onnx", seed=1))
    assert not np.allclose(other.infer(a), out_a)


def test_size_classes_and_file_size(tmp_path):
    path = make_conv_yowo_model(tmp_path / "m.onnx", num_classes=5, size=(256, 320))
    assert path.stat().st_size < 3_000_000
    det = OnnxDetector(path)
    assert (det.max_batch, det.num_classes, det.input_height, det.input_width) == (None, 5, 256, 320)
    out = det.infer(np.zeros((2, 3, 16, 256, 320), np.float32))
    assert out.shape == (2, 9, anchors_for(256, 320))
    with pytest.raises(ValueError):
        make_conv_yowo_model(tmp_path / "bad.onnx", size=100)


def test_stage1_batching_bench_smoke(tmp_path, capsys):
    out = tmp_path / "s1.json"
    result = stage1_batching.main(["--batches", "1", "2", "--repeat", "1", "--frames", "40",
                                   "--threads", "1", "--json", str(out)])
    assert [r["batch"] for r in result["rows"]] == [1, 2]
    assert all(r["stage1_clips_per_s"] > 0 and r["infer_clips_per_s"] > 0 for r in result["rows"])
    assert result["recommended_batch"] in (1, 2) and result["intra_op_num_threads"] == 1
    assert json.loads(out.read_text())["rows"][0]["infer_speedup"] == pytest.approx(1.0)
    assert "recommended stage1_batch" in capsys.readouterr().out


def test_stage1_recommendation_prefers_the_smallest_batch_near_the_best():
    def row(batch, ms_per_call):
        return {"batch": batch, "stage1_ms_per_call": ms_per_call, "stage1_ms_per_clip": ms_per_call / batch,
                "stage1_clips_per_s": 1000 * batch / ms_per_call,
                "stage1_min_ms_per_call": ms_per_call, "stage1_min_ms_per_clip": ms_per_call / batch}

    rows = [row(1, 100), row(2, 160), row(3, 240), row(4, 300), row(8, 560)]
    for r in rows:
        r["stage1_speedup"] = r["stage1_clips_per_s"] / rows[0]["stage1_clips_per_s"]
        r["stage1_ms_per_slot"] = stage1_batching.slot_ms(rows, r["batch"], 3)
    # per slot of 3: b1 300 ms, b2 160+100 = 260 ms, b3 240 ms (best), b4/b8 never fill
    assert [r["stage1_ms_per_slot"] for r in rows] == [300, 260, 240, 240, 240]
    batch, reason = stage1_batching.recommend(rows, 3)
    assert batch == 3 and "cross-task batching" in reason
    rows[2]["stage1_ms_per_slot"] = 255  # b2 (260) now within 5 % of the best (255)
    assert stage1_batching.recommend(rows, 3)[0] == 2
    flat = [row(1, 50), row(2, 100), row(3, 190), row(4, 200), row(8, 400)]  # a CPU: no gain
    for r in flat:
        r["stage1_ms_per_slot"] = stage1_batching.slot_ms(flat, r["batch"], 3)
    batch, reason = stage1_batching.recommend(flat, 3)
    assert batch == 1 and "never fill" in reason


def test_frame_path_bench_smoke(tmp_path, capsys):
    out = tmp_path / "fp.json"
    result = frame_path.main(["--frames", "20", "--size", "640x360", "--json", str(out)])
    (r,) = result["results"]
    for key, _, _ in frame_path.STEPS + frame_path.COMBINED + frame_path.FULL_STEPS:
        assert r[key] > 0 and r["cpu"][key] > 0, key
    assert r["slowest"] in {k for k, _, _ in frame_path.STEPS}
    assert r["s1_bytes"] > 0 and r["kf_bytes"] > 0  # lossless 224 copies, JPEG keyframes
    # 224 copies + keyframe JPEGs store less than lossless full frames (at 320x240 both are
    # about equal since the copies are zstd: ~14.4 KB a video frame either way)
    assert r["bytes_per_video_frame"] < r["full_bytes_per_video_frame"]
    assert result["need_frames_per_s"]["clip"] == pytest.approx(16 / 0.163)
    assert json.loads(out.read_text())["results"][0]["size"] == "640x360"
    assert "slowest single step" in capsys.readouterr().out
