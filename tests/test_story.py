"""The story model: reference-format round trips, frame prompts, and errors that name the field."""

from __future__ import annotations

import json

import pytest

from dreamframe.config import LimitsSettings, get_settings
from dreamframe.errors import InvalidArgument
from dreamframe.story import (
    QA,
    Character,
    Story,
    StoryItem,
    Substory,
    TinyStory,
    load_story,
    resolve_frame_text,
)
from services.keyframe_renderer.prompts import MAX_PROMPT_WORDS, clip_prompt, frame_prompts

TOM = Character(name="Tom", appearance="a man looks like Tom Hanks in blue")
TOMMY = Character(name="Tommy", appearance="a boy looks like Tom Holland in red")


def reference_file() -> dict:
    """A reference story file as the reference pipeline writes it (frames already resolved)."""
    frames = [
        "generate an image in Dramatic style: at the harbour, a man looks like Tom Hanks in blue is standing",
        "generate an image in Dramatic style: at the harbour, a man looks like Tom Hanks in blue "
        "is looking at the sea",
    ]
    return {
        "overview": "A fisherman waits for a storm.",
        "character": {
            "Tom": "a man looks like Tom Hanks in blue",
            "Ann": "a woman looks like Meryl Streep in red",
        },
        "img_diag": [
            ["frame", frames[0]],
            ["dialogue", "Tom: The wind is turning."],
            ["frame", frames[1]],
            ["dialogue", "Ann: Come inside — ünïcödé too."],
        ],
        "QA": [
            {"Question": "Where does Tom stand?", "Answer": "At the harbour."},
            {"Question": "Why does Ann call him?", "Answer": "A storm is coming."},
        ],
    }


def native_story() -> Story:
    def tiny(n: int) -> TinyStory:
        return TinyStory(
            content=f"tiny {n}",
            items=[
                StoryItem(kind="frame", text=f"at the pier, Tom is walking ({n})"),
                StoryItem(kind="dialogue", text="Tom: Hello."),
                StoryItem(
                    kind="frame", text=f"generate an image in Noir style: at the bar, Tommy is sitting ({n})"
                ),
            ],
            qa=[QA(question=f"What does Tom do in {n}?", answer="He walks.", kind="what")],
        )

    return Story(
        title="Night Pier",
        theme="a detective story",
        overview="A detective and his nephew.",
        style_keyword="Noir",
        style_description="high-contrast black and white film noir",
        locations=["pier", "bar"],
        characters=[TOM, TOMMY],
        qa=[QA(question="Who is the detective?", answer="Tom.")],
        substories=[
            Substory(
                scene="pier",
                content="s0",
                qa=[QA(question="Where?", answer="Pier.")],
                tiny_stories=[tiny(0), tiny(1)],
            ),
            Substory(scene="bar", content="s1", tiny_stories=[tiny(2)]),
        ],
    )


def test_reference_file_round_trips_exactly(tmp_path):
    path = tmp_path / "story.json"
    path.write_text(json.dumps(reference_file(), ensure_ascii=False), encoding="utf-8")

    story = load_story(path.read_bytes())

    assert story.to_reference() == reference_file()
    assert story.style_keyword == "Dramatic"
    assert [c.name for c in story.characters] == ["Tom", "Ann"]
    assert story.frame_count == 2
    # and through our own format too
    assert Story.from_json(story.to_json()).to_reference() == reference_file()


def test_native_round_trip_and_traversal():
    story = native_story()
    again = Story.from_json(story.to_json())
    assert again == story
    refs = list(story.frames())
    assert [r.index for r in refs] == list(range(6))
    assert [(r.substory, r.tiny_story) for r in refs] == [(0, 0), (0, 0), (0, 1), (0, 1), (1, 0), (1, 0)]
    # depth first: story QA, substory 0 QA, its tiny stories, then substory 1's tiny story
    assert [qa.question for qa in story.all_qa()] == [
        "Who is the detective?",
        "Where?",
        "What does Tom do in 0?",
        "What does Tom do in 1?",
        "What does Tom do in 2?",
    ]


def test_export_resolves_names_and_style_prefix():
    ref = native_story().to_reference()
    frames = [text for kind, text in ref["img_diag"] if kind == "frame"]
    assert (
        frames[0]
        == "generate an image in Noir style: at the pier, a man looks like Tom Hanks in blue is walking (0)"
    )
    assert (
        frames[1]
        == "generate an image in Noir style: at the bar, a boy looks like Tom Holland in red is sitting (0)"
    )
    assert all(f.startswith("generate an image in Noir style: ") for f in frames)
    # dialogues keep names; characters map in order
    assert ["dialogue", "Tom: Hello."] in ref["img_diag"]
    assert ref["character"] == {"Tom": TOM.appearance, "Tommy": TOMMY.appearance}
    assert len(ref["QA"]) == 5


