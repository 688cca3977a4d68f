"""The prompt of every call, rendered from the template files in ``prompts/`` (``$name`` placeholders,
``string.Template``: the JSON in them needs no escaping)."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from string import Template
from typing import Any

from pydantic import BaseModel

Message = dict[str, str]


@cache
def template(name: str) -> Template:
    text = (resources.files("services.plot_llm") / "prompts" / f"{name}.txt").read_text(encoding="utf-8")
    return Template(text.strip())


def render(name: str, **values: Any) -> str:
    """The template filled in; a missing placeholder is a bug, so it raises."""
    return template(name).substitute(**{k: str(v) for k, v in values.items()})


def conversation(name: str, schema: dict[str, Any], **values: Any) -> list[Message]:
    """System prompt + the level's request, with the answer's JSON Schema written into it."""
    return [
        {"role": "system", "content": render("system")},
        {"role": "user", "content": render(name, schema=json.dumps(schema), **values)},
    ]


def repair_turns(answer: str, problems: list[str]) -> list[Message]:
    """What to add to the conversation after an unusable answer: the answer and what is wrong with it."""
    listed = "\n".join(f"- {p}" for p in problems)
    return [
        {"role": "assistant", "content": answer},
        {"role": "user", "content": render("repair", problems=listed)},
    ]


# --- the story so far, as the level 2 and 3 prompts show it ---------------------------------------------


def character_lines(outline: BaseModel) -> str:
    return "\n".join(
        f"- {c.name}: a {c.gender} looks like {c.looks_like} in {c.colour}" for c in outline.characters
    )


def substory_lines(outline: BaseModel) -> str:
    return "\n".join(f"{i + 1}. {s.scene}: {s.content}" for i, s in enumerate(outline.substories))


def outline_values(outline: BaseModel) -> dict[str, str]:
    return {
        "title": outline.title,
        "overview": outline.overview,
        "characters": character_lines(outline),
        "locations": "; ".join(outline.locations),
        "substories": substory_lines(outline),
        "substory_count": str(len(outline.substories)),
    }
