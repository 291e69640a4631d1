"""Stage 1 detectors: the interface Stage 1 tasks call, and its onnxruntime implementation.

A detector takes a batch of preprocessed clips ``[B, 3, T, H, W]`` and returns the raw YOWOv3
head ``[B, 4 + C, A]``. ``ZROACT_DETECTOR`` picks the implementation: ``onnx`` (default) or
``package.module:Class`` for another runtime (TensorRT, a remote server, ...), constructed as
``Class(settings, **settings.detector_options)``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import re
from pathlib import Path
from typing import Protocol

import numpy as np

from ..config import Settings
from ..errors import ConfigError, LabelsError, ModelError, first_line
from .registry import ModelInfo, files_digest

log = logging.getLogger(__name__)

GPU_FIRST = ("CUDAExecutionProvider", "CPUExecutionProvider")


class Detector(Protocol):
    input_height: int
    input_width: int
    clip_length: int
    num_classes: int
    max_batch: int | None
    """None = any batch size in one call; 1 = a fixed batch of one (clips run one by one)."""
    labels: list[str] | None

    def infer(self, clips: np.ndarray) -> np.ndarray: ...


def read_labels(path: Path | None, num_classes: int) -> list[str] | None:
    if path is None:
        return None
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelsError(str(path), f"cannot read labels: {exc}") from exc
    if len(names) != num_classes:
        raise LabelsError(str(path), f"{len(names)} labels, but the model has {num_classes} classes")
    return names


# An ONNX tensor stored outside the model file names its file in an ``external_data`` entry
# (StringStringEntryProto: field 1 key "location", field 2 the file name, relative to the model).
_LOCATION = re.compile(rb"\n\x08location\x12")


def external_data_files(model: Path) -> list[str]:
    """The external-data files an ONNX model refers to (torch >= 2.9 writes ``<name>.onnx.data``
    beside the model), read from its protobuf without the ``onnx`` package."""
    data = model.read_bytes()
    names = []
    for match in _LOCATION.finditer(data):
        pos, length, shift = match.end(), 0, 0
        while pos < len(data):  # the name's length, a protobuf varint
            byte = data[pos]
            length |= (byte & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if not byte & 0x80:
                break
        name = data[pos : pos + length].decode("utf-8", "replace")
        if name not in names:
            names.append(name)
    return names


def _static(dim: object) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def import_onnxruntime():
    """onnxruntime, imported only where Stage 1 runs; missing, it is a setup error that says
    which extra installs it (the two wheels share one module and must never be both there)."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ConfigError("onnxruntime is not installed: pip install 'zroact[cpu]' (or "
                          "'zroact[gpu]' on a CUDA machine) where Stage 1 runs") from exc
    return onnxruntime


class OnnxDetector:
    """An onnxruntime session over a YOWOv3-layout model: CUDA first, CPU where no GPU is."""

    def __init__(self, model: Path | None, labels: Path | None = None,
                 clip_length: int | None = None) -> None:
        ort = import_onnxruntime()

        if model is None:
            raise ModelError("ZROACT_MODEL", "no Stage 1 model configured")
        path = Path(model)
        if not path.is_file():
            raise ModelError(str(model), "no such model file")
        self.files = [path] + [path.parent / name for name in external_data_files(path)]
        for data_file in self.files[1:]:
            if not data_file.is_file():
                raise ModelError(str(model), f"its weights file {data_file.name} is missing (it "
                                             f"must be beside the model, in {path.parent})")
        providers = [p for p in GPU_FIRST if p in ort.get_available_providers()]
        try:
            self._session = ort.InferenceSession(str(path), providers=providers)
        except Exception as exc:  # onnxruntime raises its own unexported exception types
            raise ModelError(str(model), f"onnxruntime cannot load it: {first_line(exc)}") from exc
        self.providers = self._session.get_providers()
        self._check_layout(str(model))
        if clip_length is not None and clip_length != self.clip_length:
            raise ModelError(str(model), f"the model takes {self.clip_length}-frame clips, "
                                         f"ZROACT_CLIP_LENGTH is {clip_length}")
        self.labels = read_labels(labels, self.num_classes)
        self.name = path.name
        log.info("stage1 model %s on %s (input %dx%d, %d classes, batch %s)", path.name,
                 self.providers[0], self.input_width, self.input_height, self.num_classes,
                 self.max_batch or "dynamic")

    def _check_layout(self, name: str) -> None:
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise ModelError(name, f"expected 1 input and 1 output, got {len(inputs)} and {len(outputs)}")
        shape = inputs[0].shape
        if len(shape) != 5 or _static(shape[1]) != 3 or not all(_static(d) for d in shape[2:]):
            raise ModelError(name, f"input must be [B,3,T,H,W] with fixed T,H,W; it is {shape}")
        self._input_name = inputs[0].name
        self.max_batch = _static(shape[0])
        self.clip_length, self.input_height, self.input_width = (int(d) for d in shape[2:])
        probe = np.zeros((1, 3, self.clip_length, self.input_height, self.input_width), np.float32)
        try:
            out = self._session.run(None, {self._input_name: probe})[0]
        except Exception as exc:
            raise ModelError(name, f"inference on a zero clip failed: {first_line(exc)}") from exc
        if out.ndim != 3 or out.shape[0] != 1 or out.shape[1] < 5:
            raise ModelError(name, f"output must be [B,4+C,A]; it is {list(out.shape)}")
        self.num_classes = int(out.shape[1]) - 4

    def infer(self, clips: np.ndarray) -> np.ndarray:
        if self.max_batch == 1 and clips.shape[0] > 1:
            return np.concatenate([self.infer(clips[i : i + 1]) for i in range(clips.shape[0])])
        return self._session.run(None, {self._input_name: clips})[0]


def load_detector(settings: Settings) -> Detector:
    """The detector ``settings.detector`` names, built from the settings."""
    if settings.detector == "onnx":
        return OnnxDetector(settings.model, settings.labels, settings.clip_length)
    module_name, _, class_name = settings.detector.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ModelError(settings.detector, f"cannot import detector class: {exc}") from exc
    try:
        return cls(settings, **settings.detector_options)
    except TypeError as exc:
        raise ModelError(settings.detector, f"bad ZROACT_DETECTOR_OPTIONS: {exc}") from exc


def model_info(det: Detector, settings: Settings) -> ModelInfo:
    """What Stage 1 workers publish of their model (stage1/registry.py)."""
    files = getattr(det, "files", None)
    if files:
        name, fingerprint = det.name, files_digest(files)
    else:  # another runtime: its class and options say which model it serves
        name = settings.detector
        fingerprint = getattr(det, "fingerprint", None) or hashlib.sha256(json.dumps(
            [settings.detector, settings.detector_options], sort_keys=True, default=str
        ).encode()).hexdigest()
    return ModelInfo(name=name, width=det.input_width, height=det.input_height,
                     clip_length=det.clip_length, num_classes=det.num_classes,
                     fingerprint=fingerprint)


def check_model(settings: Settings) -> tuple[str, ModelInfo]:
    """Load the model once, describe it and say what to publish of it; meant for a throwaway
    (spawned) process."""
    det = load_detector(settings)
    text = (f"{det.input_width}x{det.input_height}, T={det.clip_length}, {det.num_classes} "
            f"classes, batch {det.max_batch or 'dynamic'}, providers "
            f"{getattr(det, 'providers', '?')}")
    return text, model_info(det, settings)
