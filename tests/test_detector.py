"""The onnxruntime detector on generated YOWOv3-layout models, good and bad."""

import logging

import numpy as np
import pytest

from zroact_tasks.errors import LabelsError, ModelError
from zroact_tasks.stage1.detector import OnnxDetector
from zroact_tasks.testing.onnx_models import make_bad_models, make_yowo_model, write_labels


def test_reads_layout_and_reports_the_provider_it_got(tmp_path, monkeypatch, caplog):
    """onnxruntime lists CUDA (as onnxruntime-gpu does on a machine without a usable GPU) but
    the session falls back to the CPU: the detector reports the provider it got, not the one
    it asked for."""
    import onnxruntime as ort

    assert "CUDAExecutionProvider" not in ort.get_available_providers()  # this machine: CPU only
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with caplog.at_level(logging.INFO, logger="zroact_tasks.stage1.detector"):
        det = OnnxDetector(make_yowo_model(tmp_path / "m.onnx", num_classes=5),
                           write_labels(tmp_path / "l.txt", [f"c{i}" for i in range(5)]))
    assert (det.input_height, det.input_width, det.clip_length) == (224, 224, 16)
    assert det.num_classes == 5 and det.max_batch is None
    assert det.providers == ["CPUExecutionProvider"]  # what the session really uses
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stage1 model")]
    assert "on CPUExecutionProvider" in line and "CUDA" not in line, line
    assert det.infer(np.zeros((3, 3, 16, 224, 224), np.float32)).shape == (3, 9, 1029)


def test_fixed_batch_model_runs_clip_by_clip(tmp_path):
    det = OnnxDetector(make_yowo_model(tmp_path / "m.onnx", batch=1))
    assert det.max_batch == 1
    assert det.infer(np.zeros((2, 3, 16, 224, 224), np.float32)).shape == (2, 7, 1029)


@pytest.mark.parametrize("kind", ["not_onnx", "wrong_input", "wrong_output"])
def test_bad_models_are_refused_with_the_reason(tmp_path, kind):
    path = make_bad_models(tmp_path)[kind]
    with pytest.raises(ModelError) as err:
        OnnxDetector(path)
    assert str(path) in str(err.value)


def test_missing_model(tmp_path):
    with pytest.raises(ModelError, match="no such model file"):
        OnnxDetector(tmp_path / "absent.onnx")


def test_label_count_must_match_classes(tmp_path):
    with pytest.raises(LabelsError, match="2 labels, but the model has 3 classes"):
        OnnxDetector(make_yowo_model(tmp_path / "m.onnx"), write_labels(tmp_path / "l.txt", ["a", "b"]))


def test_clip_length_must_match_the_model(tmp_path):
    with pytest.raises(ModelError, match="the model takes 16-frame clips, ZROACT_CLIP_LENGTH is 8"):
        OnnxDetector(make_yowo_model(tmp_path / "m.onnx"), clip_length=8)
