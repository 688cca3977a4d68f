"""The story model: what plot-llm writes and every later stage reads.

A story expands in three levels, as the DreamFrame paper's reference does:

    Story (title, overview, style, locations, characters, level-1 QA)
      └─ Substory × 11 (scene, content, what/why/how/where QA)
           └─ TinyStory × 11 (content, QA)
                └─ items: 11 frames and 6 dialogues, in story order

Frames are numbered 0..N-1 in story order across the whole story; that index names the keyframe file
(``frames/000123.png``) and its seed (``seed_offset + index``).

The reference's interchange format (``{"overview", "character", "img_diag", "QA"}``) is imported and
exported exactly by ``from_reference`` / ``to_reference``: ``to_reference(from_reference(x)) == x``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dreamframe.errors import InvalidArgument

SCHEMA_VERSION = 1
FRAME_PREFIX_RE = re.compile(r"^\s*generate an image in (?P<keyword>.+?) style\s*:\s*", re.IGNORECASE)
# "a man looks like Tom Hanks in blue" — the reference's way of keeping a character's look fixed.
APPEARANCE_RE = re.compile(r"^an? (man|woman|boy|girl|person) looks like .+ in .+$", re.IGNORECASE)


def _non_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False, validate_assignment=True)


class QA(_Model):
    question: str
    answer: str
    # What the question asks about (what/why/how/where/dialogue/...); free text, optional.
    kind: str = ""

    _check = field_validator("question", "answer")(_non_blank)


class Character(_Model):
    name: str
    # "a man looks like <celebrity> in <colour>": replaces the name in frame text before rendering.
    appearance: str

    _check = field_validator("name", "appearance")(_non_blank)


class StoryItem(_Model):
    kind: Literal["frame", "dialogue"]
    # Frames: the scene as written (may use character names). Dialogues: "Name: line".
    text: str
    # Frames only: the exact text-to-image prompt (names replaced, style prefix), when fixed already —
    # set for imported reference stories, whose frame text is already resolved.
    prompt: str | None = None

    _check = field_validator("text")(_non_blank)

    @model_validator(mode="after")
    def _prompt_only_for_frames(self) -> StoryItem:
        if self.prompt is not None and self.kind != "frame":
            raise ValueError("only frames have a prompt")
        return self


class TinyStory(_Model):
    content: str = ""
    items: list[StoryItem] = Field(default_factory=list)
    qa: list[QA] = Field(default_factory=list)


class Substory(_Model):
    scene: str = ""
    content: str = ""
    qa: list[QA] = Field(default_factory=list)
    tiny_stories: list[TinyStory] = Field(default_factory=list)


class Story(_Model):
    schema_version: int = SCHEMA_VERSION
    title: str = ""
    theme: str = ""
    overview: str
    # One word that names the look (e.g. "Dramatic"); every frame prompt says "in <keyword> style".
    style_keyword: str = ""
    style_description: str = ""
    locations: list[str] = Field(default_factory=list)
    characters: list[Character] = Field(default_factory=list)
    qa: list[QA] = Field(default_factory=list)
    substories: list[Substory] = Field(default_factory=list)

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value != SCHEMA_VERSION:
            raise ValueError(f"unsupported schema version {value} (this build reads {SCHEMA_VERSION})")
        return value

    @field_validator("characters")
    @classmethod
    def _unique_names(cls, value: list[Character]) -> list[Character]:
        seen: set[str] = set()
        for character in value:
            if character.name in seen:
                raise ValueError(f"character {character.name!r} appears twice")
            seen.add(character.name)
        return value

    # --- traversal -----------------------------------------------------------------------------
    def frames(self) -> Iterator[FrameRef]:
        """Every frame in story order, with its global index and where it sits."""
        index = 0
        for s, sub in enumerate(self.substories):
            for t, tiny in enumerate(sub.tiny_stories):
                for item in tiny.items:
                    if item.kind == "frame":
                        yield FrameRef(index, s, t, item)
                        index += 1

    @property
    def frame_count(self) -> int:
        return sum(1 for _ in self.frames())

    def frame_prompts(self) -> list[str]:
        """The text-to-image prompt of every frame, in order (names → appearance, style prefix)."""
        return [self.frame_prompt(ref.item) for ref in self.frames()]

    def frame_prompt(self, item: StoryItem) -> str:
        if item.prompt is not None:
            return item.prompt
        return resolve_frame_text(item.text, self.characters, self.style_keyword)

    def all_qa(self) -> list[QA]:
        """Every QA pair, depth first: story, then each substory followed by its tiny stories."""
        out = list(self.qa)
        for sub in self.substories:
            out.extend(sub.qa)
            for tiny in sub.tiny_stories:
                out.extend(tiny.qa)
        return out

    # --- reference format ----------------------------------------------------------------------
    def to_reference(self) -> dict[str, Any]:
        """The reference story file: overview, character, img_diag (frames+dialogues in order), QA."""
        img_diag: list[list[str]] = []
        for sub in self.substories:
            for tiny in sub.tiny_stories:
                for item in tiny.items:
                    text = self.frame_prompt(item) if item.kind == "frame" else item.text
                    img_diag.append([item.kind, text])
        return {
            "overview": self.overview,
            "character": {c.name: c.appearance for c in self.characters},
            "img_diag": img_diag,
            "QA": [{"Question": qa.question, "Answer": qa.answer} for qa in self.all_qa()],
        }

    @classmethod
    def from_reference(cls, data: dict[str, Any] | str | bytes) -> Story:
        """Read a reference story file. Its flat frame/dialogue list becomes one substory with one
        tiny story, and its QA the story's QA, so exporting gives back the same file."""
        ref = _validated(ReferenceStory, _load_json(data, "story"), "story")
        items = [
            StoryItem(kind=kind, text=text, prompt=text if kind == "frame" else None)
            for kind, text in ref.img_diag
        ]
        keyword = ""
        for kind, text in ref.img_diag:
            match = FRAME_PREFIX_RE.match(text) if kind == "frame" else None
            if match:
                keyword = match.group("keyword").strip()
                break
        return cls(
            overview=ref.overview,
            style_keyword=keyword,
            characters=[Character(name=n, appearance=a) for n, a in ref.character.items()],
            qa=[QA(question=q.Question, answer=q.Answer) for q in ref.QA],
            substories=[Substory(tiny_stories=[TinyStory(items=items)])] if items else [],
        )

    # --- native JSON ---------------------------------------------------------------------------
    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True)

    @classmethod
    def from_json(cls, data: dict[str, Any] | str | bytes) -> Story:
        return _validated(cls, _load_json(data, "story"), "story")