def test_name_replacement_is_single_pass_and_whole_word():
    out = resolve_frame_text("at a bar, Tom and Tommy talk with Tomas", [TOM, TOMMY], "Noir")
    # "Tom Holland" inside Tommy's appearance is not rewritten again; "Tomas" is a different word.
    assert out == (
        "generate an image in Noir style: at a bar, a man looks like Tom Hanks in blue and "
        "a boy looks like Tom Holland in red talk with Tomas"
    )


@pytest.mark.parametrize(
    ("payload", "field", "words"),
    [
        ("{not json", "story", "not valid JSON"),
        ("[1, 2]", "story", "JSON object"),
        (
            '{"overview": "o", "character": {}, "img_diag": [["frme", "x"]], "QA": []}',
            "story.img_diag.0.0",
            "frame",
        ),
        ('{"overview": "o", "character": {}, "img_diag": [["frame"]], "QA": []}', "story.img_diag.0.1", ""),
        (
            '{"overview": "o", "character": {}, "img_diag": [], "QA": [{"Question": "q"}]}',
            "story.QA.0.Answer",
            "required",
        ),
        (
            '{"overview": "o", "character": {}, "img_diag": [], "QA": [], "extra": 1}',
            "story.extra",
            "not permitted",
        ),
        ('{"character": {}, "img_diag": [], "QA": []}', "story.overview", "required"),
        (
            '{"overview": "o", "substories": [{"qa": [{"question": " ", "answer": "a"}]}]}',
            "story.substories.0.qa.0.question",
            "empty",
        ),
        ('{"overview": "o", "schema_version": 9}', "story.schema_version", "unsupported"),
        (
            '{"overview": "o", "characters": [{"name": "A", "appearance": "x"}, '
            '{"name": "A", "appearance": "y"}]}',
            "story.characters",
            "twice",
        ),
        (
            '{"overview": "o", "substories": [{"tiny_stories": [{"items": '
            '[{"kind": "dialogue", "text": "a", "prompt": "p"}]}]}]}',
            "story.substories.0.tiny_stories.0.items.0",
            "only frames",
        ),
    ],
)
def test_malformed_stories_name_the_field(payload, field, words):
    with pytest.raises(InvalidArgument) as info:
        load_story(payload)
    assert info.value.field == field
    assert words in info.value.message
    assert str(info.value).startswith(field)


def test_error_field_prefix_is_the_callers():
    with pytest.raises(InvalidArgument) as info:
        load_story(b'{"overview": 3}', field="stories.2.story")
    assert info.value.field == "stories.2.story.overview"


def test_non_utf8_is_rejected():
    with pytest.raises(InvalidArgument, match="UTF-8|JSON"):
        load_story(b"\xff\xfe{")


# --- limits (issue 19: hostile story files) -------------------------------------------------------


def _with(**changes) -> dict:
    return {**reference_file(), **changes}


@pytest.mark.parametrize(
    ("story", "field", "words"),
    [
        (_with(overview="o" * 20_001), "story.overview", "longer than 20000 characters"),
        (_with(img_diag=[["frame", "f" * 2_001]]), "story.img_diag.0.1", "longer than 2000"),
        (
            _with(img_diag=[["frame", "f"], ["dialogue", "d" * 2_001]]),
            "story.img_diag.1.1",
            "longer than 2000",
        ),
        (_with(QA=[{"Question": "q", "Answer": "a" * 4_001}]), "story.QA.0.Answer", "longer than 4000"),
        (_with(character={"n" * 201: "a man"}), "story.character", "longer than 200"),
        (_with(character={"Tom": "a" * 2_001}), "story.character.Tom", "longer than 2000"),
        (_with(img_diag=[["dialogue", "Tom: hi"]]), "story.img_diag", "no frames"),
        (_with(img_diag=[]), "story.img_diag", "no frames"),
        (_with(overview="line one\nline\ttwo\x00"), "story.overview", "U+0000 at position 17"),
        (_with(QA=[{"Question": "\x1b[2J", "Answer": "a"}]), "story.QA.0.Question", "U+001B"),
        (_with(img_diag=[["frame", "at sea\r"]]), "story.img_diag.0.1", "U+000D"),
    ],
    ids=[
        "overview",
        "frame",
        "dialogue",
        "answer",
        "name",
        "appearance",
        "only dialogues",
        "empty",
        "NUL",
        "escape",
        "carriage return",
    ],
)
def test_reference_files_over_the_limits_name_the_field(story, field, words):
    with pytest.raises(InvalidArgument) as info:
        load_story(json.dumps(story))
    assert info.value.field == field
    assert words in info.value.message


