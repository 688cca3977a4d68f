"""Answers of the three levels → the story model. Frame text is assembled here from the frame's parts, so
the reference's "generate an image in <keyword> style: at <place>, <someone> is <doing>" holds by
construction; names stay in the text (the Story replaces them by appearances when it renders prompts)."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from dreamframe.story import QA, Character, Story, StoryItem, Substory, TinyStory

from .schemas import QUESTION_WORDS

_PREPOSITIONS = ("at ", "in ", "on ", "inside ", "outside ", "near ", "by ", "under ", "behind ")


def appearance(character: BaseModel) -> str:
    return f"a {character.gender} looks like {character.looks_like} in {character.colour}"


def characters(outline: BaseModel) -> list[Character]:
    return [Character(name=c.name, appearance=appearance(c)) for c in outline.characters]


def frame_text(keyword: str, frame: BaseModel) -> str:
    place = frame.location.strip()
    at = place if place.lower().startswith(_PREPOSITIONS) else f"at {place}"
    body = f"{at}, {frame.character} is {frame.action} {frame.detail.strip()}".rstrip()
    return f"generate an image in {keyword} style: {body}"


def dialogue_text(dialogue: BaseModel) -> str:
    return f"{dialogue.speaker}: {dialogue.line.strip()}"


def items(keyword: str, scenes: BaseModel) -> list[StoryItem]:
    """Frames in order with each dialogue line after the frame it follows (ties keep answer order)."""
    after: dict[int, list[BaseModel]] = {}
    for line in scenes.dialogues:
        after.setdefault(min(line.after_frame, len(scenes.frames)), []).append(line)
    out: list[StoryItem] = []
    for number, frame in enumerate(scenes.frames, start=1):
        out.append(StoryItem(kind="frame", text=frame_text(keyword, frame)))
        out.extend(StoryItem(kind="dialogue", text=dialogue_text(d)) for d in after.get(number, []))
    return out


def question_kind(question: str) -> str:
    first = question.split(" ", 1)[0]
    return first.lower() if first in QUESTION_WORDS else ""


def qa_set(questions: BaseModel) -> list[QA]:
    """A what/why/how/where set → four QA pairs, in that order."""
    pairs = []
    for word in QUESTION_WORDS:
        pair = getattr(questions, word.lower())
        pairs.append(QA(question=pair.question, answer=pair.answer, kind=word.lower()))
    return pairs


def qa_list(questions: Sequence[BaseModel]) -> list[QA]:
    return [QA(question=q.question, answer=q.answer, kind=question_kind(q.question)) for q in questions]


def build_story(
    theme: str,
    outline: BaseModel,
    parts: Sequence[BaseModel],
    scenes: Sequence[Sequence[BaseModel]],
) -> Story:
    """Level 1 outline + level 2 parts (one per substory) + level 3 scenes (per substory, per tiny story)."""
    keyword = outline.style_keyword
    substories = []
    for sub, part, sub_scenes in zip(outline.substories, parts, scenes, strict=True):
        tiny_stories = [
            TinyStory(content=tiny.content, items=items(keyword, scene), qa=qa_list(scene.qa))
            for tiny, scene in zip(part.tiny_stories, sub_scenes, strict=True)
        ]
        substories.append(
            Substory(
                scene=sub.scene,
                content=sub.content,
                qa=qa_set(sub.qa) + qa_set(part.qa),
                tiny_stories=tiny_stories,
            )
        )
    return Story(
        title=outline.title,
        theme=theme,
        overview=outline.overview,
        style_keyword=keyword,
        style_description=outline.style_description,
        locations=list(outline.locations),
        characters=characters(outline),
        qa=qa_set(outline.qa),
        substories=substories,
    )
