"""Keyframes, clips and slots: pure index arithmetic (YOWOv3 layout), no I/O."""

from __future__ import annotations


def keyframe_indices(n_frames: int, stride: int) -> list[int]:
    """Keyframe i (i = 1..n//stride) is frame i*stride - 1: 419 frames, stride 10 -> 9, 19, ..., 409."""
    return [i * stride - 1 for i in range(1, n_frames // stride + 1)]


def is_keyframe(frame: int, stride: int) -> bool:
    return (frame + 1) % stride == 0


def clip_frames(keyframe: int, length: int = 16, sampling_rate: int = 1) -> list[int]:
    """The clip's frame indices, oldest first, ending AT the keyframe, clamped at frame 0."""
    return [max(0, keyframe - (length - 1 - t) * sampling_rate) for t in range(length)]


def is_needed(frame: int, stride: int, length: int = 16, sampling_rate: int = 1) -> bool:
    """Whether any keyframe's clip uses this frame (so ingest stores only what Stage 1 reads)."""
    span = (length - 1) * sampling_rate
    if frame == 0:
        return stride - 1 <= span  # the first clip reaches back to (or clamps at) frame 0
    first_key = ((frame + 1 + stride - 1) // stride) * stride - 1
    return any((key - frame) % sampling_rate == 0 for key in range(first_key, frame + span + 1, stride))


def slot_of(keyframe_position: int, slot_size: int) -> int:
    """Slot j holds keyframes slot_size*j .. slot_size*j + slot_size - 1 of the keyframe list."""
    return keyframe_position // slot_size


def split_slots(keyframes: list[int], slot_size: int) -> list[list[int]]:
    """Consecutive groups of slot_size keyframes; a trailing partial group is kept (Stage 1 only)."""
    return [keyframes[i : i + slot_size] for i in range(0, len(keyframes), slot_size)]


def keyframe_count(n_frames: int, stride: int) -> int:
    return n_frames // stride


def slot_keyframes(slot: int, slot_size: int, stride: int, total: int | None = None) -> list[int]:
    """Slot ``slot``'s keyframes (frame indices); ``total`` keyframes cut the last slot short."""
    last = slot_size * (slot + 1) if total is None else min(slot_size * (slot + 1), total)
    return [(i + 1) * stride - 1 for i in range(slot_size * slot, last)]


def job_slots(keyframes_total: int, slot_size: int, stride: int) -> list[list[int]]:
    """Every slot of a job with ``keyframes_total`` keyframes."""
    return split_slots(keyframe_indices(keyframes_total * stride, stride), slot_size)


def chunk_frames(first_slot: int, slots: int, slot_size: int, stride: int, length: int = 16,
                 sampling_rate: int = 1) -> tuple[int, int]:
    """Frames (first, last) to decode for slots ``first_slot`` .. ``first_slot + slots - 1``:
    the clip history of the first keyframe (clamped at 0) through the last keyframe."""
    first_key = (slot_size * first_slot + 1) * stride - 1
    last_key = (slot_size * (first_slot + slots)) * stride - 1
    return max(0, first_key - (length - 1) * sampling_rate), last_key


def slots_using(frame: int, slot_size: int, stride: int, length: int = 16,
                sampling_rate: int = 1) -> tuple[int, int]:
    """The slots (lo, hi) whose clips may use ``frame`` (a superset when sampling_rate > 1)."""
    span = (length - 1) * sampling_rate
    first = max(0, -(-(frame + 1) // stride) - 1)  # first keyframe at or after the frame
    last = (frame + span + 1) // stride - 1  # last keyframe whose clip reaches back to it
    return first // slot_size, max(first, last) // slot_size
