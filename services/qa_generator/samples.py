"""A story → its QA at three granularities, each with the span of frames it is about.

- ``story``: every frame; the level-1 QA plus "Describe the movie." answered by the overview.
- ``substory``: the substory's frames; its QA (plus its content as a description, when written).
- ``tiny_story``: the tiny story's frames; its QA, its content, and dialogue-grounded questions.

An open description request ("Describe in detail …", "Summarize …") is a ``summary`` turn whatever the
story calls it: it trains as a conversation, never as a multiple-choice item.

A tiny story longer than ``max_span_frames`` (a reference-format story is one tiny story of every frame)
keeps its description and QA on the whole span; its dialogue-grounded questions and subtitles go to
parts of at most that many frames (``<tiny>_p<k>``), so a question about a moment comes with a video short
enough to show it.

Frame indices are global story-order indices (``Story.frames()``), so a span ``[start, end)`` names the
keyframe files ``start .. end-1`` directly. Spans without frames (a substory nobody illustrated) have
no video and are left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from dreamframe.story import QA, Story, StoryItem, TinyStory

from .dialogue import dialogue_questions

STORY, SUBSTORY, TINY_STORY = "story", "substory", "tiny_story"
LEVELS = (STORY, SUBSTORY, TINY_STORY)
SUMMARY = "summary"
DEFAULT_KIND = "qa"
# An instruction to describe or summarise, not a question with one short answer.
_OPEN_DESCRIPTION_RE = re.compile(
    r"^\W*(?:please\s+|(?:can|could|would)\s+you\s+)?"
    r"(?:describe|summari[sz]e|narrate|retell|recount|recap|explain\s+what\s+happens"
    r"|give\s+(?:me\s+|us\s+)?an?\s+(?:\w+\s+)?(?:summary|overview|description|account|synopsis)"
    r"|tell\s+(?:me\s+|us\s+)?(?:about|what\s+happens))\b",
    re.IGNORECASE,
)

DESCRIBE_PROMPTS = {
    STORY: "Describe the movie.",
    SUBSTORY: "Describe what happens in this part of the movie.",
    TINY_STORY: "Describe what happens in this clip.",
}


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str
    # what/why/how/where/..., a dialogue_* kind, "summary", or "qa" when the story did not say.
    kind: str


@dataclass
class SpanQA:
    """The QA about one span of frames: becomes one or more conversations over one video."""

    span_id: str
    story_id: str
    level: str
    start: int
    end: int
    turns: list[Turn] = field(default_factory=list)
    # Dialogue lines spoken in the span, in story order ("Name: line").
    subtitles: list[str] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return self.end - self.start


def is_open_description(question: str) -> bool:
    """True for a request to describe or summarise ("Describe in detail what happens.")."""
    return bool(_OPEN_DESCRIPTION_RE.match(question))


def story_spans(
    story: Story, story_id: str, *, dialogue_limit: int, max_span_frames: int = 0
) -> list[SpanQA]:
    """Every span of ``story`` that has frames, coarsest first (story, then each substory followed by its
    tiny stories and their parts), with its turns; spans without any turn are dropped.
    ``max_span_frames`` > 0 splits longer tiny stories' dialogue questions into parts (module docstring)."""
    ranges = _frame_ranges(story)
    if STORY not in ranges:
        return []
    start, end = ranges[STORY]
    spans = [
        SpanQA(
            span_id=f"{story_id}_story",
            story_id=story_id,
            level=STORY,
            start=start,
            end=end,
            turns=[*_describe(STORY, story.overview), *_turns(story.qa)],
            subtitles=[
                i.text for sub in story.substories for t in sub.tiny_stories for i in t.items if _spoken(i)
            ],
        )
    ]
    for s, sub in enumerate(story.substories):
        if (s, None) in ranges:
            start, end = ranges[(s, None)]
            spans.append(
                SpanQA(
                    span_id=f"{story_id}_s{s:02d}",
                    story_id=story_id,
                    level=SUBSTORY,
                    start=start,
                    end=end,
                    turns=[*_describe(SUBSTORY, sub.content), *_turns(sub.qa)],
                    subtitles=[i.text for t in sub.tiny_stories for i in t.items if _spoken(i)],
                )
            )
        for t, tiny in enumerate(sub.tiny_stories):
            if (s, t) not in ranges:
                continue
            start, end = ranges[(s, t)]
            span_id = f"{story_id}_s{s:02d}_t{t:02d}"
            parts = _parts(tiny, start, end, max_span_frames)
            whole = SpanQA(
                span_id=span_id,
                story_id=story_id,
                level=TINY_STORY,
                start=start,
                end=end,
                turns=[*_describe(TINY_STORY, tiny.content), *_turns(tiny.qa)],
                subtitles=[i.text for i in tiny.items if _spoken(i)],
            )
            spans.append(whole)
            if len(parts) == 1:
                whole.turns += _grounded(tiny, dialogue_limit)
                continue
            for k, (part, part_start, part_end) in enumerate(parts):
                spans.append(
                    SpanQA(
                        span_id=f"{span_id}_p{k:02d}",
                        story_id=story_id,
                        level=TINY_STORY,
                        start=part_start,
                        end=part_end,
                        turns=_grounded(part, dialogue_limit),
                        subtitles=[i.text for i in part.items if _spoken(i)],
                    )
                )
    return [span for span in spans if span.turns]


