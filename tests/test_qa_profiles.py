"""Dataset profiles and ``check``: what the qa-generator writes for LLaMA-VID and LLaVA-NeXT-Video passes
our own implementation of each trainer's loader rules (services/qa_generator/check.py), the seed story's
shape (one flat tiny story of 1,331 frames, 650 dialogues, 144 QA) becomes question-last, capped
records, and broken records are each reported by id."""

from __future__ import annotations

import io
import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from test_qa_generator import JOB, make_story, put_story

from dreamframe import keys
from dreamframe.errors import InvalidArgument
from dreamframe.storage import LocalStore
from services.qa_generator import check
from services.qa_generator.builder import BuildRequest, build_dataset
from services.qa_generator.inputs import StorySource
from services.qa_generator.options import make_options
from services.qa_generator.profiles import PROFILES
from services.trainer.data.media import MediaResolver
from services.trainer.data.records import media_of, parse_conversation

SEED_OVERVIEW = (
    "A lighthouse keeper finds a stranded robot on the rocks and, over one stormy night, teaches it to "
    "keep the light burning while the village below prepares for the storm."
)
DESCRIBE = "Describe in detail what happens in the movie."


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store", "dreamframe")


def build(store: LocalStore, sources, **options):
    options.setdefault("video_size", 16)
    return build_dataset(store, BuildRequest(JOB, "", list(sources), make_options(**options)))


def dataset_folder(store: LocalStore) -> Path:
    return store.root / "dreamframe" / keys.dataset_prefix(JOB)


def records(store: LocalStore, split: str = "train") -> list[dict]:
    return json.loads(store.get_bytes(keys.dataset_prefix(JOB) + f"conversations/{split}.json"))


# --- what each profile writes passes that profile's check ----------------------------------------------


@pytest.mark.parametrize("profile", list(PROFILES))
def test_each_profile_passes_its_own_check(store: LocalStore, profile: str) -> None:
    sources = [put_story(store, i, make_story(f"p{i}")) for i in range(2)]
    result = build(
        store,
        sources,
        formats=["llava_json", "video_mp4", "mvbench_mc"],
        include_subtitles=True,
        profile=profile,
        test_fraction=0.5,
    )
    manifest = json.loads(store.get_bytes(result.manifest.key))
    assert manifest["options"]["profile"] == profile
    # From storage (the prefix) and from the folder on disk: the same verdict.
    for dataset in (
        check.open_stored(store, keys.dataset_prefix(JOB)),
        check.open_local(dataset_folder(store)),
    ):
        report = check.check_dataset(dataset, profile)
        assert report.ok, [p.line() for p in report.problems[:5]]
        assert report.records == sum(len(records(store, s)) for s in ("train", "test")) > 0
        assert report.files == [
            "conversations/test.json",
            "conversations/train.json",
            "conversations/validation.json",
        ]
    # Our own trainer reads every record (services/trainer/data: conversation, media kind, media key).
    resolved = MediaResolver(store, None).resolve_all(
        [(r["video"], "datasets/" + JOB + "/conversations") for r in records(store)]
    )
    for record in records(store):
        assert parse_conversation(record).turns and media_of(record) == ("video", [record["video"]])
        assert (
            resolved[(record["video"], f"datasets/{JOB}/conversations")]
            == f"datasets/{JOB}/{record['video']}"
        )
    # Subtitles first, the question last (LLaMA-VID keeps the end of a long turn).
    tiny = next(r for r in records(store) if "_t" in r["id"])
    first = tiny["conversations"][0]["value"]
    assert first.startswith("<image>\nSubtitles:\n")
    assert first.endswith("\n\nDescribe what happens in this clip.")


def test_profile_options_are_checked() -> None:
    with pytest.raises(InvalidArgument) as err:
        make_options(profile="llava")
    assert err.value.field == "options.profile"
    with pytest.raises(InvalidArgument) as err:
        make_options(fps=0.5)  # both loaders keep every round(0.5 / 1) = 0th frame
    assert err.value.field == "options.fps"
    assert make_options(max_video_seconds=60, fps=2).max_video_frames == 120
    assert make_options().profile == "llama-vid" and make_options().max_video_seconds == 300


# --- the seed story -----------------------------------------------------------------------------------------


