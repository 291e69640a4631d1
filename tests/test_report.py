"""How a job's records become its report: status and Stage 2 status for every way a job ends."""

from __future__ import annotations

import json
import time

import pytest

from zroact_tasks.control.report import build_report, stage1_slot_error
from zroact_tasks.models import JobSpec

from .helpers import validate_report

VERDICT = {"action": "walking", "confirmed": True, "confidence": 0.9, "reason": "a person walks"}
DETECTION = {"box": [1.0, 2.0, 30.0, 40.0], "label": "walk", "class_id": 0, "score": 0.8}


def meta(**fields: str) -> dict[str, str]:
    spec = JobSpec(job_id="j", video="v.mp4", prompt="p", keyframe_stride=10, sampling_rate=1,
                   clip_length=16, slot_size=3, score_threshold=0.3, nms_iou=0.5,
                   max_detections=10, submitted_at=time.time() - 5)
    video = json.dumps({"frames": 60, "fps": 30.0, "width": 320, "height": 240})
    return {"spec": spec.model_dump_json(), "video": video, "keyframes_total": "6", **fields}


def stage1_ok() -> dict[int, dict]:
    return {k: {"keyframe": k, "detections": [DETECTION]} for k in (9, 19, 29, 39, 49, 59)}


def judged(slot: int) -> dict:
    return {"stage2": True, "verdict": VERDICT, "model": "m", "image_size": [320, 240]}


def failed(slot: int, why: str = "VLM HTTP 400: bad") -> dict:
    return {"stage2": True, "error": why}


def report(m: dict, kfs: dict, groups: dict):
    built = build_report("j", m, kfs, groups)
    validate_report(built.model_dump(mode="json"))
    return built


def test_every_slot_judged_is_a_success_with_stage2_done():
    r = report(meta(stage2="true"), stage1_ok(), {0: judged(0), 1: judged(1)})
    assert (r.status, r.stage2.status, r.stage2.reason) == ("succeeded", "done", None)
    assert [s.image_size for s in r.slots] == [[320, 240], [320, 240]]


def test_some_slots_failed_is_completed_with_errors():
    r = report(meta(stage2="true"), stage1_ok(), {0: judged(0), 1: failed(1)})
    assert (r.status, r.stage2.status, r.error) == ("completed_with_errors", "done", None)


def test_every_slot_failed_fails_the_job_and_says_why():
    r = report(meta(stage2="true"), stage1_ok(),
               {0: failed(0, "VLM at http://x unreachable"), 1: failed(1)})
    assert (r.status, r.stage2.status) == ("failed", "failed")
    assert r.error.type == "AllSlotsFailed" and "VLM at http://x unreachable" in r.error.message
    assert not r.error.input_error
    assert all(k.detections for k in r.keyframes)  # Stage 1's results are kept


def test_without_stage2_every_keyframe_failed_fails_the_job():
    kfs = {k: {"keyframe": k, "error": "killed its worker on 3 deliveries"} for k in (9, 19, 29, 39, 49, 59)}
    r = report(meta(stage2="false"), kfs, {0: {"stage2": False}, 1: {"stage2": False}})
    assert (r.status, r.stage2.status, r.error.type) == ("failed", "skipped", "AllSlotsFailed")
    kfs[9] = {"keyframe": 9, "detections": []}
    r = report(meta(stage2="false"), kfs, {0: {"stage2": False}, 1: {"stage2": False}})
    assert (r.status, r.stage2.status) == ("completed_with_errors", "skipped")


def test_a_cancelled_job_says_cancelled_everywhere():
    kfs = stage1_ok()
    for k in (39, 49, 59):
        kfs[k] = {"keyframe": k, "error": "cancelled"}
    slot1 = {"error": stage1_slot_error(kfs[39])}
    r = report(meta(stage2="true", abort="cancelled"), kfs, {0: judged(0), 1: slot1})
    assert (r.status, r.stage2.status) == ("cancelled", "cancelled")
    assert r.slots[1].error == "cancelled"


def test_stage1_slot_errors_name_the_frame_unless_cancelled():
    assert stage1_slot_error({"keyframe": 29, "error": "frames [21] missing"}) == (
        "stage 1 failed on frame 29: frames [21] missing")
    assert stage1_slot_error({"keyframe": 29, "error": "cancelled"}) == "cancelled"


@pytest.mark.parametrize("fields,stage2", [({}, "not_run"), ({"stage2": "true"}, "not_run")])
def test_a_job_that_failed_before_stage2_says_not_run(fields, stage2):
    error = json.dumps({"type": "VideoDecodeError", "message": "v.mp4: not a video",
                        "input_error": True})
    m = {k: v for k, v in meta(error=error, **fields).items() if k not in ("video", "keyframes_total")}
    r = report(m, {}, {})
    assert (r.status, r.stage2.status, r.error.type) == ("failed", stage2, "VideoDecodeError")
    assert r.stage2.reason == "the job ended before any slot reached Stage 2"


def test_a_job_that_failed_after_some_verdicts_says_stopped():
    error = json.dumps({"type": "DeadlineError", "message": "past its deadline in stage 2"})
    r = report(meta(stage2="true", error=error), stage1_ok(), {0: judged(0)})
    assert (r.status, r.stage2.status) == ("failed", "stopped")
