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

``load_story``, the entry point for story files from callers and storage, checks them against the
``limits`` settings (``dreamframe.limits``): file size, nesting depth, the length of every text field,
counts (at least one frame), no control characters; errors name the path inside the file as written
(``story.img_diag.12.1``, ``story.substories.0.title``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dreamframe.config import LimitsSettings
from dreamframe.errors import InvalidArgument
from dreamframe.limits import (
    check_count,
    check_text,
    current_limits,
    json_depth,
    load_json_object,
    short_repr,
)

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
                raise ValueError(f"character {short_repr(character.name)} appears twice")
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
        tiny story, and its QA the story's QA, so exporting gives back the same file. Only the JSON's
        size and depth are limited here; ``load_story`` is the checked entry point for story files."""
        return cls._from_reference_object(_load_json(data, "story", current_limits()), None)

    @classmethod
    def _from_reference_object(cls, obj: dict[str, Any], limits: LimitsSettings | None) -> Story:
        ref = _validated(ReferenceStory, obj, "story")
        if limits is not None:
            ref.check_limits(limits, "story")
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
        """Read the native format (size and depth limited; ``load_story`` checks the content too)."""
        return cls._from_native_object(_load_json(data, "story", current_limits()), None)

    @classmethod
    def _from_native_object(cls, obj: dict[str, Any], limits: LimitsSettings | None) -> Story:
        story = _validated(cls, obj, "story")
        if limits is not None:
            story.check_limits(limits, "story")
        return story

    # --- limits --------------------------------------------------------------------------------
    def check_limits(self, limits: LimitsSettings, field: str = "story") -> None:
        """Every text field and count within ``limits`` (see dreamframe.limits); errors name the path."""
        lim = limits

        def text(value: str, max_chars: int, path: str) -> None:
            check_text(value, max_chars=max_chars, field=f"{field}.{path}")

        def count(items: list[Any], maximum: int, path: str, what: str) -> None:
            check_count(len(items), maximum=maximum, field=f"{field}.{path}", what=what)

        text(self.title, lim.name_chars, "title")
        text(self.style_keyword, lim.name_chars, "style_keyword")
        text(self.theme, lim.theme_chars, "theme")
        text(self.overview, lim.overview_chars, "overview")
        text(self.style_description, lim.description_chars, "style_description")
        count(self.locations, lim.locations, "locations", "locations")
        for i, location in enumerate(self.locations):
            text(location, lim.name_chars, f"locations.{i}")
        count(self.characters, lim.characters, "characters", "characters")
        for i, character in enumerate(self.characters):
            text(character.name, lim.name_chars, f"characters.{i}.name")
            text(character.appearance, lim.description_chars, f"characters.{i}.appearance")
        count(self.substories, lim.substories, "substories", "substories")
        tiny_stories = [tiny for sub in self.substories for tiny in sub.tiny_stories]
        count(tiny_stories, lim.tiny_stories, "substories", "tiny stories")
        counts = _ItemCounts(lim, field)
        counts.qa(self.qa, f"{field}.qa")
        for s, sub in enumerate(self.substories):
            text(sub.scene, lim.description_chars, f"substories.{s}.scene")
            text(sub.content, lim.description_chars, f"substories.{s}.content")
            counts.qa(sub.qa, f"{field}.substories.{s}.qa")
            for t, tiny in enumerate(sub.tiny_stories):
                at = f"substories.{s}.tiny_stories.{t}"
                text(tiny.content, lim.description_chars, f"{at}.content")
                counts.qa(tiny.qa, f"{field}.{at}.qa")
                for i, item in enumerate(tiny.items):
                    counts.item(item.kind, item.text, f"{field}.{at}.items.{i}.text")
                    if item.prompt is not None:
                        text(item.prompt, lim.frame_text_chars, f"{at}.items.{i}.prompt")
        counts.done()


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

    def check_limits(self, limits: LimitsSettings, field: str = "story") -> None:
        """The same limits as ``Story.check_limits``, with the reference file's own paths."""
        check_text(self.overview, max_chars=limits.overview_chars, field=f"{field}.overview")
        check_count(
            len(self.character), maximum=limits.characters, field=f"{field}.character", what="characters"
        )
        for name, appearance in self.character.items():
            check_text(name, max_chars=limits.name_chars, field=f"{field}.character")
            check_text(appearance, max_chars=limits.description_chars, field=f"{field}.character.{name}")
        counts = _ItemCounts(limits, field)
        for i, (kind, text) in enumerate(self.img_diag):
            counts.item(kind, text, f"{field}.img_diag.{i}.1")
        counts.qa_pairs(((q.Question, q.Answer) for q in self.QA), f"{field}.QA", ("Question", "Answer"))
        counts.done(frames_field=f"{field}.img_diag")


class _ItemCounts:
    """Checks frames, dialogues and QA one by one and counts them across the whole story, so an
    over-long list is refused as soon as the count passes its limit."""

    def __init__(self, limits: LimitsSettings, field: str) -> None:
        self.limits, self.field = limits, field
        self.frames = self.dialogues = self.qa_count = 0

    def item(self, kind: str, text: str, field: str) -> None:
        lim = self.limits
        if kind == "frame":
            self.frames += 1
            check_count(self.frames, maximum=lim.frames, field=field, what="frames in the story")
            check_text(text, max_chars=lim.frame_text_chars, field=field)
        else:
            self.dialogues += 1
            check_count(self.dialogues, maximum=lim.dialogues, field=field, what="dialogues in the story")
            check_text(text, max_chars=lim.dialogue_chars, field=field)

    def qa(self, pairs: list[QA], field: str) -> None:
        texts = ((qa.question, qa.answer, qa.kind) for qa in pairs)
        self.qa_pairs(texts, field, ("question", "answer", "kind"))

    def qa_pairs(self, pairs: Any, field: str, names: tuple[str, ...]) -> None:
        lim = self.limits
        for i, texts in enumerate(pairs):
            self.qa_count += 1
            what = "QA pairs in the story"
            check_count(self.qa_count, maximum=lim.qa_pairs, field=f"{field}.{i}", what=what)
            for name, text in zip(names, texts, strict=True):
                limit = lim.name_chars if name == "kind" else lim.qa_chars
                check_text(text, max_chars=limit, field=f"{field}.{i}.{name}")

    def done(self, frames_field: str | None = None) -> None:
        # A story without frames renders nothing and trains on nothing: refuse it where it enters.
        if self.frames == 0:
            message = "has no frames; a story needs at least one"
            raise InvalidArgument(message, field=frames_field or self.field)


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


def load_story(
    data: dict[str, Any] | str | bytes, *, field: str = "story", limits: LimitsSettings | None = None
) -> Story:
    """Parse a story in either format within ``limits`` (default: the ``limits`` settings); errors name
    ``field`` and the bad path inside it."""
    limits = limits or current_limits()
    obj = _load_json(data, field, limits)
    try:
        if detect_format(obj) == "reference":
            return Story._from_reference_object(obj, limits)
        return Story._from_native_object(obj, limits)
    except InvalidArgument as exc:
        inner = exc.field.removeprefix("story") if exc.field else ""
        raise InvalidArgument(exc.message, field=f"{field}{inner}") from None


def _load_json(data: dict[str, Any] | str | bytes, field: str, limits: LimitsSettings) -> dict[str, Any]:
    if isinstance(data, dict):
        if json_depth(data) > limits.json_depth:
            raise InvalidArgument(f"nested more than {limits.json_depth} levels deep", field=field)
        return data
    return load_json_object(data, field=field, limits=limits, what="a story file")


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
