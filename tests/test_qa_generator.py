"""qa-generator domain: stories + keyframes in a real LocalStore → a dataset, checked file by file."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import av
import jsonschema
import numpy as np
import pytest
import yaml
from PIL import Image

from dreamframe import keys
from dreamframe.errors import Cancelled, InvalidArgument, NotFound
from dreamframe.progress import Progress
from dreamframe.storage import LocalStore
from dreamframe.story import QA, Character, Story, StoryItem, Substory, TinyStory
from services.qa_generator import formats
from services.qa_generator.builder import MANIFEST, BuildRequest, build_dataset
from services.qa_generator.dialogue import dialogue_questions
from services.qa_generator.inputs import StorySource
from services.qa_generator.options import make_options
from services.qa_generator.samples import SpanQA, Turn, remove_duplicate_turns, story_spans
from services.qa_generator.settings import QaSettings
from services.qa_generator.splits import assign_splits

JOB = "job-qa"
VIDEO_SIZE = 32
ALL_FORMATS = ["llava_json", "video_mp4", "frame_list", "mvbench_mc"]


# --- fixtures: tiny stories with tiny random keyframes -----------------------------------------------


def make_story(tag: str, *, substories: int = 2, tinies: int = 2, frames: int = 3) -> Story:
    """2 substories × 2 tiny stories × 3 frames, a dialogue after every frame, QA at every level."""
    subs = []
    for s in range(substories):
        tiny_stories = []
        for t in range(tinies):
            items = []
            for f in range(frames):
                items.append(
                    StoryItem(kind="frame", text=f"at the pier {tag}{s}{t}, Anna is walking, step {f}")
                )
                speaker = "Anna" if f % 2 else "Ben"
                items.append(StoryItem(kind="dialogue", text=f"{speaker}: line {tag}-{s}-{t}-{f}."))
            tiny_stories.append(
                TinyStory(
                    content=f"Anna walks along pier {tag}{s}{t}.",
                    items=items,
                    qa=[
                        QA(
                            question=f"What does Anna carry in {tag}{s}{t}?",
                            answer=f"A lamp {tag}{s}{t}.",
                            kind="what",
                        ),
                        QA(
                            question=f"How does Ben feel in {tag}{s}{t}?",
                            answer=f"Tired {tag}{s}{t}.",
                            kind="how",
                        ),
                    ],
                )
            )
        subs.append(
            Substory(
                scene=f"pier {s}",
                content=f"Part {s} of {tag}.",
                qa=[QA(question=f"Why is Anna at pier {s}?", answer=f"To meet Ben {tag}{s}.", kind="why")],
                tiny_stories=tiny_stories,
            )
        )
    return Story(
        title=f"Pier {tag}",
        overview=f"Anna and Ben meet on a pier ({tag}).",
        style_keyword="Dramatic",
        characters=[
            Character(name="Anna", appearance="a woman looks like Meryl Streep in red"),
            Character(name="Ben", appearance="a man looks like Tom Hanks in blue"),
        ],
        qa=[QA(question="Who waits on the pier?", answer=f"Anna {tag}.", kind="who")],
        substories=subs,
    )


def png_bytes(rng: np.random.Generator, width: int = 40, height: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def put_story(store: LocalStore, index: int, story: Story, *, seed: int = 0) -> StorySource:
    ref = store.put_bytes(
        keys.story_key(JOB, index), story.to_json().encode(), content_type="application/json"
    )
    rng = np.random.default_rng(seed + index)
    for i in range(story.frame_count):
        store.put_bytes(keys.frame_key(JOB, index, i), png_bytes(rng), content_type="image/png")
    return StorySource(key=ref.key, frames_prefix=keys.frames_prefix(JOB, index), sha256=ref.sha256)


class RecordingStore(LocalStore):
    """A LocalStore that remembers the order of writes (to check the manifest comes last)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.writes: list[str] = []

    def put_bytes(self, key, data, **kwargs):
        ref = super().put_bytes(key, data, **kwargs)
        self.writes.append(key)
        return ref

    def put_file(self, key, path, **kwargs):
        ref = super().put_file(key, path, **kwargs)
        self.writes.append(key)
        return ref


