"""Checks an answer must pass beyond its JSON Schema. Each returns a list of problems, written for the
LLM to read (they go back to it in the repair turn); empty means the answer is usable.

Two kinds of check:
- structural (always): what the story model and later stages need — unique character names and
  locations, frame text that starts with the style prefix and keyword. Counts, the verb set, places and
  speakers from the known lists, the appearance form and question words are already fixed by the schema.
- semantic (``strict`` only): what a sensible story needs and only a real model can write — the style
  description uses the keyword, scenes name a listed location, the overview and tiny stories name the
  main characters, frames name no people who are not main characters, no repeated text.
A randomly initialised model (the tiny preset) writes schema-valid noise, so it is held to the
structural checks only (validation mode ``structural``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from pydantic import BaseModel

from dreamframe.story import FRAME_PREFIX_RE

from .assemble import frame_text

STRICT = "strict"
STRUCTURAL = "structural"
MODES = (STRICT, STRUCTURAL)

_CAPITALISED = re.compile(r"\b[A-Z][a-zA-Z'-]*\b")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


def _mentions(text: str, name: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text, re.IGNORECASE) is not None


def _duplicates(values: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    dups: list[str] = []
    for value in values:
        key = " ".join(value.lower().split())
        if key in seen and value not in dups:
            dups.append(value)
        seen.add(key)
    return dups


def _qa_problems(path: str, questions: BaseModel) -> list[str]:
    problems = []
    for kind, pair in questions:
        if pair.answer.strip().lower() == pair.question.strip().lower():
            problems.append(f"{path}.{kind}: the answer repeats the question")
    return problems


def check_outline(outline: BaseModel, *, mode: str) -> list[str]:
    """Level 1."""
    problems: list[str] = []
    names = [c.name for c in outline.characters]
    for name in _duplicates(names):
        problems.append(
            f"characters: the name {name!r} is used twice; every main character needs its own name"
        )
    for place in _duplicates(outline.locations):
        problems.append(f"locations: {place!r} is listed twice; list distinct places")
    if mode != STRICT:
        return problems

    keyword = outline.style_keyword
    if not _mentions(outline.style_description, keyword):
        problems.append(f"style_description: must use the style keyword {keyword!r}")
    if not any(_mentions(outline.overview, n) for n in names):
        problems.append(f"overview: must name the main characters ({', '.join(names)})")
    for i, c in enumerate(outline.characters):
        if c.looks_like.lower() in {n.lower() for n in names}:
            problems.append(f"characters[{i}].looks_like: must be a celebrity, not a character of the story")
    for i, sub in enumerate(outline.substories):
        if not any(place.lower() in sub.scene.lower() for place in outline.locations):
            listed = "; ".join(outline.locations)
            problems.append(
                f"substories[{i}].scene: must name one of the locations exactly as listed ({listed})"
            )
        problems += _qa_problems(f"substories[{i}].qa", sub.qa)
    problems += _qa_problems("qa", outline.qa)
    for text in _duplicates(s.content for s in outline.substories):
        problems.append(f"substories: the content {text[:60]!r} is repeated; each substory tells a new part")
    return problems


def check_part(part: BaseModel, *, mode: str) -> list[str]:
    """Level 2: one substory's tiny stories."""
    if mode != STRICT:
        return []
    problems: list[str] = []
    for i, tiny in enumerate(part.tiny_stories):
        for name in tiny.characters:
            if not _mentions(tiny.content, name):
                problems.append(
                    f"tiny_stories[{i}].content: lists {name!r} among its characters but does not name them"
                )
    for text in _duplicates(t.content for t in part.tiny_stories):
        problems.append(
            f"tiny_stories: the content {text[:60]!r} is repeated; each tiny story is a new moment"
        )
    problems += _qa_problems("qa", part.qa)
    return problems


def known_words(*texts: str) -> set[str]:
    """Every word of the given texts, lower case: capitalised words found here are not new people."""
    words: set[str] = set()
    for text in texts:
        words.update(w.lower() for w in _WORD.findall(text))
    return words


def check_scenes(scenes: BaseModel, *, keyword: str, known: set[str], mode: str) -> list[str]:
    """Level 3: one tiny story's frames, dialogues and QA. ``known`` are the words of the story so far
    (names, places, title, contents) — a capitalised word outside them in a frame is an unknown person."""
    problems: list[str] = []
    for i, frame in enumerate(scenes.frames):
        match = FRAME_PREFIX_RE.match(frame_text(keyword, frame))
        if not match or match.group("keyword") != keyword:
            problems.append(f"frames[{i}]: cannot be written as 'generate an image in {keyword} style: ...'")
    if mode != STRICT:
        return problems

    for i, frame in enumerate(scenes.frames):
        detail = frame.detail.strip()
        if detail.split(" ", 1)[0].lower() in {"is", "are", "was", "were"}:
            problems.append(
                f"frames[{i}].detail: continues '{frame.character} is {frame.action}'; do not repeat 'is'"
            )
        unknown = sorted({w for w in _CAPITALISED.findall(detail) if w.lower() not in known})
        if unknown:
            problems.append(
                f"frames[{i}].detail: names {', '.join(unknown)}, who are not main characters; "
                "use only the main characters' names"
            )
    for i, line in enumerate(scenes.dialogues):
        if line.line.strip().lower().startswith(f"{line.speaker.lower()}:"):
            problems.append(f"dialogues[{i}].line: give only the spoken words, without the speaker's name")
    for i, pair in enumerate(scenes.qa):
        if pair.answer.strip().lower() == pair.question.strip().lower():
            problems.append(f"qa[{i}]: the answer repeats the question")
    for text in _duplicates(f"{f.location}|{f.character}|{f.action}|{f.detail}" for f in scenes.frames):
        problems.append(
            f"frames: the frame {text.replace('|', ' ')[:80]!r} is repeated; each frame shows a new moment"
        )
    return problems
