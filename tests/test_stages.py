from __future__ import annotations

import pytest

from dreamframe.errors import InvalidArgument
from dreamframe.stages import ALL_STAGES, parse_stage, stage_name
from dreamframe.v1 import coordinator_pb2 as pb


def test_names_round_trip_in_chain_order():
    assert [stage_name(s) for s in ALL_STAGES] == ["plot", "style", "render", "dataset", "train", "eval"]
    assert all(parse_stage(stage_name(s)) == s for s in ALL_STAGES)
    assert parse_stage(" STAGE_RENDER ") == pb.STAGE_RENDER


@pytest.mark.parametrize("bad", ["paint", "unspecified", ""])
def test_unknown_stage_names_the_field_and_the_choices(bad):
    with pytest.raises(InvalidArgument) as info:
        parse_stage(bad)
    assert info.value.field == "spec.stages"
    assert "plot, style, render, dataset, train, eval" in info.value.message
