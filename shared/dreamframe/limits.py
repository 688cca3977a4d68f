"""Hostile input, bounded: size checks, control characters, JSON nesting, and short echoes of bad values.

Every story file and request field is caller input (DESIGN.md, "Scale and trust"): it is refused with an
``InvalidArgument`` naming the field before anything is stored, and an error never echoes more than a
short prefix of the bad value (``short_repr``). The numbers live in the ``limits`` settings section
(``dreamframe.config.LimitsSettings``, ``DREAMFRAME_LIMITS__*``).
"""

from __future__ import annotations

import json
import re
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from dreamframe.config import LimitsSettings, get_settings
from dreamframe.errors import InvalidArgument

# C0 control characters except tab and newline (NUL included): never meaningful in story text or names.
CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f]")
SHORT_REPR_CHARS = 40

# A JSON string (escapes included), and a table that keeps only brackets, objects' as arrays'.
_JSON_STRING_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_AS_ARRAYS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def current_limits() -> LimitsSettings:
    """The process's limits (the ``limits`` settings section)."""
    return get_settings().limits


def truncate(text: str, max_chars: int) -> str:
    """``text`` cut to ``max_chars`` characters, ending in "…" when something was cut."""
    return text if len(text) <= max_chars else text[: max(max_chars - 1, 0)] + "…"


def short_repr(value: Any, max_chars: int = SHORT_REPR_CHARS) -> str:
    """repr() of at most a short prefix of ``value``: what an error message may echo of caller input."""
    if isinstance(value, str | bytes) and len(value) > max_chars:
        return f"{value[:max_chars]!r}… ({len(value)} {'characters' if isinstance(value, str) else 'bytes'})"
    return truncate(repr(value), max_chars + 20)


def check_text(value: str, *, max_chars: int, field: str) -> None:
    """At most ``max_chars`` characters and no control character other than newline and tab."""
    if len(value) > max_chars:
        raise InvalidArgument(f"longer than {max_chars} characters ({len(value)})", field=field)
    bad = CONTROL_RE.search(value)
    if bad:
        raise InvalidArgument(
            f"contains the control character U+{ord(bad.group()):04X} at position {bad.start()}", field=field
        )


def check_count(count: int, *, maximum: int, field: str, what: str, minimum: int = 0) -> None:
    if count < minimum:
        raise InvalidArgument(f"needs at least {minimum} {what}, has {count}", field=field)
    if count > maximum:
        raise InvalidArgument(f"has {count} {what}, at most {maximum} allowed", field=field)


def check_json_shape(data: bytes, *, max_depth: int, max_containers: int, field: str) -> None:
    """Refuse JSON with more than ``max_containers`` arrays/objects or nested more than ``max_depth``
    deep, before parsing it (parsing is what costs: memory per container, recursion per level).

    Strings are cut out and everything but brackets dropped; each pass then removes the innermost
    pairs (``bytes.replace`` does not rescan what it joined): a document ``max_depth`` deep is empty
    after ``max_depth`` passes. All of it runs at C speed; brackets that do not balance are left to the
    JSON parser to report.
    """
    brackets = _JSON_STRING_RE.sub(b"", data).translate(_AS_ARRAYS, _NOT_BRACKETS)
    if brackets.count(b"[") > max_containers:
        raise InvalidArgument(f"holds more than {max_containers} JSON arrays and objects", field=field)
    for done in range(max_depth):
        if not brackets:
            return
        # n openers in a row are n more levels: a deep chain is refused at once, not after n passes.
        if b"[" * (max_depth - done + 1) in brackets:
            break
        shorter = brackets.replace(b"[]", b"")
        if len(shorter) == len(brackets):
            return  # unbalanced: not JSON, json.loads says where
        brackets = shorter
    if brackets:
        raise InvalidArgument(f"nested more than {max_depth} levels deep", field=field)


def load_json_object(
    data: str | bytes, *, field: str, limits: LimitsSettings | None = None, what: str = "JSON"
) -> dict[str, Any]:
    """Parse caller JSON that must be an object: size and depth checked first, every failure an
    ``InvalidArgument`` naming ``field`` (never a RecursionError or a traceback)."""
    limits = limits or current_limits()
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > limits.story_bytes:
        message = f"{what} of {len(raw)} bytes; at most {limits.story_bytes} allowed"
        raise InvalidArgument(message, field=field)
    check_json_shape(raw, max_depth=limits.json_depth, max_containers=limits.json_containers, field=field)
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(
            f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", field=field
        ) from None
    except UnicodeDecodeError:
        raise InvalidArgument("not UTF-8 text", field=field) from None
    except RecursionError:  # unbalanced brackets that the depth check left to the parser
        raise InvalidArgument(f"nested more than {limits.json_depth} levels deep", field=field) from None
    if not isinstance(obj, dict):
        raise InvalidArgument(f"must be a JSON object, got {type(obj).__name__}", field=field)
    return obj


def json_depth(obj: Any) -> int:
    """Nesting depth of parsed JSON (dicts and lists), without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def check_message_strings(
    message: Message, *, max_chars: int, prefix: str = "", skip: frozenset[str] = frozenset()
) -> None:
    """Every string field of a protobuf request, nested messages, lists and maps included: at most
    ``max_chars`` characters, no control characters; errors name the dotted field (``spec.name``).
    Fields whose path is in ``skip`` have their own checks."""
    stack: list[tuple[Message, str]] = [(message, prefix)]
    while stack:
        msg, path = stack.pop()
        for fd, value in msg.ListFields():
            field = f"{path}{fd.name}"
            if field in skip:
                continue
            if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                entry = fd.message_type.fields_by_name
                key_fd, value_fd = entry["key"], entry["value"]
                for key, item in value.items():
                    if key_fd.type == FieldDescriptor.TYPE_STRING:
                        check_text(key, max_chars=max_chars, field=field)
                    item_field = f"{field}.{key if isinstance(key, int) else short_repr(key, 20)}"
                    if value_fd.type == FieldDescriptor.TYPE_STRING:
                        check_text(item, max_chars=max_chars, field=item_field)
                    elif value_fd.type == FieldDescriptor.TYPE_MESSAGE:
                        stack.append((item, f"{item_field}."))
                continue
            items = list(enumerate(value)) if fd.is_repeated else [(None, value)]
            for i, item in items:
                item_field = field if i is None else f"{field}.{i}"
                if fd.type == FieldDescriptor.TYPE_STRING:
                    check_text(item, max_chars=max_chars, field=item_field)
                elif fd.type == FieldDescriptor.TYPE_MESSAGE:
                    stack.append((item, f"{item_field}."))