def native_dict() -> dict:
    return json.loads(native_story().to_json())


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("title",), "t" * 201, "story.title"),
        (("theme",), "t" * 501, "story.theme"),
        (("style_description",), "s\x00", "story.style_description"),
        (("locations", 1), "l" * 201, "story.locations.1"),
        (("characters", 0, "appearance"), "a" * 2_001, "story.characters.0.appearance"),
        (("substories", 1, "content"), "c" * 2_001, "story.substories.1.content"),
        (("substories", 0, "qa", 0, "kind"), "k" * 201, "story.substories.0.qa.0.kind"),
        (
            ("substories", 0, "tiny_stories", 1, "items", 2, "text"),
            "f" * 2_001,
            "story.substories.0.tiny_stories.1.items.2.text",
        ),
        (
            ("substories", 0, "tiny_stories", 0, "items", 0, "prompt"),
            "p\x07",
            "story.substories.0.tiny_stories.0.items.0.prompt",
        ),
    ],
)
def test_native_stories_over_the_limits_name_the_field(path, value, field):
    story = native_dict()
    target = story
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    with pytest.raises(InvalidArgument) as info:
        load_story(json.dumps(story))
    assert info.value.field == field


@pytest.mark.parametrize(
    ("limit", "field", "words"),
    [
        ({"frames": 5}, "story.substories.1.tiny_stories.0.items.2.text", "6 frames in the story"),
        ({"dialogues": 2}, "story.substories.1.tiny_stories.0.items.1.text", "3 dialogues"),
        ({"qa_pairs": 4}, "story.substories.1.tiny_stories.0.qa.0", "5 QA pairs"),
        ({"substories": 1}, "story.substories", "2 substories"),
        ({"tiny_stories": 2}, "story.substories", "3 tiny stories"),
        ({"characters": 1}, "story.characters", "2 characters"),
        ({"locations": 1}, "story.locations", "2 locations"),
    ],
)
def test_counts_are_limited_across_the_whole_story(limit, field, words):
    limits = LimitsSettings(**limit)
    with pytest.raises(InvalidArgument) as info:
        load_story(native_story().to_json(), limits=limits)
    assert info.value.field == field
    assert words in info.value.message
    load_story(native_story().to_json())  # the defaults take it


def test_deep_nesting_is_an_error_not_a_recursion_error():
    for data in (
        b"[" * 100_000 + b"]" * 100_000,
        b'{"overview": ' + b"[" * 100_000,  # unbalanced too
        b'{"a": ' * 33 + b"1" + b"}" * 33,
        "[" * 100_000,
    ):
        with pytest.raises(InvalidArgument) as info:
            load_story(data, field="upload")
        assert info.value.field == "upload"
        assert "nested more than 32 levels deep" in info.value.message
    # Brackets inside strings are text, not nesting.
    story = _with(overview="[" * 5_000 + "{" * 5_000)
    assert load_story(json.dumps(story)).overview == story["overview"]
    # Already-parsed input is held to the same depth.
    nested: list = []
    for _ in range(40):
        nested = [nested]
    with pytest.raises(InvalidArgument):
        load_story({**reference_file(), "QA": nested})


def test_size_and_container_count_are_checked_before_parsing():
    small = LimitsSettings(story_bytes=2_000, json_containers=100)
    with pytest.raises(InvalidArgument) as info:
        load_story(json.dumps(_with(overview="o" * 3_000)), limits=small)
    assert info.value.field == "story" and "3" in info.value.message and "at most 2000" in info.value.message
    with pytest.raises(InvalidArgument) as info:
        load_story("[" + "[]," * 200 + "[]]", limits=small)
    assert "more than 100 JSON arrays and objects" in info.value.message


def test_limits_come_from_the_settings(monkeypatch):
    monkeypatch.setenv("DREAMFRAME_LIMITS__OVERVIEW_CHARS", "10")
    get_settings.cache_clear()
    try:
        with pytest.raises(InvalidArgument) as info:
            load_story(json.dumps(reference_file()))
        assert info.value.field == "story.overview"
    finally:
        get_settings.cache_clear()


def test_long_prompts_are_cut_to_what_the_text_encoders_read():
    long_text = "at the harbour, " + " ".join(f"word{i}" for i in range(200))
    story = Story(
        overview="o",
        style_keyword="Noir",
        substories=[Substory(tiny_stories=[TinyStory(items=[StoryItem(kind="frame", text=long_text)])])],
    )
    prompt = frame_prompts(story, [0], "<noir-style>")[0]
    words = prompt.split()
    assert len(words) == MAX_PROMPT_WORDS == 75
    assert prompt.startswith("generate an image in <noir-style> style: at the harbour, word0 word1")
    assert clip_prompt(prompt) == prompt  # stable
    short = "generate an image in Noir style: a  man\tstands"
    assert clip_prompt(short) == short  # at most 75 words: untouched, spacing kept
