"""Stage 2 tasks (queue ``stage2``): thin; the work is in vlm.py and prompts.py."""

from __future__ import annotations

import io
import json
import logging
import time
from functools import cache

import cv2
from PIL import Image
from celery.exceptions import SoftTimeLimitExceeded

from .. import pipeline, resources
from ..app import app
from ..config import get_settings, stage2_time_limit_s
from ..redisconn import TRANSIENT_ERRORS
from ..control.tasks import one_line, record_group
from ..errors import VLMError, ZroactError
from ..media.video import decode_jpeg, encode_jpeg
from ..models import Detection, JobSpec
from .context import fit_frames
from .prompts import slot_text
from .vlm import VLMClient

log = logging.getLogger(__name__)


@cache
def vlm() -> VLMClient:
    s = get_settings()
    if s.vlm_url is None:
        raise ZroactError("Stage 2 worker has no ZROACT_VLM_URL")
    return VLMClient(s.vlm_url, model=s.vlm_model, timeout_s=s.vlm_timeout_s,
                     max_retries=s.vlm_max_retries, backoff_max_s=s.vlm_backoff_max_s,
                     max_tokens=s.vlm_max_tokens)


def _jpeg_size(jpeg: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(jpeg)) as image:  # reads the header only
        return image.size


def _capped(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """The size STAGE2_MAX_SIDE allows (aspect kept); the size itself when unset or smaller."""
    scale = 1.0 if max_side is None else max_side / max(size)
    return size if scale >= 1 else (round(size[0] * scale), round(size[1] * scale))


def _resized(jpeg: bytes, stored: tuple[int, int], size: tuple[int, int], quality: int) -> bytes:
    """The stored JPEG as is at its own size, else decoded, shrunk (area filter) and re-encoded."""
    if stored == size:
        return jpeg
    frame = decode_jpeg(jpeg)
    return encode_jpeg(cv2.resize(frame, size, interpolation=cv2.INTER_AREA), quality)


def slot_images(stored: list[bytes], text: str, client: VLMClient,
                settings) -> tuple[list[bytes], list[tuple[int, int]]]:
    """The slot's frames as sent: capped by STAGE2_MAX_SIDE, then fitted into the VLM's context
    (stage2/context.py; VLMContextError when they cannot fit). Returns the JPEGs and their sizes."""
    own = [_jpeg_size(jpeg) for jpeg in stored]
    sizes = fit_frames([_capped(size, settings.stage2_max_side) for size in own], text,
                       client.server, client.max_tokens)
    return ([_resized(jpeg, was, size, settings.frame_jpeg_quality)
             for jpeg, was, size in zip(stored, own, sizes)], sizes)


@app.task(name=pipeline.JUDGE, bind=True, ignore_result=True)  # the verdict is in the job's record
def judge_slot(self, job_id: str, slot: int, keyframes: list[int],
               detections: dict[str, list]) -> dict:
    """Ask the VLM about one slot of keyframes and record its verdict or its error."""
    jobs, settings = resources.jobs(), get_settings()
    if "verdict" in (jobs.group_record(job_id, slot) or {}):  # a verdict is final; an
        return {"slot": slot, "duplicate": True}  # error may still be mended by this run
    started = time.time()
    record: dict = {"stage2": True, "t0": started}
    try:
        if jobs.cancel_requested(job_id):
            raise ZroactError("cancelled")
        jobs.check_delivery(self.delivery_key, settings.max_task_deliveries)
        meta = jobs.meta(job_id)  # one read: the spec and the video are fields of it
        spec = JobSpec.model_validate_json(meta["spec"])
        fps = json.loads(meta["video"])["fps"] if "video" in meta else 30.0
        stored = resources.frames().get_many(job_id, keyframes)
        dets = {int(k): [Detection.model_validate(d) for d in v] for k, v in detections.items()}
        client, text = vlm(), slot_text(spec.prompt, keyframes, fps, dets)
        images, sizes = slot_images([stored[kf] for kf in keyframes], text, client, settings)
        record["image_size"] = list(sizes[0]) if sizes else None
        verdict = client.judge(images, text)
        record.update(verdict=verdict.model_dump(mode="json"), model=client.model)
    except ZroactError as exc:
        log.warning("job %s slot %d: %s", job_id, slot, exc)
        record["error"] = one_line(exc)
        if isinstance(exc, VLMError):
            jobs.count_vlm_error(type(exc).__name__)
    except TRANSIENT_ERRORS:
        raise  # Redis away for longer than the retries: requeued (app.TransientTask)
    except SoftTimeLimitExceeded:
        record["error"] = f"stage 2 stopped at its time limit ({stage2_time_limit_s(settings):g} s)"
    except Exception as exc:  # a bug must still end the slot, with its name
        log.exception("job %s slot %d failed", job_id, slot)
        record["error"] = f"{type(exc).__name__}: {one_line(exc)}"
    record["t1"] = time.time()
    record_group(job_id, slot, record, keyframes)
    return {"slot": slot, "error": record.get("error")}
