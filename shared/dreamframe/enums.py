"""Protobuf enum values by name, also for values this build does not know (a newer client's)."""

from __future__ import annotations

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper


def enum_name(enum: EnumTypeWrapper, value: int) -> str:
    """``enum``'s name for ``value``, or ``<PREFIX>_<value>`` for a number it does not define (the prefix
    of its zero value, e.g. ``DATASET_FORMAT_7``), so the caller can refuse it by name."""
    try:
        return enum.Name(value)
    except ValueError:
        prefix = enum.DESCRIPTOR.values[0].name.removesuffix("UNSPECIFIED")
        return f"{prefix}{value}"