@pytest.fixture
def store(tmp_path: Path) -> RecordingStore:
    return RecordingStore(tmp_path / "store", "dreamframe")


def sources_for(store: LocalStore, n: int) -> list[StorySource]:
    return [put_story(store, i, make_story(f"s{i}")) for i in range(n)]


def request(sources, **option_kwargs) -> BuildRequest:
    option_kwargs.setdefault("video_size", VIDEO_SIZE)
    settings = option_kwargs.pop("settings", None)
    return BuildRequest(JOB, "", list(sources), make_options(settings=settings, **option_kwargs))


def dataset_json(store: LocalStore, rel: str):
    return json.loads(store.get_bytes(keys.dataset_prefix(JOB) + rel))


def decoded_frames(data: bytes) -> list[av.VideoFrame]:
    with av.open(io.BytesIO(data)) as container:
        return list(container.decode(video=0))


# --- the whole build -----------------------------------------------------------------------------------


def test_build_writes_every_format_consistently(store: RecordingStore) -> None:
    sources = sources_for(store, 3)
    progress: list[Progress] = []
    result = build_dataset(
        store,
        request(
            sources, formats=ALL_FORMATS, validation_fraction=0.34, test_fraction=0.34, include_subtitles=True
        ),
        on_progress=progress.append,
    )
    prefix = keys.dataset_prefix(JOB)
    assert result.prefix == prefix
    manifest = dataset_json(store, MANIFEST)

    # The manifest lists every object in the dataset folder, each verifying, and is the last write.
    listed = {f["key"] for f in manifest["files"]}
    stored = {info.key for info in store.list(prefix)}
    assert stored == listed | {prefix + MANIFEST}
    for f in manifest["files"]:
        assert f["key"] == prefix + f["path"]
        assert store.stat(f["key"]).sha256 == f["sha256"]
    assert store.writes[-1] == prefix + MANIFEST
    assert result.manifest.key == prefix + MANIFEST
    assert result.videos_encoded == manifest["counts"]["videos"] == 3 * (1 + 2 + 4)

    # Splits by story: one story each, no story in two splits.
    split_of = {s["story_id"]: s["split"] for s in manifest["stories"]}
    assert sorted(split_of.values()) == ["test", "train", "validation"]

    frames_per_span = {}
    for split in ("train", "validation", "test"):
        records = dataset_json(store, f"conversations/{split}.json")
        jsonschema.validate(records, formats.CONVERSATION_SCHEMA)
        assert records, split
        for record in records:
            story_id = record["id"].split("_")[0]
            assert split_of[story_id] == split
            turns = record["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert turns[0]["value"].startswith("<image>\n")
            assert all("<image>" not in t["value"] for t in turns[1:])
            assert store.exists(prefix + record["video"])
        # Subtitles were asked for: a tiny story's clip shows its own dialogue lines.
        tiny = next(r for r in records if "_t" in r["id"])
        assert "Subtitles:\n" in tiny["conversations"][0]["value"]

        for entry in dataset_json(store, f"frames/{split}.json"):
            story_index = int(entry["story_id"].rsplit("-", 1)[1])
            expected = [keys.frame_key(JOB, story_index, i) for i in range(entry["start"], entry["end"])]
            assert [f["key"] for f in entry["frames"]] == expected
            assert [f["sha256"] for f in entry["frames"]] == [store.stat(k).sha256 for k in expected]
            frames_per_span[entry["video"]] = entry["end"] - entry["start"]

        items = dataset_json(store, f"mc/{split}.json")
        jsonschema.validate(items, formats.MULTIPLE_CHOICE_SCHEMA)
        assert len(items) == manifest["counts"][f"{split}/mc_items"] > 0
        for item in items:
            assert item["answer"] in item["candidates"]
            assert len(item["candidates"]) == 4
            assert len({c.casefold() for c in item["candidates"]}) == 4
            assert item["video"] in frames_per_span

    # Every video decodes to its span's frame count at the requested size.
    assert len(frames_per_span) == result.videos_encoded
    for video, n in frames_per_span.items():
        frames = decoded_frames(store.get_bytes(prefix + video))
        assert len(frames) == n
        assert (frames[0].width, frames[0].height) == (32, 20)  # 40×24 scaled to longest side 32, even

    # Counts, stats and card agree with the files.
    stats = dataset_json(store, "stats.json")
    assert stats["counts"] == result.counts == manifest["counts"]
    assert stats["frames"]["total"] == 3 * 12
    assert stats["frames"]["spans"]["tiny_story"] == {"count": 12, "min": 3, "max": 3, "mean": 3.0}
    card = store.get_bytes(prefix + "README.md").decode()
    header = yaml.safe_load(card.split("---\n")[1])
    assert "video-text-to-text" in header["task_categories"]
    configs = {c["config_name"]: c["data_files"] for c in header["configs"]}
    assert {"conversations", "multiple_choice", "frame_lists"} <= set(configs)
    assert all(store.exists(prefix + f["path"]) for files in configs.values() for f in files)
    assert "## How it was made" in card

    # Progress: stories, then videos counted up to the total, then files ending in the manifest.
    units = [p.unit for p in progress]
    assert units.index("stories") < units.index("videos") < units.index("files")
    video_events = [p for p in progress if p.unit == "videos" and p.done]
    assert [p.done for p in video_events] == list(range(1, result.videos_encoded + 1))
    assert progress[-1].current_item == MANIFEST


def test_conversations_are_multi_turn_and_chunked(store: RecordingStore) -> None:
    sources = sources_for(store, 1)
    settings = QaSettings(max_turns_per_conversation=2)
    build_dataset(store, request(sources, formats=["llava_json", "video_mp4"], settings=settings))
    records = dataset_json(store, "conversations/train.json")
    by_span: dict[str, list[dict]] = {}
    for record in records:
        span_id, _, chunk = record["id"].rpartition("_c")
        by_span.setdefault(span_id, []).append(record)
        assert 2 <= len(record["conversations"]) <= 4
    # A tiny story has description + 2 QA + 4 dialogue questions = 7 turns → 4 conversations on one video.
    tiny = by_span["job-qa-000_s00_t00"]
    assert len(tiny) == 4 and len({r["video"] for r in tiny}) == 1
    assert sum(len(r["conversations"]) // 2 for r in tiny) == 7
    assert not any("/mc/" in info.key for info in store.list(keys.dataset_prefix(JOB)))


def test_rerun_reuses_videos_and_writes_nothing(store: RecordingStore) -> None:
    sources = sources_for(store, 2)
    first = build_dataset(store, request(sources))
    store.writes.clear()
    again = build_dataset(store, request(list(reversed(sources))))
    assert again.videos_encoded == 0 and again.videos_reused == first.videos_encoded
    assert store.writes == []
    assert again.manifest == first.manifest


def test_changed_options_replace_videos_and_drop_stale_files(store: RecordingStore) -> None:
    sources = sources_for(store, 1)
    first = build_dataset(store, request(sources, formats=ALL_FORMATS))
    old_videos = {f["key"] for f in dataset_json(store, MANIFEST)["files"] if f["path"].startswith("videos/")}
    store.writes.clear()
    second = build_dataset(store, request(sources, formats=["llava_json", "video_mp4"], fps=4.0))
    assert second.videos_encoded == first.videos_encoded and second.videos_reused == 0
    assert store.writes[-1] == second.manifest.key
    stored = {info.key for info in store.list(second.prefix)}
    assert not stored & old_videos  # superseded videos are gone
    assert not any(
        k.startswith(second.prefix + "mc/") or k.startswith(second.prefix + "frames/") for k in stored
    )
    video = dataset_json(store, "conversations/train.json")[0]["video"]
    with av.open(io.BytesIO(store.get_bytes(second.prefix + video))) as container:
        assert container.streams.video[0].average_rate == 4


def test_interrupted_build_publishes_nothing_and_resumes(store: RecordingStore) -> None:
    sources = sources_for(store, 2)
    seen: list[Progress] = []
    with pytest.raises(Cancelled):
        build_dataset(
            store,
            request(sources),
            on_progress=seen.append,
            is_cancelled=lambda: any(p.unit == "videos" and p.done >= 3 for p in seen),
        )
    prefix = keys.dataset_prefix(JOB)
    assert not store.exists(prefix + MANIFEST)
    assert not any(info.key.endswith(".json") for info in store.list(prefix))
    finished = build_dataset(store, request(sources))
    assert finished.videos_reused == 3
    assert finished.videos_encoded + finished.videos_reused == finished.counts["videos"]
    assert store.exists(prefix + MANIFEST)


def test_without_mp4_items_point_at_frames(store: RecordingStore) -> None:
    sources = sources_for(store, 1)
    result = build_dataset(store, request(sources, formats=["frame_list", "mvbench_mc"]))
    assert result.videos_encoded == 0
    assert not any("/videos/" in info.key for info in store.list(result.prefix))
    items = dataset_json(store, "mc/train.json")
    jsonschema.validate(items, formats.MULTIPLE_CHOICE_SCHEMA)
    assert all("video" not in item and item["frames"] for item in items)


@pytest.mark.parametrize("profile", ["llama-vid", "llava-next-video"])
def test_conversations_without_mp4_are_refused(store: RecordingStore, profile: str) -> None:
    # Was: records with a "frames" list, which neither LLaMA-VID nor LLaVA-NeXT reads (no visuals).
    sources = sources_for(store, 1)
    store.writes.clear()
    with pytest.raises(InvalidArgument) as err:
        build_dataset(store, request(sources, formats=["llava_json", "frame_list"], profile=profile))
    assert err.value.field == "options.formats"
    assert "video_mp4" in err.value.message and profile in err.value.message
    assert_nothing_written(store)


def test_mpeg4_fallback_codec_decodes(store: RecordingStore) -> None:
    sources = sources_for(store, 1)
    build_dataset(
        store, request(sources, formats=["llava_json", "video_mp4"], settings=QaSettings(video_codec="mpeg4"))
    )
    manifest = dataset_json(store, MANIFEST)
    assert manifest["options"]["video_codec"] == "mpeg4"
    video = next(f for f in manifest["files"] if f["path"].startswith("videos/job-qa-000/000000-000012_"))
    with av.open(io.BytesIO(store.get_bytes(video["key"]))) as container:
        assert container.streams.video[0].codec_context.name == "mpeg4"
        assert len(list(container.decode(video=0))) == 12


def test_default_codec_is_h264(store: RecordingStore) -> None:
    sources = sources_for(store, 1)
    build_dataset(store, request(sources, formats=["video_mp4", "llava_json"]))
    manifest = dataset_json(store, MANIFEST)
    assert manifest["options"]["video_codec"] == "libx264"
    video = next(f for f in manifest["files"] if f["path"].startswith("videos/"))
    with av.open(io.BytesIO(store.get_bytes(video["key"]))) as container:
        assert container.streams.video[0].codec_context.name == "h264"


# --- bad input: clear errors, nothing written ------------------------------------------------------------


def assert_nothing_written(store: RecordingStore) -> None:
    assert not any(key.startswith("datasets/") for key in store.writes)
    assert list(store.list("datasets/")) == []


def test_missing_frames_are_named(store: RecordingStore) -> None:
    sources = sources_for(store, 2)
    for i in (4, 7, 11):
        store.delete(keys.frame_key(JOB, 1, i))
    store.writes.clear()
    with pytest.raises(InvalidArgument) as err:
        build_dataset(store, request(sources))
    assert err.value.field == "stories.1.frames_prefix"
    assert "3 of 12 frames missing" in err.value.message
    assert "000004.png, 000007.png, 000011.png" in err.value.message
    assert_nothing_written(store)


def test_story_without_qa_is_refused(store: RecordingStore) -> None:
    sources = sources_for(store, 1)
    bare = make_story("bare")
    bare.qa = []
    for sub in bare.substories:
        sub.qa = []
        for tiny in sub.tiny_stories:
            tiny.qa = []
    sources.append(put_story(store, 1, bare))
    store.writes.clear()
    with pytest.raises(InvalidArgument) as err:
        build_dataset(store, request(sources))
    assert err.value.field == "stories.1.story"
    assert "no QA" in err.value.message
    assert_nothing_written(store)


def test_unknown_format_is_refused(store: RecordingStore) -> None:
    with pytest.raises(InvalidArgument) as err:
        make_options(formats=["llava_json", "webdataset"])
    assert err.value.field == "options.formats.1"
    assert "webdataset" in err.value.message


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"validation_fraction": 0.7, "test_fraction": 0.5}, "options.test_fraction"),
        ({"test_fraction": -0.1}, "options.test_fraction"),
        ({"fps": float("nan")}, "options.fps"),
        ({"num_choices": 1}, "options.num_choices"),
        ({"video_size": 8}, "options.video_size"),
    ],
)
def test_bad_options_name_their_field(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        make_options(**kwargs)
    assert err.value.field == field


def test_missing_story_and_bad_names(store: RecordingStore) -> None:
    sources = sources_for(store, 1)
    with pytest.raises(NotFound) as err:
        build_dataset(store, request([*sources, StorySource(key="jobs/nope/stories/000/story.json")]))
    assert err.value.field == "stories.1.story"
    with pytest.raises(InvalidArgument) as err:
        build_dataset(store, request([*sources, sources[0]]))
    assert err.value.field == "stories.1.story" and "same story" in err.value.message
    with pytest.raises(InvalidArgument) as err:
        build_dataset(store, BuildRequest("", "../up", sources, make_options()))
    assert err.value.field == "dataset_name"
    with pytest.raises(InvalidArgument) as err:
        build_dataset(store, request([]))
    assert err.value.field == "stories"
    assert_nothing_written(store)


def test_frames_prefix_defaults_to_the_story_folder(store: RecordingStore) -> None:
    source = put_story(store, 0, make_story("d"))
    result = build_dataset(store, request([StorySource(key=source.key)], formats=["frame_list"]))
    assert result.counts["frames"] == 12


# --- pieces -------------------------------------------------------------------------------------------------


def test_splits_are_by_story_deterministic_and_order_free() -> None:
    ids = [f"job-{i:03d}" for i in range(20)]
    splits = assign_splits(ids, validation_fraction=0.1, test_fraction=0.2, seed=7)
    assert sorted(splits) == sorted(ids)
    assert list(splits.values()).count("test") == 4 and list(splits.values()).count("validation") == 2
    shuffled = ids[:]
    random.Random(1).shuffle(shuffled)
    assert assign_splits(shuffled, validation_fraction=0.1, test_fraction=0.2, seed=7) == splits
    others = [assign_splits(ids, validation_fraction=0.1, test_fraction=0.2, seed=s) for s in range(8, 12)]
    assert any(other != splits for other in others)
    # Rounding never leaves train empty while the fractions leave room for it.
    small = assign_splits(["a", "b"], validation_fraction=0.3, test_fraction=0.3, seed=0)
    assert "train" in small.values()


def test_exact_duplicate_qa_is_removed_once_per_story() -> None:
    story = make_story("dup")
    repeated = QA(question="Who waits on the pier?", answer="Anna dup.", kind="who")
    story.substories[1].tiny_stories[0].qa.append(repeated)  # same as the level-1 QA
    story.substories[0].qa.append(QA(question="Who waits on the pier?", answer="Ben.", kind="who"))  # differs
    spans = story_spans(story, "x", dialogue_limit=0)
    removed = remove_duplicate_turns(spans)
    assert removed == 1
    pairs = [(t.question, t.answer) for span in spans for t in span.turns]
    assert pairs.count(("Who waits on the pier?", "Anna dup.")) == 1
    assert ("Who waits on the pier?", "Ben.") in pairs
    assert (
        next(s for s in spans if s.level == "story").turns[-1].answer == "Anna dup."
    )  # the coarsest keeps it


def test_spans_cover_the_right_frames() -> None:
    story = make_story("f", substories=2, tinies=3, frames=2)
    spans = {s.span_id: s for s in story_spans(story, "x", dialogue_limit=4)}
    assert (spans["x_story"].start, spans["x_story"].end) == (0, 12)
    assert (spans["x_s01"].start, spans["x_s01"].end) == (6, 12)
    assert (spans["x_s01_t02"].start, spans["x_s01_t02"].end) == (10, 12)
    assert spans["x_story"].turns[0] == Turn("Describe the movie.", story.overview, "summary")
    assert spans["x_s01_t02"].subtitles == ["Ben: line f-1-2-0.", "Anna: line f-1-2-1."]


def test_dialogue_questions_are_grounded_and_unambiguous() -> None:
    tiny = TinyStory(
        items=[
            StoryItem(kind="dialogue", text="Ben: Ready?"),
            StoryItem(kind="frame", text="generate an image in Noir style: at the dock, Anna is standing."),
            StoryItem(kind="dialogue", text="Anna: The boat is late."),
            StoryItem(kind="dialogue", text="Ben: It always is."),
            StoryItem(kind="frame", text="at the dock, Ben is sitting"),
            StoryItem(kind="dialogue", text="Anna: Ready?"),
            StoryItem(kind="dialogue", text="(thunder)"),
        ]
    )
    qas = dialogue_questions(tiny, limit=100)
    pairs = {(q.kind, q.question): q.answer for q in qas}
    # "Ready?" is said twice: no speaker question about it; "thunder" has no speaker.
    assert ("dialogue_speaker", 'Who says "The boat is late."?') in pairs
    assert not any('Who says "Ready?"' in q for _, q in pairs)
    assert (
        pairs[("dialogue_after_frame", "What does Ben say at the start of the clip?")] == 'Ben says: "Ready?"'
    )
    assert (
        pairs[
            ("dialogue_after_frame", 'What does Anna say after the moment "at the dock, Anna is standing"?')
        ]
        == 'Anna says: "The boat is late."'
    )
    assert pairs[("dialogue_reply", 'How does Ben reply when Anna says "The boat is late."?')] == (
        'Ben replies: "It always is."'
    )
    # A small limit still takes one of each kind first, and the result is deterministic.
    assert [q.kind for q in dialogue_questions(tiny, limit=3)] == [
        "dialogue_speaker",
        "dialogue_after_frame",
        "dialogue_reply",
    ]
    assert dialogue_questions(tiny, limit=3) == dialogue_questions(tiny, limit=3)


def test_multiple_choice_candidates_are_distinct_and_seeded() -> None:
    turns = [Turn(f"Q{i}?", f"Answer {i}.", "what") for i in range(6)]
    turns.append(Turn("Who?", "Anna.", "dialogue_speaker"))
    span = SpanQA("x_story", "x", "story", 0, 4, turns=turns)
    pool = formats.answer_pool([span])
    pool["what"] += ["answer 1.", "  Answer 2. "]  # near-duplicates must not become extra candidates
    visual = formats.Visual(video="videos/x/a.mp4", frames=())
    items, skipped = formats.multiple_choice(span, visual, pool, num_choices=4, seed=3)
    assert skipped == 0 and len(items) == 7
    positions = set()
    for item, turn in zip(items, turns, strict=True):
        assert item["answer"] == turn.answer and item["answer"] in item["candidates"]
        normalised = [" ".join(c.split()).casefold() for c in item["candidates"]]
        assert len(set(normalised)) == 4
        positions.add(item["candidates"].index(item["answer"]))
    assert len(positions) > 1
    assert formats.multiple_choice(span, visual, pool, num_choices=4, seed=3)[0] == items
    assert formats.multiple_choice(span, visual, pool, num_choices=4, seed=4)[0] != items
    # Too few distinct answers in the story: the item is skipped, not padded with repeats.
    lonely = SpanQA("y_story", "y", "story", 0, 1, turns=[Turn("Q?", "A.", "what"), Turn("R?", "a.", "what")])
    assert formats.multiple_choice(lonely, visual, formats.answer_pool([lonely]), num_choices=2, seed=0) == (
        [],
        2,
    )