@dataclass(frozen=True)
class FrameRef:
    index: int
    substory: int
    tiny_story: int
    item: StoryItem


class ReferenceQA(BaseModel):
    model_config = ConfigDict(extra="forbid")
    Question: str
    Answer: str


class ReferenceStory(BaseModel):
    """The reference story file, exactly as the reference writes it."""

    model_config = ConfigDict(extra="forbid")
    overview: str
    character: dict[str, str]
    img_diag: list[tuple[Literal["frame", "dialogue"], str]]
    QA: list[ReferenceQA]


def resolve_frame_text(text: str, characters: list[Character], style_keyword: str) -> str:
    """Frame text → render prompt: each character name becomes its appearance (longest names first, whole
    words only, so "Ann" does not touch "Anna"), and the prompt starts "generate an image in <kw> style:"."""
    body = FRAME_PREFIX_RE.sub("", text, count=1).strip()
    if characters:
        # One pass over all names, so an appearance that mentions another name is never rewritten.
        appearance = {c.name: c.appearance for c in characters}
        names = sorted(appearance, key=len, reverse=True)
        pattern = re.compile(r"(?<!\w)(" + "|".join(re.escape(n) for n in names) + r")(?!\w)")
        body = pattern.sub(lambda m: appearance[m.group(1)], body)
    if style_keyword:
        return f"generate an image in {style_keyword} style: {body}"
    return body


def detect_format(data: dict[str, Any]) -> Literal["native", "reference"]:
    """Which story format a parsed JSON object is in (reference files have "img_diag")."""
    return "reference" if "img_diag" in data else "native"


def load_story(data: dict[str, Any] | str | bytes, *, field: str = "story") -> Story:
    """Parse a story in either format; errors name ``field`` and the bad path inside it."""
    obj = _load_json(data, field)
    try:
        if detect_format(obj) == "reference":
            return Story.from_reference(obj)
        return Story.from_json(obj)
    except InvalidArgument as exc:
        inner = exc.field.removeprefix("story") if exc.field else ""
        raise InvalidArgument(exc.message, field=f"{field}{inner}") from None


def _load_json(data: dict[str, Any] | str | bytes, field: str) -> dict[str, Any]:
    if isinstance(data, dict):
        return data
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(
            f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", field=field
        ) from None
    except UnicodeDecodeError:
        raise InvalidArgument("not UTF-8 text", field=field) from None
    if not isinstance(obj, dict):
        raise InvalidArgument(f"must be a JSON object, got {type(obj).__name__}", field=field)
    return obj


def _validated(model: type[BaseModel], obj: dict[str, Any], field: str) -> Any:
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise validation_error_to_invalid_argument(exc, field) from None


def validation_error_to_invalid_argument(exc: ValidationError, field: str) -> InvalidArgument:
    """The first pydantic error as an InvalidArgument naming the dotted path (``story.substories.2.qa``)."""
    first = exc.errors()[0]
    path = ".".join(str(part) for part in (field, *first["loc"]))
    more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
    message = first["msg"].removeprefix("Value error, ")
    return InvalidArgument(f"{message}{more}", field=path)
