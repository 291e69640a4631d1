"""Keyframe, clip and slot arithmetic (pure)."""

from zroact_tasks.media import clips


def test_keyframes_of_the_seed_video():
    kfs = clips.keyframe_indices(419, 10)
    assert len(kfs) == 41
    assert kfs[:3] == [9, 19, 29]
    assert kfs[-1] == 409


def test_no_keyframe_in_a_video_shorter_than_a_stride():
    assert clips.keyframe_indices(9, 10) == []
    assert clips.keyframe_indices(10, 10) == [9]


def test_clip_ends_at_its_keyframe_and_clamps_at_zero():
    assert clips.clip_frames(29) == list(range(14, 30))
    assert clips.clip_frames(9) == [0] * 6 + list(range(0, 10))
    assert clips.clip_frames(40, length=4, sampling_rate=3) == [31, 34, 37, 40]


def test_slots_of_three_with_a_partial_tail():
    groups = clips.split_slots(clips.keyframe_indices(419, 10), 3)
    assert len(groups) == 14
    assert groups[0] == [9, 19, 29]
    assert [len(g) for g in groups].count(3) == 13 and len(groups[-1]) == 2


def test_is_needed_is_exactly_the_union_of_clip_frames():
    for stride, length, rate in [(10, 16, 1), (10, 16, 2), (25, 8, 1), (4, 16, 3)]:
        n = 300  # ingest cannot know the last keyframe while decoding: count all that could follow
        later = n + length * rate + stride
        used = {f for kf in clips.keyframe_indices(later, stride)
                for f in clips.clip_frames(kf, length, rate) if f < n}
        needed = {f for f in range(n) if clips.is_needed(f, stride, length, rate)}
        assert needed == used, (stride, length, rate)
