"""One LLaVA record: its conversation (``parse_conversation``) and its visual input (``media_of``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

VIDEO, IMAGE, FRAMES = "video", "image", "frames"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_PLACEHOLDERS = ("<image>", "<video>")


@dataclass(frozen=True)
class Conversation:
    system: str | None
    turns: tuple[tuple[str, str | None], ...]


def parse_conversation(record: dict) -> Conversation:
    """LLaVA ``conversations`` → (system, [(question, answer)]); raises ValueError saying what is wrong."""
    messages = record.get("conversations")
    if not isinstance(messages, list) or not messages:
        raise ValueError("no 'conversations' list")
    system = None
    turns: list[tuple[str, str | None]] = []
    expected = "user"
    for n, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("value"), str):
            raise ValueError(f"conversation turn {n} is not a {{'from', 'value'}} object")
        role = _ROLES.get(str(message.get("from", "")).lower())
        text = message["value"]
        if role == "system" and n == 0:
            system = text
            continue
        if role != expected:
            raise ValueError(f"conversation turn {n} is from {message.get('from')!r}, expected {expected}")
        if role == "user":
            turns.append((_strip_placeholders(text), None))
            expected = "assistant"
        else:
            if not text.strip():
                raise ValueError(f"conversation turn {n} has an empty answer")
            turns[-1] = (turns[-1][0], text)
            expected = "user"
    answered = tuple(t for t in turns if t[1] is not None)
    if not answered:
        raise ValueError("no answer to train on")
    return Conversation(system, answered)


def _strip_placeholders(text: str) -> str:
    for placeholder in _PLACEHOLDERS:
        text = text.replace(placeholder, "")
    return text.strip()


def media_of(record: dict) -> tuple[str, list[str]]:
    """(kind, relative-or-absolute keys) of a record's visual input; ValueError if it has none."""
    if isinstance(record.get("video"), str) and record["video"]:
        return VIDEO, [record["video"]]
    frames = record.get("frames")
    if isinstance(frames, list) and frames and all(isinstance(f, str) and f for f in frames):
        return FRAMES, list(frames)
    image = record.get("image")
    if isinstance(image, str) and image:
        return IMAGE, [image]
    if isinstance(image, list) and image and all(isinstance(i, str) and i for i in image):
        return FRAMES, list(image)
    raise ValueError("no 'video', 'frames' or 'image' (text-only samples are not supported)")


def image_count(kind: str, paths: Sequence[str], num_frames: int) -> int:
    """How many images the model sees for a sample of this kind: one image, or ``num_frames`` frames."""
    return 1 if kind == IMAGE else num_frames