def _grounded(tiny: TinyStory, limit: int) -> list[Turn]:
    return [Turn(q.question, q.answer, q.kind) for q in dialogue_questions(tiny, limit)]


def _parts(tiny: TinyStory, start: int, end: int, max_frames: int) -> list[tuple[TinyStory, int, int]]:
    """The tiny story cut into as few, as even parts of at most ``max_frames`` frames as possible, each
    with its frame range; a dialogue belongs to the part of the frame shown before it."""
    n = end - start
    if max_frames <= 0 or n <= max_frames:
        return [(tiny, start, end)]
    count = -(-n // max_frames)
    sizes = [n // count + (1 if k < n % count else 0) for k in range(count)]
    bounds = [start + sum(sizes[:k]) for k in range(count + 1)]
    items: list[list[StoryItem]] = [[] for _ in range(count)]
    seen = 0
    for item in tiny.items:
        if item.kind == "frame":
            seen += 1
        part = 0 if seen == 0 else next(k for k in range(count) if seen <= bounds[k + 1] - start)
        items[part].append(item)
    return [(TinyStory(items=items[k]), bounds[k], bounds[k + 1]) for k in range(count)]


def remove_duplicate_turns(spans: list[SpanQA]) -> int:
    """Drop exact repeats of a (question, answer) pair within one story, keeping the first (the coarsest
    span that asks it); returns how many were dropped. Repeats across stories stay: another video."""
    removed = 0
    seen: set[tuple[str, str, str]] = set()
    for span in spans:
        kept = []
        for turn in span.turns:
            key = (span.story_id, turn.question.strip(), turn.answer.strip())
            if key in seen:
                removed += 1
                continue
            seen.add(key)
            kept.append(turn)
        span.turns = kept
    spans[:] = [span for span in spans if span.turns]
    return removed


def _frame_ranges(story: Story) -> dict[object, tuple[int, int]]:
    """[start, end) of global frame indices for the story, each substory (s, None) and tiny story (s, t)."""
    ranges: dict[object, tuple[int, int]] = {}
    for ref in story.frames():
        for key in (STORY, (ref.substory, None), (ref.substory, ref.tiny_story)):
            start, _ = ranges.get(key, (ref.index, ref.index))
            ranges[key] = (start, ref.index + 1)
    return ranges


def _turns(qas: list[QA]) -> list[Turn]:
    return [
        Turn(
            qa.question.strip(),
            qa.answer.strip(),
            SUMMARY if is_open_description(qa.question) else (qa.kind.strip().lower() or DEFAULT_KIND),
        )
        for qa in qas
    ]


def _describe(level: str, content: str) -> list[Turn]:
    return [Turn(DESCRIBE_PROMPTS[level], content.strip(), SUMMARY)] if content.strip() else []


def _spoken(item: StoryItem) -> bool:
    return item.kind == "dialogue"
