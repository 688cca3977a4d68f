"""The answer each level's LLM call must give, as pydantic models whose JSON Schema goes into the prompt
and into the decoder (response_format json_schema / xgrammar). Parsing an answer with the same model
checks exactly what the schema says, so one definition drives generation and validation.

The schema carries as much of the reference's format as a JSON Schema can:
- counts are array lengths (minItems = maxItems = the configured count);
- the frame's place, subject and verb are enums (the level-1 locations, the main characters' names and
  the reference's verbs), so "generate an image in <keyword> style: at <place>, <someone> is <doing>" is
  assembled by us and is right by construction;
- QA questions start with What/Why/How/Where by pattern; appearances are built from name / gender /
  look-alike / colour parts, each with its own pattern.

Strings are limited with ``pattern`` (printable ASCII without '"' or '\\', bounded length), not with
``maxLength``: xgrammar compiles maxLength to a class that lets control characters through, and a
pattern keeps a random model's strings short and escape-free. xgrammar 0.2.8 fails to compile a single
repetition bound above 128, so longer bounds are written as a chain of {0,128} pieces, and it mis-compiles
an optional group written ``(...)?`` (the group's first characters are dropped), so patterns say ``{0,1}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

# The reference's verbs, as the "-ing" form a frame uses ("Tom is standing ..."), plus facial expressions.
ACTIONS = (
    "standing",
    "sitting",
    "looking",
    "talking",
    "holding",
    "squatting",
    "walking",
    "hugging",
    "smiling",
    "laughing",
    "crying",
    "frowning",
)
GENDERS = ("man", "woman", "boy", "girl")
QUESTION_WORDS = ("What", "Why", "How", "Where")

_CHAR = r"[ !#-\[\]-~]"  # printable ASCII except '"' and '\'
_FIRST = r"[!#-\[\]-~]"  # the same without the space: no leading blanks
_MAX_REPEAT = 128  # xgrammar 0.2.8 rejects {m,n} with n > 128
NAME_PATTERN = r"^[A-Z][a-z]{1,11}( [A-Z][a-z]{1,11}){0,1}$"
KEYWORD_PATTERN = r"^[A-Z][a-z]{2,15}$"
CELEBRITY_PATTERN = r"^[A-Z][A-Za-z.'-]{1,15}( [A-Z][A-Za-z.'-]{1,15}){1,2}$"
COLOUR_PATTERN = r"^[a-z]{3,12}( [a-z]{3,12}){0,2}$"


def _repeat(char_class: str, low: int, high: int) -> str:
    """``char_class{low,high}`` written so that no single bound exceeds what xgrammar compiles."""
    if high <= _MAX_REPEAT:
        return f"{char_class}{{{low},{high}}}"
    parts = [f"{char_class}{{{low},{_MAX_REPEAT}}}"]
    left = high - _MAX_REPEAT
    while left > 0:
        step = min(left, _MAX_REPEAT)
        parts.append(f"{char_class}{{0,{step}}}")
        left -= step
    return "".join(parts)


def text_pattern(max_chars: int) -> str:
    """1..max_chars printable characters, not starting with a blank."""
    return f"^{_FIRST}{_repeat(_CHAR, 0, max_chars - 1)}$" if max_chars > 1 else f"^{_FIRST}$"


def question_pattern(word: str | tuple[str, ...], max_chars: int) -> str:
    words = word if isinstance(word, str) else "(" + "|".join(word) + ")"
    return rf"^{words} {_repeat(_CHAR, 1, max(1, max_chars))}\?$"


def location_pattern(max_chars: int) -> str:
    return rf"^[A-Za-z]{_repeat(r'[A-Za-z0-9 ,.-]', 1, max(1, min(max_chars, 60) - 1))}$"


@dataclass(frozen=True)
class TextLimits:
    """Longest free-text strings (characters): ``short`` for titles, scenes, details, lines and QA,
    ``long`` for overviews, descriptions and story content."""

    short: int = 160
    long: int = 600

    def __post_init__(self) -> None:
        if not 4 <= self.short <= self.long:
            raise ValueError(f"need 4 <= short ({self.short}) <= long ({self.long})")


_CONFIG = ConfigDict(extra="forbid")


def _str(pattern: str, description: str) -> Any:
    return (Annotated[str, Field(pattern=pattern)], Field(description=description))


def _list(item: Any, low: int, high: int, description: str) -> Any:
    return (Annotated[list[item], Field(min_length=low, max_length=high)], Field(description=description))


def _enum(values: tuple[str, ...], description: str) -> Any:
    return (Literal[values], Field(description=description))  # type: ignore[valid-type]


def _qa_set(limits: TextLimits, prefix: str) -> type[BaseModel]:
    """One question of each kind: what / why / how / where."""
    pair = {
        word: create_model(
            f"{prefix}{word}QA",
            __config__=_CONFIG,
            question=_str(question_pattern(word, limits.short), f'A "{word} ...?" question.'),
            answer=_str(text_pattern(limits.short), "Its answer, from the story."),
        )
        for word in QUESTION_WORDS
    }
    return create_model(
        f"{prefix}QuestionSet",
        __config__=_CONFIG,
        __doc__="Four question/answer pairs about the story so far: what, why, how and where.",
        **{
            word.lower(): (model, Field(description=f'The "{word}" question.'))
            for word, model in pair.items()
        },
    )


@lru_cache(maxsize=64)
def level1_model(
    substories: int, min_locations: int, max_characters: int, limits: TextLimits
) -> type[BaseModel]:
    """Level 1: the story's frame — title, overview, style, places, cast, QA and the substories."""
    character = create_model(
        "Character",
        __config__=_CONFIG,
        __doc__='A main character; rendered as "a <gender> looks like <looks_like> in <colour>".',
        name=_str(NAME_PATTERN, "First name (optionally a last name), capitalised, unique in the story."),
        gender=_enum(GENDERS, "Who the character is."),
        looks_like=_str(CELEBRITY_PATTERN, "A well-known celebrity the character looks like (full name)."),
        colour=_str(COLOUR_PATTERN, "The colour the character always wears, lower case (e.g. dark blue)."),
    )
    substory = create_model(
        "Substory",
        __config__=_CONFIG,
        scene=_str(text_pattern(limits.short), "Where and when it happens; name one of the locations."),
        content=_str(text_pattern(limits.long), "What happens in this part of the story."),
        qa=(_qa_set(limits, "Substory"), Field(description="What/why/how/where questions on this part.")),
    )
    return create_model(
        "Level1Answer",
        __config__=_CONFIG,
        __doc__="The whole story in outline.",
        title=_str(text_pattern(min(limits.short, 80)), "The story's title."),
        overview=_str(text_pattern(limits.long), "The plot in a few sentences."),
        style_keyword=_str(KEYWORD_PATTERN, "One capitalised word naming the visual style, e.g. Dramatic."),
        style_description=_str(text_pattern(limits.long), "The visual style, using the style keyword."),
        locations=_list(
            Annotated[str, Field(pattern=location_pattern(limits.short))],
            min_locations,
            2 * min_locations,
            "Distinct places where frames happen (e.g. the old harbour).",
        ),
        characters=_list(character, 1, max_characters, "The main characters."),
        qa=(_qa_set(limits, "Story"), Field(description="What/why/how/where questions on the whole story.")),
        substories=_list(substory, substories, substories, "The story's parts, in order."),
    )


