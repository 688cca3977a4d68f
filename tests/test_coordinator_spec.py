"""Which stages a submitted job runs."""

from __future__ import annotations

from dreamframe.v1 import common_pb2
from dreamframe.v1 import coordinator_pb2 as pb
from services.coordinator.spec import selected_stages


def spec(stages, *, file: bool) -> pb.JobSpec:
    story = (
        pb.StoryInput(story=common_pb2.ObjectRef(key="in/story.json")) if file else pb.StoryInput(theme="x")
    )
    return pb.JobSpec(stories=[story], stages=stages)


def test_no_selection_means_every_stage():
    assert selected_stages(spec([], file=False)) == [
        pb.STAGE_PLOT,
        pb.STAGE_STYLE,
        pb.STAGE_RENDER,
        pb.STAGE_DATASET,
        pb.STAGE_TRAIN,
        pb.STAGE_EVAL,
    ]


def test_a_story_file_brings_the_plot_stage_along_for_stages_that_read_it():
    assert selected_stages(spec([pb.STAGE_RENDER], file=True)) == [pb.STAGE_PLOT, pb.STAGE_RENDER]
    assert selected_stages(spec([pb.STAGE_DATASET], file=True)) == [pb.STAGE_PLOT, pb.STAGE_DATASET]
    # Training alone does not read the story; a theme is never expanded unless asked.
    assert selected_stages(spec([pb.STAGE_TRAIN], file=True)) == [pb.STAGE_TRAIN]
    assert selected_stages(spec([pb.STAGE_RENDER], file=False)) == [pb.STAGE_RENDER]
