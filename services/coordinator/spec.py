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
from dreamframe.storage.base import validate_bucket, validate_key
from dreamframe.story import Story
from dreamframe.v1 import coordinator_pb2 as pb

# Per-story stages run for each story; the rest once over all stories.
PER_STORY_STAGES = (pb.STAGE_PLOT, pb.STAGE_STYLE, pb.STAGE_RENDER)
MAX_STORIES = 10_000


MAX_STYLE_IMAGES = 1_000
MAX_STYLE_TOKEN_CHARS = 64  # style-trainer's keyword limit: the token is the keyword it learns
# How a story without a style description of its own gets a style (the message names them all).
STYLE_CHOICES = (
    "give style_description, style_images or style_embedding (dreamframe submit --style-description "
    "TEXT | --style-image FILE | --style-embedding FILE.pt), or leave out the style stage"
)

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
        _check_style_fields(story, field, stages, limits)
    # A stage that needs an earlier stage's output must have it selected or given.
    if pb.STAGE_TRAIN in stages and pb.STAGE_DATASET not in stages and not spec.train.datasets:
        raise InvalidArgument("training needs the dataset stage or spec.train.datasets", field="spec.stages")


def style_sources(story: pb.StoryInput) -> list[str]:
    """The StoryInput fields that say where its style comes from (at most one may be set)."""
    given = []
    if story.style_description:
        given.append("style_description")
    if story.style_images:
        given.append("style_images")
    if story.HasField("style_embedding"):
        given.append("style_embedding")
    return given


def _check_style_fields(story: pb.StoryInput, field: str, stages: list[int], limits: LimitsSettings) -> None:
    """The StoryInput's style fields on their own (no storage): at most one source, each well formed,
    and only with the style stage, which is the one that uses them."""
    given = style_sources(story)
    if len(given) > 1:
        raise InvalidArgument(
            "give at most one of style_description, style_images and style_embedding "
            f"(got {', '.join(given)})",
            field=field,
        )
    if (given or story.style_token) and pb.STAGE_STYLE not in stages:
        name = given[0] if given else "style_token"
        raise InvalidArgument(
            "is used by the style stage, which is not selected: add style to spec.stages",
            field=f"{field}.{name}",
        )
    if story.style_description:
        if not story.style_description.strip():
            raise InvalidArgument("must not be blank", field=f"{field}.style_description")
        check_text(
            story.style_description, max_chars=limits.description_chars, field=f"{field}.style_description"
        )
    if len(story.style_images) > MAX_STYLE_IMAGES:
        raise InvalidArgument(f"at most {MAX_STYLE_IMAGES} style images", field=f"{field}.style_images")
    for j, ref in enumerate(story.style_images):
        _check_ref(ref, f"{field}.style_images.{j}")
    if story.HasField("style_embedding"):
        _check_ref(story.style_embedding, f"{field}.style_embedding")
    token = story.style_token
    if token and (len(token) > MAX_STYLE_TOKEN_CHARS or any(c.isspace() or c in "{}" for c in token)):
        raise InvalidArgument(
            f"must be one word of at most {MAX_STYLE_TOKEN_CHARS} characters, without spaces or braces",
            field=f"{field}.style_token",
        )


def _check_ref(ref, field: str) -> None:
    """A key, and a bucket when one is named (empty: the store's default bucket, as for story files)."""
    if not ref.key:
        raise InvalidArgument("must name an object", field=f"{field}.key")
    validate_key(ref.key, field=f"{field}.key")
    if ref.bucket:
        validate_bucket(ref.bucket, field=f"{field}.bucket")


def check_style_source(story_input: pb.StoryInput, story: Story, stages: list[int], field: str) -> None:
    """An uploaded story file run through the style stage needs a style to learn: its own description
    (plot-llm's stories have one), or one given with it; and a token to bind it to (the story's style
    keyword, from its frames' "generate an image in <keyword> style:", or style_token). An embedding may
    carry its own token, which only style-trainer reads, so it is not asked for one here."""
    if pb.STAGE_STYLE not in stages:
        return
    given = style_sources(story_input)
    if not given and not story.style_description.strip():
        raise InvalidArgument(
            "the story file has no style description (reference-format story files carry none): "
            + STYLE_CHOICES,
            field=field,
        )
    if "style_embedding" not in given and not story.style_keyword and not story_input.style_token:
        raise InvalidArgument(
            'the story has no style keyword (no frame starts "generate an image in <keyword> style:"): '
            "give the token to learn as style_token (dreamframe submit --style-token WORD)",
            field=f"{field}.style_token",
        )
