"""Checking a submitted job before anything runs: every problem names the request field.

Every text field of the request is bounded and free of control characters (the ``limits`` settings);
the story files it names are checked by ``dreamframe.story.load_story`` before the job is stored.
"""

from __future__ import annotations

from dreamframe.config import LimitsSettings
from dreamframe.errors import InvalidArgument
from dreamframe.keys import validate_id
from dreamframe.limits import check_message_strings, check_text, current_limits
from dreamframe.stages import ALL_STAGES
from dreamframe.v1 import coordinator_pb2 as pb

# Per-story stages run for each story; the rest once over all stories.
PER_STORY_STAGES = (pb.STAGE_PLOT, pb.STAGE_STYLE, pb.STAGE_RENDER)
MAX_STORIES = 10_000


# Stages that read the job's copy of each story.
READS_STORY = {pb.STAGE_STYLE, pb.STAGE_RENDER, pb.STAGE_DATASET}


def selected_stages(spec: pb.JobSpec) -> list[int]:
    """The stages to run, in chain order (empty selection: all six). A story file enters the job through
    the plot stage (normalised into both formats, no LLM call), so a stage that reads the story brings
    the plot stage along when the stories are files."""
    chosen = set(spec.stages) or set(ALL_STAGES)
    files = any(story.WhichOneof("source") == "story" for story in spec.stories)
    if files and chosen & READS_STORY:
        chosen.add(pb.STAGE_PLOT)
    return [s for s in ALL_STAGES if s in chosen]


def validate_submission(request: pb.SubmitJobRequest, limits: LimitsSettings | None = None) -> None:
    limits = limits or current_limits()
    if request.job_id:
        validate_id(request.job_id, field="job_id")
    spec = request.spec
    # Themes have their own limit (below); every other string of the spec gets the generic one.
    themes = frozenset(f"spec.stories.{i}.theme" for i in range(len(spec.stories)))
    check_message_strings(spec, max_chars=limits.request_string_chars, prefix="spec.", skip=themes)
    if not spec.stories:
        raise InvalidArgument(
            "at least one story (a theme or a story file) is required", field="spec.stories"
        )
    if len(spec.stories) > MAX_STORIES:
        raise InvalidArgument(f"at most {MAX_STORIES} stories per job", field="spec.stories")
    for i, stage in enumerate(spec.stages):
        if stage not in ALL_STAGES:
            raise InvalidArgument(f"unknown stage {stage}", field=f"spec.stages.{i}")
    stages = selected_stages(spec)
    for i, story in enumerate(spec.stories):
        field = f"spec.stories.{i}"
        source = story.WhichOneof("source")
        if source is None:
            raise InvalidArgument("give a theme or a story file", field=field)
        if source == "theme":
            if not story.theme.strip():
                raise InvalidArgument("must not be empty", field=f"{field}.theme")
            check_text(story.theme, max_chars=limits.theme_chars, field=f"{field}.theme")
            if pb.STAGE_PLOT not in stages:
                raise InvalidArgument(
                    "a theme needs the plot stage; add it or give a story file", field=f"{field}.theme"
                )
        elif not story.story.key:
            raise InvalidArgument("must name an object", field=f"{field}.story.key")
    # A stage that needs an earlier stage's output must have it selected or given.
    if pb.STAGE_TRAIN in stages and pb.STAGE_DATASET not in stages and not spec.train.datasets:
        raise InvalidArgument("training needs the dataset stage or spec.train.datasets", field="spec.stages")
