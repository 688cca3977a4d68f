"""The story model: reference-format round trips, frame prompts, and errors that name the field."""

from __future__ import annotations

import json

import pytest

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