def seed_story() -> dict:
    """The shape of the seed's reference story (json/story_info_0.json of the DreamFrame code): 1,331
    frames and 650 dialogues in one flat img_diag, 144 QA whose first asks for a detailed description."""
    img_diag = []
    speakers = ["Ada", "Robot", "Mayor"]
    dialogues = 0
    for i in range(1331):
        img_diag.append(
            ["frame", f"generate an image in Noir style: at the lighthouse, Ada is standing, moment {i}"]
        )
        if i % 2 == 1 and dialogues < 650:
            speaker = speakers[dialogues % 3]
            img_diag.append(
                [
                    "dialogue",
                    f"{speaker}: We must keep the light burning until the boats are home, {dialogues}.",
                ]
            )
            dialogues += 1
    qa = [{"Question": DESCRIBE, "Answer": SEED_OVERVIEW}]
    qa += [
        {"Question": f"What does Ada hold in scene {i}?", "Answer": f"A brass lamp number {i}."}
        for i in range(143)
    ]
    return {
        "overview": SEED_OVERVIEW,
        "character": {"Ada": "a woman looks like Meryl Streep in grey"},
        "img_diag": img_diag,
        "QA": qa,
    }


def put_seed(store: LocalStore) -> StorySource:
    ref = store.put_json(keys.story_key(JOB, 0), seed_story())
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 90, dtype=np.uint8)).save(buf, format="PNG")
    for i in range(1331):
        store.put_bytes(keys.frame_key(JOB, 0, i), buf.getvalue(), content_type="image/png")
    return StorySource(key=ref.key, frames_prefix=keys.frames_prefix(JOB, 0))


def test_seed_story_becomes_question_last_capped_records(store: LocalStore) -> None:
    result = build(store, [put_seed(store)], include_subtitles=True)
    recs = records(store)
    assert recs
    for record in recs:
        assert "frames" not in record and record["video"].endswith(".mp4")
        humans = [t["value"] for t in record["conversations"][::2]]
        # The question is the last paragraph; subtitles (up to 40 lines) come before it.
        last = humans[0].split("\n\n")[-1]
        assert last.endswith(("?", ".")) and "Subtitles" not in last and "\n" not in last
        assert all("Subtitles:" not in h.split("\n\n")[-1] for h in humans)
    assert any("Subtitles:\n" in r["conversations"][0]["value"] for r in recs)

    # The description request stays a conversation, never a multiple-choice item.
    assert any(DESCRIBE in t["value"] for r in recs for t in r["conversations"][::2])
    items = json.loads(store.get_bytes(keys.dataset_prefix(JOB) + "mc/train.json"))
    assert items and all(i["question"] != DESCRIBE and SEED_OVERVIEW not in i["candidates"] for i in items)

    # LLaMA-VID's rules hold, every video included: none longer than 5 minutes (the check's default cap).
    report = check.check_dataset(check.open_stored(store, keys.dataset_prefix(JOB)), "llama-vid")
    assert report.ok, [p.line() for p in report.problems[:5]]
    # The 11-minute story (1,331 keyframes at 2 fps) shows every 3rd keyframe: 444 frames, 222 s.
    story_video = next(r["video"] for r in recs if r["id"].endswith("_story_c0"))
    assert "000000-001331s3_" in story_video
    # Dialogue questions come on parts of at most 600 keyframes (3 parts of 444/444/443).
    parts = sorted({r["video"] for r in recs if "_p0" in r["id"]})
    assert len(parts) == 3
    assert result.counts["videos"] == 4


# --- broken records are reported by id ----------------------------------------------------------------------


def write_video(path: Path, frames: int, fps: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(fps).limit_denominator(100))
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), i * 10, dtype=np.uint8), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame.reformat(format="yuv420p")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def conv(*values: str) -> list[dict]:
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


SUBTITLES = "Subtitles:\n" + "\n".join(
    f"Ada: We must keep the light burning until every boat is home, line {i}." for i in range(40)
)


