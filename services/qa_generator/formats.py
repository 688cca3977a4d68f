"""Spans of QA → the dataset's records: LLaVA/LLaMA-VID conversations, MVBench-style multiple choice,
and frame lists. Pure functions of their inputs; the seed makes every random choice repeatable.

Visual reference of a record: ``"video"`` is the span's mp4, relative to the dataset folder (the
trainers' ``video_folder``). Conversations always have one: neither target loader reads a frame list
(profiles.py), so a build without mp4s is refused before it starts. Multiple-choice items and frame lists
without mp4s carry ``"frames"``, the keyframe object keys (in the bucket the manifest names), which our
evaluator reads.

The human turn puts any subtitles first, then the question: LLaMA-VID's text query is the human turn with
newlines removed, cut to its last 256 BERT tokens (truncation from the left, profiles.py), so a question
before 40 subtitle lines is lost.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .samples import SUMMARY, SpanQA, Turn

IMAGE_TOKEN = "<image>"

CONVERSATION_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "LLaVA / LLaMA-VID conversation list",
    "type": "array",
    "items": {
        "type": "object",
        "required": ["id", "video", "conversations"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string", "minLength": 1},
            "video": {"type": "string", "pattern": r"^videos/.+\.mp4$"},
            "conversations": {
                "type": "array",
                "minItems": 2,
                "items": {
                    "type": "object",
                    "required": ["from", "value"],
                    "additionalProperties": False,
                    "properties": {
                        "from": {"enum": ["human", "gpt"]},
                        "value": {"type": "string", "minLength": 1},
                    },
                },
            },
        },
    },
}

MULTIPLE_CHOICE_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "MVBench-style multiple-choice items",
    "type": "array",
    "items": {
        "type": "object",
        "required": ["question", "candidates", "answer"],
        "oneOf": [{"required": ["video"]}, {"required": ["frames"]}],
        "properties": {
            "video": {"type": "string"},
            "frames": {"type": "array", "items": {"type": "string"}},
            "question": {"type": "string", "minLength": 1},
            "candidates": {"type": "array", "minItems": 2, "uniqueItems": True, "items": {"type": "string"}},
            "answer": {"type": "string", "minLength": 1},
            "id": {"type": "string"},
            "task": {"type": "string"},
        },
    },
}


@dataclass(frozen=True)
class Visual:
    """Where a span's pixels are: an mp4 key relative to the dataset, or the frame keys."""

    video: str | None
    frames: tuple[str, ...]
    # The video shows every ``step``-th keyframe of the span (spans longer than the cap).
    step: int = 1

    def fields(self) -> dict[str, object]:
        return {"video": self.video} if self.video else {"frames": list(self.frames)}


def chunk_turns(turns: list[Turn], max_turns: int) -> list[list[Turn]]:
    """Split a span's turns into conversations of at most ``max_turns`` QA pairs, as evenly as possible."""
    n_chunks = -(-len(turns) // max_turns)
    size = -(-len(turns) // n_chunks) if n_chunks else 0
    return [turns[i : i + size] for i in range(0, len(turns), size)] if size else []


def subtitle_block(lines: list[str], max_lines: int) -> str:
    """'Subtitles:' and the lines, before the question (check.py finds the block by that first line)."""
    shown = lines[:max_lines]
    text = "Subtitles:\n" + "\n".join(shown)
    if len(lines) > max_lines:
        text += f"\n(... {len(lines) - max_lines} more lines)"
    return text


def conversations(
    span: SpanQA, visual: Visual, *, max_turns: int, include_subtitles: bool, max_subtitle_lines: int
) -> list[dict]:
    """The span's QA as LLaVA conversation records: "<image>\n" opens the first human turn (where both
    loaders' preprocess_multimodal puts it), then any subtitles, then the question (LLaMA-VID keeps the
    end of a long turn)."""
    if not visual.video:
        raise ValueError("conversation records need the span's video")  # options.py refuses earlier
    records = []
    for k, chunk in enumerate(chunk_turns(span.turns, max_turns)):
        messages = []
        for i, turn in enumerate(chunk):
            question = turn.question
            if i == 0:
                if include_subtitles and span.subtitles:
                    question = subtitle_block(span.subtitles, max_subtitle_lines) + "\n\n" + question
                question = f"{IMAGE_TOKEN}\n{question}"
            messages.append({"from": "human", "value": question})
            messages.append({"from": "gpt", "value": turn.answer})
        records.append({"id": f"{span.span_id}_c{k}", "video": visual.video, "conversations": messages})
    return records


def multiple_choice(
    span: SpanQA, visual: Visual, answer_pool: dict[str, list[str]], *, num_choices: int, seed: int
) -> tuple[list[dict], int]:
    """MVBench-shaped items for the span's QA (descriptions excluded), distractors drawn from
    ``answer_pool`` (kind → the story's answers of that kind); returns (items, skipped for too few)."""
    items, skipped = [], 0
    for i, turn in enumerate(span.turns):
        if turn.kind == SUMMARY:
            continue
        item_id = f"{span.span_id}_q{i}"
        rng = random.Random(f"{seed}\0{item_id}")
        distractors = pick_distractors(turn, answer_pool, num_choices - 1, rng)
        if len(distractors) < num_choices - 1:
            skipped += 1
            continue
        candidates = list(distractors)
        candidates.insert(rng.randrange(num_choices), turn.answer)
        items.append(
            {
                "id": item_id,
                "task": f"{span.level}/{turn.kind}",
                **visual.fields(),
                "question": turn.question,
                "candidates": candidates,
                "answer": turn.answer,
            }
        )
    return items, skipped


def pick_distractors(
    turn: Turn, answer_pool: dict[str, list[str]], count: int, rng: random.Random
) -> list[str]:
    """``count`` wrong answers, distinct from each other and from the right one (case and spacing
    ignored): answers of the same kind first (other speakers for a "who"), then any other answer."""
    taken = {_norm(turn.answer)}
    chosen: list[str] = []
    same = sorted(set(answer_pool.get(turn.kind, [])))
    other = sorted({a for kind, answers in answer_pool.items() if kind != turn.kind for a in answers})
    for pool in (same, other):
        rng.shuffle(pool)
        for answer in pool:
            if len(chosen) == count:
                return chosen
            if _norm(answer) not in taken:
                taken.add(_norm(answer))
                chosen.append(answer)
    return chosen


def answer_pool(spans: list[SpanQA]) -> dict[str, list[str]]:
    """One story's answers by kind (descriptions excluded): where distractors come from."""
    pool: dict[str, list[str]] = {}
    for span in spans:
        for turn in span.turns:
            if turn.kind != SUMMARY:
                pool.setdefault(turn.kind, []).append(turn.answer)
    return pool


def frame_list_entry(span: SpanQA, visual: Visual, frame_refs: list[dict]) -> dict:
    """One span's frames in story order: keys and sha256 of the keyframes, and its video if any."""
    entry = {
        "id": span.span_id,
        "story_id": span.story_id,
        "level": span.level,
        "start": span.start,
        "end": span.end,
        "frames": frame_refs[span.start : span.end],
    }
    if visual.video:
        entry["video"] = visual.video
        if visual.step > 1:
            entry["video_step"] = visual.step
    return entry


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()
