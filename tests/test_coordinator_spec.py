"""Which stages a submitted job runs, and what a submission may hold."""

from __future__ import annotations

import pytest

from dreamframe.config import LimitsSettings
from dreamframe.errors import InvalidArgument
from dreamframe.limits import check_message_strings
from dreamframe.v1 import common_pb2, qa_pb2, render_pb2, train_pb2
from dreamframe.v1 import coordinator_pb2 as pb
from services.coordinator.spec import selected_stages, validate_submission


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


# --- hostile text (issue 19) ----------------------------------------------------------------------


def request(spec: pb.JobSpec, job_id: str = "") -> pb.SubmitJobRequest:
    return pb.SubmitJobRequest(spec=spec, job_id=job_id)


THEME = pb.StoryInput(theme="a lighthouse keeper")


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        (pb.JobSpec(stories=[pb.StoryInput(theme="t" * 501)]), "spec.stories.0.theme", "longer than 500"),
        (pb.JobSpec(stories=[pb.StoryInput(theme="a\x00b")]), "spec.stories.0.theme", "U+0000"),
        (pb.JobSpec(stories=[THEME], name="n" * 10_001), "spec.name", "longer than 10000"),
        (
            pb.JobSpec(stories=[THEME], render=render_pb2.RenderOptions(negative_prompt="ugly\x1b")),
            "spec.render.negative_prompt",
            "U+001B",
        ),
        (
            pb.JobSpec(stories=[THEME, pb.StoryInput(story=common_pb2.ObjectRef(key="in/\x01.json"))]),
            "spec.stories.1.story.key",
            "U+0001",
        ),
        (
            pb.JobSpec(stories=[THEME], train=train_pb2.StartRunRequest(base_model="m\x7f\x08")),
            "spec.train.base_model",
            "U+0008 at position 2",
        ),
    ],
    ids=["long theme", "NUL theme", "long name", "escape in negative prompt", "key", "nested request"],
)
def test_every_string_of_the_spec_is_bounded_and_has_no_control_characters(spec, field, words):
    with pytest.raises(InvalidArgument) as info:
        validate_submission(request(spec))
    assert info.value.field == field
    assert words in info.value.message


def test_newlines_tabs_and_unicode_pass_and_limits_are_settings():
    spec = pb.JobSpec(stories=[pb.StoryInput(theme="a keeper\n\tand a robot — ünïcode")], name="x" * 10_000)
    validate_submission(request(spec))
    with pytest.raises(InvalidArgument) as info:
        validate_submission(request(spec), LimitsSettings(request_string_chars=100))
    assert info.value.field == "spec.name"


def test_a_long_job_id_is_echoed_only_in_part():
    with pytest.raises(InvalidArgument) as info:
        validate_submission(request(pb.JobSpec(stories=[THEME]), job_id="j" * 5_000))
    assert info.value.field == "job_id"
    assert len(info.value.message) < 200 and "(5000 characters)" in info.value.message


def test_map_entries_are_checked_too():
    message = qa_pb2.BuildDatasetResult(counts={"fine": 1, "bad\x00key": 2})
    with pytest.raises(InvalidArgument) as info:
        check_message_strings(message, max_chars=100, prefix="result.")
    assert info.value.field == "result.counts"