def broken_dataset(folder: Path) -> None:
    write_video(folder / "videos" / "ok.mp4", 6, 2)
    write_video(folder / "videos" / "slow.mp4", 3, Fraction(2, 5))
    records = [
        {
            "id": "good",
            "video": "videos/ok.mp4",
            "conversations": conv(f"<image>\n{SUBTITLES}\n\nWho waits?", "Ada.", "Why?", "For the boats."),
        },
        {
            "id": "early-question",
            "video": "videos/ok.mp4",
            "conversations": conv("<image>\nWho waits on the pier?\n\n" + SUBTITLES, "Ada."),
        },
        {
            "id": "frames-only",
            "frames": ["frames/000000.png"],
            "conversations": conv("<image>\nWho waits?", "Ada."),
        },
        {"id": "no-image-token", "video": "videos/ok.mp4", "conversations": conv("Who waits?", "Ada.")},
        {
            "id": "image-in-second-turn",
            "video": "videos/ok.mp4",
            "conversations": conv("Who waits?", "Ada.", "<image>\nWhy?", "Boats."),
        },
        {
            "id": "two-questions",
            "video": "videos/ok.mp4",
            "conversations": [
                {"from": "human", "value": "<image>\nWho?"},
                {"from": "human", "value": "Why?"},
                {"from": "gpt", "value": "Ada."},
            ],
        },
        {
            "id": "gpt-first",
            "video": "videos/ok.mp4",
            "conversations": [{"from": "gpt", "value": "Hello."}, *conv("<image>\nWho?", "Ada.")],
        },
        {"id": "missing-video", "video": "videos/gone.mp4", "conversations": conv("<image>\nWho?", "Ada.")},
        {"id": "escaping-path", "video": "../outside.mp4", "conversations": conv("<image>\nWho?", "Ada.")},
        {"id": "slow-video", "video": "videos/slow.mp4", "conversations": conv("<image>\nWho?", "Ada.")},
    ]
    (folder / "conversations").mkdir(parents=True)
    (folder / "conversations" / "train.json").write_text(json.dumps(records))


def test_broken_records_are_each_reported_by_id(tmp_path: Path) -> None:
    broken_dataset(tmp_path / "ds")
    report = check.check_dataset(check.open_local(tmp_path / "ds"), "llama-vid")
    rules = {}
    for p in report.problems:
        rules.setdefault(p.id, set()).add(p.rule)
    assert rules == {
        "early-question": {"text-query"},
        "frames-only": {"media", "image-token"},
        "no-image-token": {"image-token"},
        "image-in-second-turn": {"image-token"},
        "two-questions": {"roles"},
        "gpt-first": {"roles"},
        "missing-video": {"media-path"},
        "escaping-path": {"media-path"},
        "slow-video": {"video"},
    }
    assert report.records == 10 and report.bad_records == 9
    early = next(p for p in report.problems if p.id == "early-question")
    assert "cut off" in early.message and early.line().startswith(
        "conversations/train.json[1] early-question:"
    )


def test_llava_next_video_rules(tmp_path: Path) -> None:
    broken_dataset(tmp_path / "ds")
    report = check.check_dataset(
        check.open_local(tmp_path / "ds" / "conversations" / "train.json"), "llava-next-video"
    )
    ids = {p.id for p in report.problems}
    # No text query in LLaVA-NeXT: an early question is not cut; a frames field is still never read.
    assert "early-question" not in ids and "good" not in ids
    frames = [p for p in report.problems if p.id == "frames-only" and p.rule == "media"]
    assert frames and "LLaVA-NeXT" in frames[0].message
    # An image list needs one <image> per file; LLaMA-VID cannot read a list at all.
    for name in ("a.png", "b.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / "ds" / name)
    listed = [
        {"id": "pair", "image": ["a.png", "b.png"], "conversations": conv("<image>\n<image>\nSame?", "Yes.")}
    ]
    (tmp_path / "ds" / "pair.json").write_text(json.dumps(listed))
    one = check.open_local(tmp_path / "ds" / "pair.json")
    assert check.check_dataset(one, "llava-next-video").ok
    assert {p.rule for p in check.check_dataset(one, "llama-vid").problems} == {"media", "image-token"}


def test_long_videos_break_the_cap(tmp_path: Path) -> None:
    broken_dataset(tmp_path / "ds")
    report = check.check_dataset(check.open_local(tmp_path / "ds"), "llava-next-video", max_video_seconds=2)
    assert any(
        p.id == "good" and p.rule == "video" and "longer than 2 s" in p.message for p in report.problems
    )
