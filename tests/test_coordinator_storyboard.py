"""The storyboard: HTML in story order with dialogues and QA, a contact sheet, and the page as a person
sees it in headless Chromium (screenshot kept under test-artifacts/)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreamframe.story import QA, Character, Story, StoryItem, Substory, TinyStory
from services.coordinator import storyboard

ARTIFACTS = Path(os.environ.get("DREAMFRAME_TEST_ARTIFACTS", "test-artifacts"))
COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 200, 20)]


def story() -> Story:
    items = [
        StoryItem(kind="frame", text="at the pier, Tom is standing"),
        StoryItem(kind="dialogue", text="Tom: Storm's coming <soon> & fast."),
        StoryItem(kind="frame", text="at the pier, Tom is looking at the sea"),
    ]
    return Story(
        title="Pier <b>Night</b>",
        overview="A fisherman waits.",
        style_keyword="Noir",
        characters=[Character(name="Tom", appearance="a man looks like Tom Hanks in blue")],
        qa=[QA(question="Who waits?", answer="Tom.")],
        substories=[
            Substory(
                scene="pier", tiny_stories=[TinyStory(items=items, qa=[QA(question="Where?", answer="Pier")])]
            ),
            Substory(scene="bar", tiny_stories=[TinyStory(items=items[:1] + items[2:])]),
        ],
    )


def png(colour: tuple[int, int, int], size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_page_lists_frames_in_order_with_dialogues_and_escapes_text():
    page = storyboard.render_html("job-1", [story()])
    srcs = [part.split('"')[0] for part in page.split('<img src="')[1:]]
    assert srcs[0] == "contact_sheet_000.png"
    assert srcs[1:] == [f"../stories/000/frames/{i:06d}.png" for i in range(4)]
    assert page.index("frame 0") < page.index("Storm") < page.index("frame 1")
    assert "Pier &lt;b&gt;Night&lt;/b&gt;" in page and "&lt;soon&gt; &amp; fast" in page
    assert "<script" not in page
    assert "Who waits?" in page and "Where?" in page


def test_contact_sheet_grid_in_story_order_with_missing_frames_marked():
    sheet = storyboard.contact_sheet(5, lambda i: png(COLOURS[i]) if i < 4 else None, thumb=32)
    image = np.asarray(Image.open(io.BytesIO(sheet)).convert("RGB"))
    assert image.shape == (2 * 32, 3 * 32, 3)  # ceil(sqrt(5)) = 3 columns, 2 rows
    for i, colour in enumerate(COLOURS):
        y, x = (i // 3) * 32 + 16, (i % 3) * 32 + 16
        assert tuple(image[y, x]) == colour
    # the missing fifth frame is drawn as a crossed box, not left blank and not an image
    box = image[32:64, 32:64]
    background = image[48, 80]  # the unused sixth cell
    assert (box != background).any(axis=-1).sum() > 32


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_page_renders_the_first_frames_in_headless_chromium(tmp_path):
    root = tmp_path / "job"
    (root / "storyboard").mkdir(parents=True)
    (root / "stories/000/frames").mkdir(parents=True)
    for i, colour in enumerate(COLOURS):
        (root / f"stories/000/frames/{i:06d}.png").write_bytes(png(colour, 256))
    (root / "storyboard/contact_sheet_000.png").write_bytes(
        storyboard.contact_sheet(4, lambda i: png(COLOURS[i]), thumb=16)
    )
    (root / "storyboard/index.html").write_text(storyboard.render_html("job-1", [story()]), encoding="utf-8")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "storyboard.png"
    shot.unlink(missing_ok=True)
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--hide-scrollbars",
            "--window-size=1200,1600",
            f"--screenshot={shot.resolve()}",
            (root / "storyboard/index.html").resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    image = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    # The first frames' colours fill their 200×200 figures on the page: many pixels of each.
    for colour in COLOURS[:2]:
        assert (np.abs(image.astype(int) - colour).sum(axis=1) < 10).sum() > 150 * 150, (
            f"frame {colour} not shown"
        )
