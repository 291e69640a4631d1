"""The onnxruntime detector on generated YOWOv3-layout models, good and bad."""

import logging

import numpy as np
import pytest

from zroact_tasks.errors import LabelsError, ModelError
from zroact_tasks.stage1.detector import OnnxDetector, read_labels
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


def _external(model_path, tmp_path):
    import onnx
    from onnx.external_data_helper import set_external_data

    out = tmp_path / "ext" / "yowov3.onnx"
    out.parent.mkdir()
    model = onnx.load(str(model_path))
    weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert weights  # the float weights move out; shape inputs (int64) stay inline, as torch's do
    for tensor in weights:
        set_external_data(tensor, location="yowov3.onnx.data")
    onnx.save_model(model, str(out))  # writes the marked tensors to yowov3.onnx.data
    return out


def test_external_data_model_loads_and_a_missing_data_file_is_named(tmp_path):
    """torch >= 2.9 exports YOWOv3 as yowov3.onnx + yowov3.onnx.data; copying only the first
    must say which file is missing, not onnxruntime's path-validation message."""
    from zroact_tasks.stage1.detector import external_data_files

    model = _external(make_yowo_model(tmp_path / "m.onnx", num_classes=4), tmp_path)
    assert external_data_files(model) == ["yowov3.onnx.data"]
    det = OnnxDetector(model)
    assert det.num_classes == 4 and [p.name for p in det.files] == ["yowov3.onnx", "yowov3.onnx.data"]
    (model.parent / "yowov3.onnx.data").unlink()
    with pytest.raises(ModelError, match=r"its weights file yowov3.onnx.data is missing"):
        OnnxDetector(model)


def test_one_model_per_stage1_queue(redis_server, tmp_path):
    """A worker whose model differs from a live worker's is refused; once that worker's
    heartbeat is gone it may join, and the queue then serves its model."""
    import redis

    from zroact_tasks.config import Settings
    from zroact_tasks.errors import ModelConflictError
    from zroact_tasks.liveness import worker_key
    from zroact_tasks.stage1 import registry
    from zroact_tasks.stage1.detector import model_info

    r = redis.Redis.from_url(redis_server.url)
    r.delete(registry.MODEL, registry.SERVERS)
    a = model_info(OnnxDetector(make_yowo_model(tmp_path / "a.onnx", num_classes=3)), Settings())
    b = model_info(OnnxDetector(make_yowo_model(tmp_path / "b.onnx", num_classes=5,
                                                size=(160, 224))), Settings())
    assert (b.width, b.height) == (224, 160) and a.fingerprint != b.fingerprint
    r.set(worker_key("boot-a"), "stage1@host-a", ex=60)
    registry.publish(r, a, "boot-a")
    registry.check_joins(r, a)  # the same model joins
    with pytest.raises(ModelConflictError, match="serves on the stage1 queue") as err:
        registry.check_joins(r, b)
    assert "stage1@host-a" in str(err.value) and "\n" not in str(err.value)
    assert registry.current(r).input_size == (224, 224)
    r.delete(worker_key("boot-a"))  # worker a is gone
    registry.check_joins(r, b)
    registry.publish(r, b, "boot-b")
    assert registry.current(r) == b and r.hkeys(registry.SERVERS) == [b"boot-b"]
    r.delete(registry.MODEL, registry.SERVERS)


@pytest.mark.parametrize("name,count", [("ucf101-24", 24), ("ava-80", 80), ("ucf-crime-13", 13),
                                        ("jhmdb-21", 21)])
def test_shipped_label_lists_fit_models_of_their_class_count(tmp_path, name, count):
    from zroact_tasks import labels

    names = read_labels(labels.path(name), count)
    assert len(set(names)) == count
    with pytest.raises(LabelsError, match=f"{count} labels, but the model has {count + 1}"):
        read_labels(labels.path(name), count + 1)
