"""The storyboard: per-story pages in story order with dialogues and QA, paged contact sheets made from
the renderer's thumbnails, the job page linking them, each story's board built as its render finishes
(kept across a coordinator restart), and the page as a person sees it in headless Chromium (screenshot
kept under test-artifacts/)."""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreamframe import keys, storyboard, thumbnails
from dreamframe.storage import LocalStore, to_proto
from dreamframe.storage.base import sha256_bytes
from dreamframe.story import QA, Character, Story, StoryItem, Substory, TinyStory
from dreamframe.v1 import coordinator_pb2 as pb
from dreamframe.v1 import render_pb2
from services.coordinator import stages
from services.coordinator.clients import Clients
from services.coordinator.fanout import FanoutResult
from services.coordinator.runner import Coordinator
from services.coordinator.settings import CoordinatorSettings

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


def long_story(frames: int, title: str = "Long") -> Story:
    items = [StoryItem(kind="frame", text=f"shot {i}") for i in range(frames)]
    return Story(
        title=title, overview="many frames", substories=[Substory(tiny_stories=[TinyStory(items=items)])]
    )


def png(colour: tuple[int, int, int], size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(colour: tuple[int, int, int], size: int = 64) -> bytes:
    return thumbnails.thumbnail(Image.new("RGB", (size, size), colour))


def srcs(page: str) -> list[str]:
    return re.findall(r'<img[^>]* src="([^"]+)"', page)


def hrefs(page: str) -> list[str]:
    return re.findall(r'<a href="([^"]+)"', page)


def test_story_page_shows_thumbnails_in_order_linking_frames_with_dialogues_and_escapes_text():
    page = storyboard.render_story_html("job-1", 0, story(), sheets=1)
    assert srcs(page)[0] == "contact_sheet_000_00.jpg"
    assert srcs(page)[1:] == [f"../stories/000/thumbs/{i:06d}.jpg" for i in range(4)]
    frame_links = [h for h in hrefs(page) if "/frames/" in h]
    assert frame_links == [f"../stories/000/frames/{i:06d}.png" for i in range(4)]
    assert hrefs(page)[0] == "index.html"  # back to the job page, relative
    assert page.index("frame 0") < page.index("Storm") < page.index("frame 1")
    assert "Pier &lt;b&gt;Night&lt;/b&gt;" in page and "&lt;soon&gt; &amp; fast" in page
    assert "<b>Night</b>" not in page and "<soon>" not in page
    assert "<script" not in page and "http" not in page
    assert "Who waits?" in page and "Where?" in page


def test_job_page_links_every_story_page_and_escapes_text():
    entries = [
        storyboard.IndexEntry(
            0, title="A <i>b</i> & c", overview="<script>x</script>", frames=1331, sheets=6
        ),
        storyboard.IndexEntry(1, built=False),
    ]
    page = storyboard.render_index_html("job-1", entries)
    assert hrefs(page) == ["story_000.html"]
    assert "A &lt;i&gt;b&lt;/i&gt; &amp; c" in page and "&lt;script&gt;x&lt;/script&gt;" in page
    assert "<script" not in page and "1331 frames, 6 contact sheets" in page
    assert "Story 1" in page and "not built yet" in page


def test_contact_sheet_grid_in_order_with_missing_and_unreadable_thumbnails_marked():
    thumbs = [jpeg(c) for c in COLOURS] + [None, b"not a jpeg"]
    sheet = storyboard.contact_sheet(thumbs, cell=32, columns=3)
    with Image.open(io.BytesIO(sheet)) as decoded:
        assert decoded.format == "JPEG"
        image = np.asarray(decoded.convert("RGB"), dtype=int)
    assert image.shape == (2 * 32, 3 * 32, 3)  # 3 columns, 2 rows
    for i, colour in enumerate(COLOURS):
        y, x = (i // 3) * 32 + 16, (i % 3) * 32 + 16
        assert np.abs(image[y, x] - colour).max() < 12
    # the missing fifth and the unreadable sixth are drawn as crossed boxes, not left blank
    for x in (32, 64):
        box = image[32:64, x : x + 32]
        assert (np.abs(box - [17, 17, 17]).sum(axis=-1) > 40).sum() > 32


def put_frames(store: LocalStore, job: str, index: int, count: int, *, thumbs: bool, noise: bool = False):
    rng = np.random.default_rng(index)
    for i in range(count):
        if noise:  # the worst case for a JPEG's size
            pixels = rng.integers(0, 256, (192, 192, 3), dtype=np.uint8)
        else:
            pixels = np.full((64, 64, 3), COLOURS[i % 4], dtype=np.uint8)
        if thumbs:
            store.put_bytes(keys.frame_thumb_key(job, index, i), thumbnails.thumbnail_from_pixels(pixels))
        else:
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            store.put_bytes(keys.frame_key(job, index, i), buf.getvalue())


def test_600_frames_make_3_sheets_of_at_most_256_thumbnails_and_2_mb(tmp_path):
    store = LocalStore(tmp_path, "bucket")
    put_frames(store, "paged", 0, 600, thumbs=True, noise=True)
    board = storyboard.build_story_board(
        store, "paged", 0, long_story(600), story_sha256="s", frames_sha256="f"
    )
    assert board.built and board.thumbnails_made == 0 and board.manifest["missing_frames"] == 0
    sheets = [storyboard.contact_sheet_key("paged", 0, p) for p in range(3)]
    assert [s["key"] for s in board.manifest["sheets"]] == sheets
    assert not store.exists(storyboard.contact_sheet_key("paged", 0, 3))
    cells = storyboard.SHEET_CELL
    for key, thumbs in zip(sheets, (256, 256, 88), strict=True):
        data = store.get_bytes(key)
        assert len(data) <= storyboard.SHEET_MAX_BYTES, (key, len(data))
        with Image.open(io.BytesIO(data)) as sheet:
            assert sheet.format == "JPEG"
            columns, rows = sheet.width // cells, sheet.height // cells
        assert columns == 16 and (columns * rows) >= thumbs > columns * (rows - 1)
    page = store.get_bytes(storyboard.story_page_key("paged", 0)).decode()
    assert [s for s in srcs(page) if s.startswith("contact_sheet")] == [
        f"contact_sheet_000_{p:02d}.jpg" for p in range(3)
    ]
    assert "frames 512–599" in page


def test_a_story_rendered_before_thumbnails_gets_them_made_once(tmp_path):
    store = LocalStore(tmp_path, "bucket")
    put_frames(store, "old", 0, 5, thumbs=False)
    store.delete(keys.frame_key("old", 0, 4))  # and one frame is missing altogether
    board = storyboard.build_story_board(store, "old", 0, long_story(5), story_sha256="s", frames_sha256="f")
    assert board.thumbnails_made == 4 and board.manifest["missing_frames"] == 1
    for i in range(4):
        with Image.open(io.BytesIO(store.get_bytes(keys.frame_thumb_key("old", 0, i)))) as thumb:
            assert thumb.format == "JPEG"
    # Built again (say, the story changed): the thumbnails made last time are used, not made anew.
    again = storyboard.build_story_board(store, "old", 0, long_story(5), story_sha256="s2", frames_sha256="f")
    assert again.thumbnails_made == 0


def test_a_stored_board_is_kept_only_while_it_matches_and_verifies(tmp_path):
    store = LocalStore(tmp_path, "bucket")
    put_frames(store, "keep", 0, 3, thumbs=True)
    storyboard.build_story_board(store, "keep", 0, long_story(3), story_sha256="s", frames_sha256="f")
    kept = storyboard.existing_story_board(store, "keep", 0, story_sha256="s", frames_sha256="f")
    assert kept is not None and not kept.built
    assert kept.page.key == storyboard.story_page_key("keep", 0)
    # Another story or other frames: build again.
    assert storyboard.existing_story_board(store, "keep", 0, story_sha256="s2", frames_sha256="f") is None
    assert storyboard.existing_story_board(store, "keep", 0, story_sha256="s", frames_sha256="f2") is None
    # A sheet changed or gone after the fact: build again.
    store.put_bytes(storyboard.contact_sheet_key("keep", 0, 0), b"damaged")
    assert storyboard.existing_story_board(store, "keep", 0, story_sha256="s", frames_sha256="f") is None
    # A hostile manifest: build again, nothing raised.
    store.put_bytes(storyboard.story_manifest_key("keep", 0), b'{"schema": 1, "page": 3}')
    assert storyboard.existing_story_board(store, "keep", 0, story_sha256="s", frames_sha256="f") is None
    assert storyboard.frames_digest({"frames": [{"key": "a"}]}) != storyboard.frames_digest(None) == ""


# --- in the coordinator -----------------------------------------------------------------------------


class CountingStore(LocalStore):
    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.written: list[str] = []

    def put_bytes(self, key, data, **kwargs):
        self.written.append(key)
        return super().put_bytes(key, data, **kwargs)


class FakeRenderFrames:
    """Stands in for the fan-out: writes each frame's PNG and thumbnail as the renderer does; a story in
    ``hold`` waits until it is released."""

    def __init__(self, store: LocalStore) -> None:
        self.store = store
        self.hold: dict[int, asyncio.Event] = {}
        self.calls: list[int] = []

    async def __call__(self, renderers, template, indices, *, on_frames=None, **_) -> FanoutResult:
        job, index = template.job_id, template.story_index
        self.calls.append(index)
        if index in self.hold:
            await self.hold[index].wait()
        result = FanoutResult()
        for i in indices:
            pixels = np.full((64, 64, 3), COLOURS[(index + i) % 4], dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            image = self.store.put_bytes(keys.frame_key(job, index, i), buf.getvalue())
            self.store.put_bytes(
                keys.frame_thumb_key(job, index, i), thumbnails.thumbnail_from_pixels(pixels)
            )
            frame = render_pb2.RenderedFrame(index=i, image=to_proto(image))
            result.frames[i] = frame
            result.rendered += 1
            if on_frames is not None:
                await on_frames([frame], result)
        return result


def submission(store: LocalStore, job: str, stories: int) -> pb.SubmitJobRequest:
    spec = pb.JobSpec(stages=[pb.STAGE_RENDER])
    for i in range(stories):
        ref = store.put_bytes(
            f"uploads/{job}/{i}.json", long_story(5 + i, title=f"Story <{i}>").to_json().encode()
        )
        spec.stories.add(story=to_proto(ref))
    return pb.SubmitJobRequest(job_id=job, spec=spec)


async def wait_for(condition, seconds: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_each_story_board_appears_when_its_render_ends_and_a_restart_keeps_it(tmp_path, monkeypatch):
    store = CountingStore(tmp_path, "bucket")
    fake = FakeRenderFrames(store)
    monkeypatch.setattr(stages, "render_frames", fake)
    settings = CoordinatorSettings(story_parallelism=2, persist_interval_seconds=0)
    clients = Clients(plot=None, style=None, renderers=[], qa=None, train=None, eval=None)
    job = "board-job"
    page0, page1 = storyboard.story_page_key(job, 0), storyboard.story_page_key(job, 1)

    async def first_run() -> pb.Job:
        fake.hold[1] = asyncio.Event()  # story 1's render does not finish in this run
        coordinator = Coordinator(store, clients, settings)
        await coordinator.start()
        await coordinator.submit(submission(store, job, 2))
        await wait_for(lambda: store.exists(storyboard.story_manifest_key(job, 0)))
        running = await coordinator.get(job)
        await coordinator.stop()  # the job stays RUNNING in storage
        return running

    running = asyncio.run(first_run())
    # Story 0's page and sheet were there while the job ran, before story 1 finished and the job ended.
    assert running.state == pb.JOB_STATE_RUNNING
    assert store.exists(page0) and store.exists(storyboard.contact_sheet_key(job, 0, 0))
    assert not store.exists(page1) and not store.exists(storyboard.storyboard_key(job))
    assert "Story &lt;0&gt;" in store.get_bytes(page0).decode()

    store.written.clear()

    async def second_run() -> pb.Job:
        coordinator = Coordinator(store, clients, settings)
        assert await coordinator.start() == 1
        states = [j async for j in coordinator.watch(job)]
        await coordinator.stop()
        return states[-1]

    fake.hold.clear()
    done = asyncio.run(second_run())
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    board_keys = [k for k in store.written if "/storyboard/" in k]
    # The restart built story 1's board and the job page; story 0's board was kept as it was.
    assert not [k for k in board_keys if "_000" in k], board_keys
    assert storyboard.story_page_key(job, 1) in board_keys
    assert storyboard.storyboard_key(job) in board_keys
    index = store.get_bytes(storyboard.storyboard_key(job)).decode()
    assert hrefs(index) == ["story_000.html", "story_001.html"]
    render = next(s for s in done.stages if s.stage == pb.STAGE_RENDER)
    recorded = {n.name: n.ref for n in render.outputs}
    assert recorded["storyboard/000"].key == page0 and recorded["storyboard/001"].key == page1
    assert recorded["storyboard/000"].sha256 == sha256_bytes(store.get_bytes(page0))
    assert [n.name for n in done.outputs] == ["storyboard"]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_page_renders_the_first_frames_in_headless_chromium(tmp_path):
    root = tmp_path / "job"
    (root / "storyboard").mkdir(parents=True)
    (root / "stories/000/frames").mkdir(parents=True)
    (root / "stories/000/thumbs").mkdir(parents=True)
    for i, colour in enumerate(COLOURS):
        (root / f"stories/000/frames/{i:06d}.png").write_bytes(png(colour, 256))
        (root / f"stories/000/thumbs/{i:06d}.jpg").write_bytes(jpeg(colour, 256))
    (root / "storyboard/contact_sheet_000_00.jpg").write_bytes(
        storyboard.contact_sheet([jpeg(c) for c in COLOURS], cell=16)
    )
    page = storyboard.render_story_html("job-1", 0, story(), sheets=1)
    (root / "storyboard/story_000.html").write_text(page, encoding="utf-8")
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
            (root / "storyboard/story_000.html").resolve().as_uri(),
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
