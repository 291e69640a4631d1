"""Pictures of a report: the contact sheet and the annotated video show what the report says."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from zroact_tasks.render import PALETTE, annotate_video, contact_sheet

from .helpers import text_match, verdict_words


@pytest.fixture(scope="module")
def report(client, assets):
    return client.submit(assets["video"]).wait(timeout=180)


def test_contact_sheet_has_a_row_per_slot_with_the_boxes(report, assets, tmp_path):
    out = contact_sheet(assets["video"], report, tmp_path / "sheet.png", thumb_width=320, max_slots=5)
    sheet = cv2.imread(str(out))
    assert sheet is not None
    thumb_h = 240  # 320x240 frames at thumb width 320
    assert sheet.shape[0] == 40 + 5 * (thumb_h + 16)
    # Slot 0, first keyframe: the box outline of the top detection is drawn in class 0's colour.
    x1, y1, x2, y2 = (int(round(v)) for v in report.keyframes[0].detections[0].box)
    edge = sheet[40 + 8 + y2 - 1, 8 + (x1 + x2) // 2]
    assert np.abs(edge.astype(int) - np.array(PALETTE[0])).max() < 60
    # Each row shows its own slot's verdict, right of the thumbnails; slots past max_slots none.
    row_h = thumb_h + 16
    for slot in report.slots[:5]:
        assert slot.verdict is not None
        text_area = sheet[40 + slot.slot * row_h: 40 + (slot.slot + 1) * row_h, 8 + 3 * (320 + 8) - 4:]
        for text in verdict_words(slot):
            assert text_match(text_area, text)[0] > 0.95, (slot.slot, text)
    for slot in report.slots[5:8]:
        assert text_match(sheet, slot.verdict.reason)[0] < 0.8, slot.slot


def test_annotated_video_keeps_every_frame_and_draws_boxes(report, assets, tmp_path):
    out = annotate_video(assets["video"], report, tmp_path / "a.mp4")
    cap = cv2.VideoCapture(str(out))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == report.video.frames
    kf = report.keyframes[5]
    x1, y1, x2, y2 = (int(round(v)) for v in kf.detections[0].box)
    edge = frames[kf.index][y2 - 1, (x1 + x2) // 2]
    assert np.abs(edge.astype(int) - np.array(PALETTE[0])).max() < 60
    # A frame shows the verdict of the slot it belongs to (from the slot's first keyframe to the
    # next slot's), at the bottom; not a neighbour's, and none past the last full slot.
    slots = report.slots
    bottom = report.video.height * 2 // 3
    for i, slot in enumerate(slots):
        end = slots[i + 1].keyframes[0] if i + 1 < len(slots) else slot.keyframes[-1] + 10
        for index in (slot.keyframes[0], end - 1):
            for text in verdict_words(slot)[:2]:
                score, (_, y) = text_match(frames[index], text)
                assert score > 0.9 and y >= bottom, (slot.slot, index, text, score, y)
            for other in slots[max(0, i - 1): i] + slots[i + 1: i + 2]:
                assert text_match(frames[index], other.verdict.reason)[0] < 0.8, (slot.slot, index)
    for index in (slots[0].keyframes[0] - 1, slots[-1].keyframes[-1] + 10, report.video.frames - 1):
        assert max(text_match(frames[index], s.verdict.reason)[0] for s in slots) < 0.8, index


def test_the_annotated_video_plays_in_a_real_browser(report, assets, tmp_path):
    """Headless Chromium (Debian's) loads the annotated MP4, decodes it at the video's size and
    plays it: what a user opening ``--annotate OUT.mp4`` in a browser gets."""
    import functools
    import http.server
    import shutil
    import threading

    from .helpers import skip_unless_ci

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        skip_unless_ci("no chromium / chromedriver (apt install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    annotate_video(assets["video"], report, tmp_path / "a.mp4")
    (tmp_path / "index.html").write_text('<video id="v" src="a.mp4" muted playsinline></video>')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.set_script_timeout(30)
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/index.html")
        state = driver.execute_async_script("""
            const done = arguments[arguments.length - 1], v = document.getElementById('v');
            const report = () => done({ready: v.readyState, width: v.videoWidth,
                height: v.videoHeight, time: v.currentTime,
                error: v.error ? v.error.code + ' ' + v.error.message : null});
            v.onerror = report;
            v.play().catch(e => done({error: String(e)}));
            const poll = setInterval(() => {
                if (v.currentTime > 0.5) { clearInterval(poll); report(); }
            }, 50);
            setTimeout(() => { clearInterval(poll); report(); }, 20000);
        """)
    finally:
        driver.quit()
        server.shutdown()
    assert state["error"] is None, state
    assert state["ready"] >= 2 and state["time"] > 0.5, state  # decoded frames, and playing
    assert (state["width"], state["height"]) == (report.video.width, report.video.height), state
