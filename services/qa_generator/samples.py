"""A story → its QA at three granularities, each with the span of frames it is about.

- ``story``: every frame; the level-1 QA plus "Describe the movie." answered by the overview.
- ``substory``: the substory's frames; its QA (plus its content as a description, when written).
- ``tiny_story``: the tiny story's frames; its QA, its content, and dialogue-grounded questions.

Frame indices are global story-order indices (``Story.frames()``), so a span ``[start, end)`` names the
keyframe files ``start .. end-1`` directly. Spans without frames (a substory nobody illustrated) have
no video and are left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dreamframe.story import QA, Story, StoryItem

from .dialogue import dialogue_questions

STORY, SUBSTORY, TINY_STORY = "story", "substory", "tiny_story"
LEVELS = (STORY, SUBSTORY, TINY_STORY)
SUMMARY = "summary"
DEFAULT_KIND = "qa"

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


def story_spans(story: Story, story_id: str, *, dialogue_limit: int) -> list[SpanQA]:
    """Every span of ``story`` that has frames, coarsest first (story, then each substory followed by its
    tiny stories), with its turns; spans without any turn are dropped."""
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
            grounded = [Turn(q.question, q.answer, q.kind) for q in dialogue_questions(tiny, dialogue_limit)]
            spans.append(
                SpanQA(
                    span_id=f"{story_id}_s{s:02d}_t{t:02d}",
                    story_id=story_id,
                    level=TINY_STORY,
                    start=start,
                    end=end,
                    turns=[*_describe(TINY_STORY, tiny.content), *_turns(tiny.qa), *grounded],
                    subtitles=[i.text for i in tiny.items if _spoken(i)],
                )
            )
    return [span for span in spans if span.turns]


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
        Turn(qa.question.strip(), qa.answer.strip(), (qa.kind.strip().lower() or DEFAULT_KIND)) for qa in qas
    ]


def _describe(level: str, content: str) -> list[Turn]:
    return [Turn(DESCRIBE_PROMPTS[level], content.strip(), SUMMARY)] if content.strip() else []


def _spoken(item: StoryItem) -> bool:
    return item.kind == "dialogue"
