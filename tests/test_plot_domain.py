"""plot-llm's parts without an LLM: request checks, the answer schemas (and that xgrammar compiles them),
the semantic checks, and the assembly of answers into a reference-format story."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from pydantic import ValidationError

from dreamframe.errors import InvalidArgument
from dreamframe.story import APPEARANCE_RE, FRAME_PREFIX_RE, Story
from services.plot_llm import prompts
from services.plot_llm.assemble import build_story, frame_text, items
from services.plot_llm.options import MAX_THEME_CHARS, StoryOptions, validate_theme
from services.plot_llm.schemas import (
    ACTIONS,
    TextLimits,
    answer_schema,
    level1_model,
    level2_model,
    level3_model,
    question_pattern,
    text_pattern,
)
from services.plot_llm.scripted_server import _answer
from services.plot_llm.validation import (
    STRICT,
    STRUCTURAL,
    check_outline,
    check_part,
    check_scenes,
    known_words,
)

LIMITS = TextLimits(short=160, long=600)
NAMES = ("Tom", "Anna")
PLACES = ("the old harbour", "the lighthouse", "a quiet kitchen")


def scripted(model, **overrides):
    """A sensible answer for ``model`` (the scripted LLM's), parsed by the model itself."""
    data = json.loads(_answer(model.__name__, answer_schema(model), broken=False))
    data.update(overrides)
    return model.model_validate(data)


# --- request checks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"substories": 0}, "options.substories"),
        ({"tiny_stories": -1}, "options.tiny_stories"),
        ({"frames_per_tiny_story": 0}, "options.frames_per_tiny_story"),
        ({"dialogues_per_tiny_story": -2}, "options.dialogues_per_tiny_story"),
        ({"qa_per_tiny_story": 17}, "options.qa_per_tiny_story"),
        ({"min_locations": 0}, "options.min_locations"),
        ({"max_characters": 0}, "options.max_characters"),
        ({"temperature": 2.5}, "options.temperature"),
        ({"max_parallel_calls": 0}, "options.max_parallel_calls"),
    ],
)
def test_out_of_range_options_name_the_field(kwargs, field):
    with pytest.raises(InvalidArgument) as info:
        StoryOptions(**kwargs)
    assert info.value.field == field


def test_reference_defaults_and_call_count():
    options = StoryOptions()
    assert options.counts() == {
        "substories": 11,
        "tiny_stories": 11,
        "frames_per_tiny_story": 11,
        "dialogues_per_tiny_story": 6,
        "qa_per_tiny_story": 2,
        "min_locations": 12,
        "max_characters": 6,
    }
    assert options.total_calls == 133  # the reference's ~133 calls per story


@pytest.mark.parametrize("theme", ["", "   ", "x" * (MAX_THEME_CHARS + 1), "a\x00b"])
def test_bad_themes_are_refused(theme):
    with pytest.raises(InvalidArgument) as info:
        validate_theme(theme)
    assert info.value.field == "theme"


# --- schemas -----------------------------------------------------------------------------------------------


def test_level3_schema_fixes_counts_verbs_places_and_speakers():
    schema = answer_schema(level3_model(11, 6, 2, PLACES, NAMES, LIMITS))
    props, defs = schema["properties"], schema["$defs"]
    assert (props["frames"]["minItems"], props["frames"]["maxItems"]) == (11, 11)
    assert (props["dialogues"]["minItems"], props["dialogues"]["maxItems"]) == (6, 6)
    assert (props["qa"]["minItems"], props["qa"]["maxItems"]) == (2, 2)
    frame = defs["Frame"]["properties"]
    assert frame["action"]["enum"] == list(ACTIONS)
    assert frame["location"]["enum"] == list(PLACES)
    assert frame["character"]["enum"] == list(NAMES)
    after = defs["Dialogue"]["properties"]["after_frame"]
    assert (after["type"], after["minimum"], after["maximum"]) == ("integer", 1, 10)  # between frames
    # strings are bounded by pattern (not maxLength), every object is closed
    assert "maxLength" not in json.dumps(schema)
    assert all(d.get("additionalProperties") is False for d in defs.values())


def test_answers_outside_the_schema_are_rejected_by_the_same_model():
    model = level3_model(3, 2, 1, PLACES, NAMES, LIMITS)
    good = scripted(model).model_dump()
    model.model_validate(good)
    for broken in (
        {**good, "frames": good["frames"][:2]},  # too few frames
        {**good, "frames": [{**good["frames"][0], "action": "running"}, *good["frames"][1:]]},  # verb
        {**good, "frames": [{**good["frames"][0], "location": "the moon"}, *good["frames"][1:]]},  # place
        {**good, "dialogues": [{**good["dialogues"][0], "speaker": "Zorro"}, good["dialogues"][1]]},
        {**good, "dialogues": [{**good["dialogues"][0], "after_frame": 3}, good["dialogues"][1]]},
        {**good, "qa": [{"question": "Who is Tom?", "answer": "A man."}]},  # not what/why/how/where
        {**good, "qa": [{"question": 'What is "this"?', "answer": "A quote."}]},  # '"' is not allowed
    ):
        with pytest.raises(ValidationError):
            model.model_validate(broken)
        # jsonschema (what an OpenAI-compatible server enforces) agrees with pydantic
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, answer_schema(model))


def test_long_text_patterns_are_split_below_xgrammars_repeat_limit():
    pattern = text_pattern(400)
    assert all(int(n) <= 128 for n in re.findall(r",(\d+)\}", pattern))
    assert re.fullmatch(pattern, "a" * 400) and not re.fullmatch(pattern, "a" * 401)
    assert not re.fullmatch(pattern, " leading blank") and not re.fullmatch(pattern, "line\nbreak")
    assert re.fullmatch(question_pattern("Why", 20), "Why is the sky blue?")
    assert not re.fullmatch(question_pattern("Why", 20), "What is the sky?")