@lru_cache(maxsize=256)
def level2_model(tiny_stories: int, names: tuple[str, ...], limits: TextLimits) -> type[BaseModel]:
    """Level 2: one substory told as a sequence of tiny stories, with QA about it."""
    tiny = create_model(
        "TinyStory",
        __config__=_CONFIG,
        content=_str(text_pattern(limits.long), "What happens, naming the characters involved."),
        characters=_list(_enum_type(names), 1, len(names), "The main characters who appear."),
    )
    return create_model(
        "Level2Answer",
        __config__=_CONFIG,
        __doc__="One substory as a sequence of tiny stories.",
        tiny_stories=_list(tiny, tiny_stories, tiny_stories, "The tiny stories, in order."),
        qa=(
            _qa_set(limits, "Part"),
            Field(description="What/why/how/where questions on these tiny stories."),
        ),
    )


@lru_cache(maxsize=1024)
def level3_model(
    frames: int,
    dialogues: int,
    qa: int,
    locations: tuple[str, ...],
    names: tuple[str, ...],
    limits: TextLimits,
) -> type[BaseModel]:
    """Level 3: one tiny story as keyframes with dialogues between them, and QA."""
    frame = create_model(
        "Frame",
        __config__=_CONFIG,
        __doc__='A keyframe: "at <location>, <character> is <action> <detail>".',
        location=_enum_type_field(locations, "Where the frame happens (one of the story's locations)."),
        character=_enum_type_field(names, "Who is in the frame."),
        action=_enum(ACTIONS, "What the character is doing."),
        detail=_str(
            text_pattern(limits.short), "The rest of the sentence, e.g. 'at the window with a letter'."
        ),
    )
    dialogue = create_model(
        "Dialogue",
        __config__=_CONFIG,
        after_frame=(
            Annotated[int, Field(ge=1, le=max(1, frames - 1))],
            Field(description="How many frames come before this line (1 = after the first frame)."),
        ),
        speaker=_enum_type_field(names, "Who speaks."),
        line=_str(text_pattern(limits.short), "What they say."),
    )
    pair = create_model(
        "QA",
        __config__=_CONFIG,
        question=_str(question_pattern(QUESTION_WORDS, limits.short), "A what/why/how/where question."),
        answer=_str(text_pattern(limits.short), "Its answer, from the frames and dialogues."),
    )
    return create_model(
        "Level3Answer",
        __config__=_CONFIG,
        __doc__="One tiny story as keyframes, dialogues between them, and questions.",
        frames=_list(frame, frames, frames, "The keyframes, in order."),
        dialogues=_list(dialogue, dialogues, dialogues, "Lines spoken between frames."),
        qa=_list(pair, qa, qa, "Questions about this tiny story."),
    )


def _enum_type(values: tuple[str, ...]) -> Any:
    return Literal[values]  # type: ignore[valid-type]


def _enum_type_field(values: tuple[str, ...], description: str) -> Any:
    return (_enum_type(values), Field(description=description))


@lru_cache(maxsize=1024)
def answer_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON Schema of an answer model (what the prompt shows and the decoder enforces). Computed once
    per model (it is not cheap, and every call needs it): treat the result as read-only."""
    return model.model_json_schema()


def schema_text(schema: dict[str, Any]) -> str:
    """Canonical JSON of a schema: the cache key and the prompt use this exact text."""
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))
