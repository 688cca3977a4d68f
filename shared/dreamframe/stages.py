"""The pipeline's stages by name: the coordinator runs them in this order, the CLI and callers name them
("plot", "render", ...) instead of enum values."""

from __future__ import annotations

from dreamframe.errors import InvalidArgument
from dreamframe.v1 import coordinator_pb2 as pb

# The chain, in order.
ALL_STAGES = (pb.STAGE_PLOT, pb.STAGE_STYLE, pb.STAGE_RENDER, pb.STAGE_DATASET, pb.STAGE_TRAIN, pb.STAGE_EVAL)


def stage_name(stage: int) -> str:
    return pb.Stage.Name(stage).removeprefix("STAGE_").lower()


def parse_stage(name: str) -> int:
    """'render' or 'STAGE_RENDER' → the enum value."""
    key = name.strip().upper()
    key = key if key.startswith("STAGE_") else f"STAGE_{key}"
    if key not in pb.Stage.keys() or key == "STAGE_UNSPECIFIED":
        known = ", ".join(stage_name(s) for s in ALL_STAGES)
        raise InvalidArgument(f"unknown stage {name!r}; known: {known}", field="spec.stages")
    return pb.Stage.Value(key)
