"""What every part of the renderer benchmark shares: the prompts it renders, the story the service renders
them from, and progress notes on stderr."""

from __future__ import annotations

import sys
import time

from dreamframe.story import Story, StoryItem, Substory, TinyStory

PROMPTS = [
    "at a rainy street corner, a man looks like Tom Hanks in blue is standing under a lamp",
    "in a small kitchen, a woman looks like Emma Stone in red is holding a cup of tea",
    "on a wooden pier at dusk, a man looks like Tom Hanks in blue is looking at the sea",
    "in a crowded train station, a woman looks like Emma Stone in red is walking fast",
]


def prompts(count: int) -> list[str]:
    """``count`` prompts, cycling through PROMPTS."""
    return [PROMPTS[i % len(PROMPTS)] for i in range(count)]


def bench_story(frames: int) -> Story:
    items = [StoryItem(kind="frame", text=PROMPTS[i % len(PROMPTS)] + f", shot {i}") for i in range(frames)]
    return Story(
        overview="benchmark",
        style_keyword="Dramatic",
        substories=[Substory(tiny_stories=[TinyStory(items=items)])],
    )


def note(message: str) -> None:
    """Progress on stderr, so a run cut short still says how far it got."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
