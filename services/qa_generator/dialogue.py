"""Questions grounded in a tiny story's dialogues, made by rule (no LLM), so they are deterministic.

A tiny story's items are frames and dialogues in story order; a dialogue sits between the frame before
it and the frame after it. Three kinds of question come out of that, each only where its answer is
unambiguous inside the tiny story:

- ``dialogue_speaker``: 'Who says "<line>"?' → '<speaker>.'  (the line occurs once)
- ``dialogue_after_frame``: 'What does <speaker> say after the moment "<frame>"?' → '<speaker> says: "<line>"'
  (the first line of that speaker after that frame; before the first frame: "at the start of the clip")
- ``dialogue_reply``: 'How does <B> reply when <A> says "<line>"?' → '<B> replies: "<reply>"'
  (two consecutive lines by different speakers)

They are interleaved kind by kind (speaker, after-frame, reply, speaker, ...) and cut at a limit, so a
small limit still gets every kind.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from dreamframe.story import FRAME_PREFIX_RE, TinyStory

# "Name: line" — a speaker is a short name without a colon.
_DIALOGUE_RE = re.compile(r"^\s*(?P<speaker>[^:\n]{1,60}?)\s*:\s*(?P<line>\S.*?)\s*$", re.DOTALL)

SPEAKER = "dialogue_speaker"
AFTER_FRAME = "dialogue_after_frame"
REPLY = "dialogue_reply"
KINDS = (SPEAKER, AFTER_FRAME, REPLY)


@dataclass(frozen=True)
class DialogueLine:
    speaker: str
    line: str
    # Text of the frame shown last before this line (None: the line comes before the first frame).
    after_frame: str | None


@dataclass(frozen=True)
class DialogueQA:
    question: str
    answer: str
    kind: str


def parse_dialogue(text: str) -> tuple[str, str] | None:
    """'Anna: Hello there.' → ('Anna', 'Hello there.'); None when no speaker is named."""
    match = _DIALOGUE_RE.match(text)
    if not match:
        return None
    return match.group("speaker"), match.group("line")


def frame_description(text: str) -> str:
    """Frame text without the render prefix ('generate an image in X style:') or a final period."""
    return FRAME_PREFIX_RE.sub("", text, count=1).strip().rstrip(".").strip()


def dialogue_lines(tiny: TinyStory) -> list[DialogueLine]:
    """The tiny story's dialogue lines that name a speaker, in order, with the frame before each."""
    lines: list[DialogueLine] = []
    last_frame: str | None = None
    for item in tiny.items:
        if item.kind == "frame":
            last_frame = frame_description(item.text)
            continue
        parsed = parse_dialogue(item.text)
        if parsed:
            lines.append(DialogueLine(speaker=parsed[0], line=parsed[1], after_frame=last_frame))
    return lines


def dialogue_questions(tiny: TinyStory, limit: int) -> list[DialogueQA]:
    """Up to ``limit`` unambiguous dialogue-grounded QA pairs for one tiny story."""
    if limit <= 0:
        return []
    lines = dialogue_lines(tiny)
    by_kind: dict[str, list[DialogueQA]] = {kind: [] for kind in KINDS}

    line_counts = Counter(d.line for d in lines)
    for d in lines:
        if line_counts[d.line] == 1:
            by_kind[SPEAKER].append(DialogueQA(f'Who says "{d.line}"?', f"{d.speaker}.", SPEAKER))

    # A speaker's first line after a frame answers "what does X say after it" unambiguously, as long as
    # that frame's text occurs once in the tiny story.
    frame_counts = Counter(frame_description(i.text) for i in tiny.items if i.kind == "frame")
    seen_after: set[tuple[str, str | None]] = set()
    for d in lines:
        if (d.speaker, d.after_frame) in seen_after:
            continue
        seen_after.add((d.speaker, d.after_frame))
        if d.after_frame is None:
            question = f"What does {d.speaker} say at the start of the clip?"
        elif frame_counts[d.after_frame] == 1:
            question = f'What does {d.speaker} say after the moment "{d.after_frame}"?'
        else:
            continue
        by_kind[AFTER_FRAME].append(DialogueQA(question, f'{d.speaker} says: "{d.line}"', AFTER_FRAME))

    for first, reply in zip(lines, lines[1:], strict=False):
        if first.speaker != reply.speaker and line_counts[first.line] == 1:
            question = f'How does {reply.speaker} reply when {first.speaker} says "{first.line}"?'
            by_kind[REPLY].append(DialogueQA(question, f'{reply.speaker} replies: "{reply.line}"', REPLY))

    out: list[DialogueQA] = []
    for round_ in range(max((len(v) for v in by_kind.values()), default=0)):
        for kind in KINDS:
            if round_ < len(by_kind[kind]) and len(out) < limit:
                out.append(by_kind[kind][round_])
    return out