def test_xgrammar_compiles_every_level_schema():
    import xgrammar as xgr

    from dreamframe.models.text_llm import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok)))
    for model in (
        level1_model(11, 12, 6, LIMITS),
        level2_model(11, NAMES, LIMITS),
        level3_model(11, 6, 2, PLACES, NAMES, LIMITS),
    ):
        compiler.compile_json_schema(json.dumps(answer_schema(model)), any_whitespace=False)


# --- semantic checks ---------------------------------------------------------------------------------------


def test_outline_checks():
    model = level1_model(2, 3, 3, LIMITS)
    good = scripted(model)
    assert check_outline(good, mode=STRICT) == []
    data = good.model_dump()
    data["style_description"] = "Soft light."
    data["substories"][1]["scene"] = "somewhere else"
    bad = model.model_validate(data)
    problems = check_outline(bad, mode=STRICT)
    assert any(p.startswith("style_description") and "Dramatic" in p for p in problems)
    assert any(p.startswith("substories[1].scene") for p in problems)
    assert check_outline(bad, mode=STRUCTURAL) == []  # the tiny model is not held to content
    data["characters"].append({**data["characters"][0]})
    twice = model.model_validate(data)
    assert any("used twice" in p for p in check_outline(twice, mode=STRUCTURAL))


def test_part_checks():
    model = level2_model(2, NAMES, LIMITS)
    good = scripted(model)
    assert check_part(good, mode=STRICT) == []
    data = good.model_dump()
    data["tiny_stories"][0]["characters"] = ["Anna"]
    data["tiny_stories"][0]["content"] = "Nobody is named here."
    assert any("does not name them" in p for p in check_part(model.model_validate(data), mode=STRICT))


def test_scene_checks_find_unknown_people_and_repeated_verbs():
    model = level3_model(3, 2, 1, PLACES, NAMES, LIMITS)
    known = known_words("Tom", "Anna", *PLACES, "The Last Letter")
    good = scripted(model)
    assert check_scenes(good, keyword="Dramatic", known=known, mode=STRICT) == []
    data = good.model_dump()
    data["frames"][0]["detail"] = "next to Zorro and Anna"
    data["frames"][1]["detail"] = "is holding a cup"
    data["dialogues"][0]["line"] = f"{data['dialogues'][0]['speaker']}: hello"
    problems = check_scenes(model.model_validate(data), keyword="Dramatic", known=known, mode=STRICT)
    assert any(p.startswith("frames[0].detail") and "Zorro" in p and "Anna" not in p for p in problems)
    assert any(p.startswith("frames[1].detail") for p in problems)
    assert any(p.startswith("dialogues[0].line") for p in problems)
    assert check_scenes(model.model_validate(data), keyword="Dramatic", known=known, mode=STRUCTURAL) == []


# --- assembly ----------------------------------------------------------------------------------------------


def test_frames_follow_the_reference_form_and_dialogues_sit_between_frames():
    model = level3_model(3, 2, 1, PLACES, NAMES, LIMITS)
    data = scripted(model).model_dump()
    data["dialogues"][0]["after_frame"] = 2
    data["dialogues"][1]["after_frame"] = 1
    scenes = model.model_validate(data)
    text = frame_text("Dramatic", scenes.frames[0])
    assert text == (
        "generate an image in Dramatic style: at the old harbour, Tom is standing near the window in moment 1"
    )
    assert [i.kind for i in items("Dramatic", scenes)] == ["frame", "dialogue", "frame", "dialogue", "frame"]


def test_answers_assemble_into_a_story_that_round_trips_the_reference_format():
    outline = scripted(level1_model(2, 3, 3, LIMITS))
    names = tuple(c.name for c in outline.characters)
    parts = [scripted(level2_model(2, names, LIMITS)) for _ in range(2)]
    scene_model = level3_model(3, 2, 2, tuple(outline.locations), names, LIMITS)
    scenes = [[scripted(scene_model) for _ in range(2)] for _ in range(2)]
    story = build_story("a theme", outline, parts, scenes)
    assert story.frame_count == 2 * 2 * 3
    assert len(story.substories[0].qa) == 8  # level-1 what/why/how/where + level-2 ones
    reference = story.to_reference()
    assert Story.from_reference(reference).to_reference() == reference
    assert all(APPEARANCE_RE.match(a) for a in reference["character"].values())
    frames = [text for kind, text in reference["img_diag"] if kind == "frame"]
    assert all(FRAME_PREFIX_RE.match(f).group("keyword") == "Dramatic" for f in frames)
    # names are replaced by the character's look in the exported frame text
    assert "a man looks like Tom Hanks in blue is standing" in frames[0]
    assert not any(re.search(r"\bTom is\b", f) for f in frames)
    assert Story.from_json(story.to_json()) == story


def test_prompts_carry_the_schema_and_the_repair_turn_the_problems():
    schema = answer_schema(level2_model(2, NAMES, LIMITS))
    messages = prompts.conversation(
        "level1", schema, theme="a storm", substories=2, min_locations=3, max_characters=3
    )
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "a storm" in messages[1]["content"]
    assert json.loads(messages[1]["content"].splitlines()[-1]) == schema
    turns = prompts.repair_turns("{}", ["frames: too short", "qa: missing"])
    assert turns[0] == {"role": "assistant", "content": "{}"}
    assert "- frames: too short\n- qa: missing" in turns[1]["content"]
