"""The evaluator service's own settings: the ``evaluator`` section
(``DREAMFRAME_EVALUATOR__*``, ``evaluator:`` in
the config file and the Helm chart's ``config:`` values). The shared loader (``dreamframe.config``) finds it
through the ``dreamframe.settings`` entry point in pyproject.toml."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ByteSize, ConfigDict, Field, SecretStr, model_validator

# The judge a request gets when it names none: evaluator.judges["default"], else judge_base_url.
DEFAULT_JUDGE = "default"


class EndpointEntry(BaseModel):
    """One OpenAI-compatible server a request may pick by name (``evaluator.endpoints.<name>`` for models
    under test, ``evaluator.judges.<name>`` for judges). Everything here is the operator's: a request only
    names the entry and, optionally, one of its models."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(min_length=1)
    # The model a request gets when it names none, and the others it may name.
    model: str = Field(min_length=1)
    models: list[str] = Field(default_factory=list)
    # Where the API key is, on the server: an environment variable's name or a mounted secret file (a
    # Kubernetes Secret key). Neither: no key (a local vLLM).
    api_key_env: str = ""
    api_key_file: Path | None = None

    @model_validator(mode="after")
    def _one_key_source(self) -> EndpointEntry:
        if self.api_key_env and self.api_key_file is not None:
            raise ValueError("give api_key_env or api_key_file, not both")
        return self

    @property
    def allowed_models(self) -> list[str]:
        return [self.model, *(m for m in self.models if m != self.model)]


class EvaluatorSettings(BaseModel):
    device: str = "auto"
    # Named model endpoints and judges a request may pick (EvaluateRequest models[i].endpoint.name,
    # judge.name); see EndpointEntry.
    endpoints: dict[str, EndpointEntry] = Field(default_factory=dict)
    judges: dict[str, EndpointEntry] = Field(default_factory=dict)
    # Whether a request may give its own base_url instead of a name. Such calls never carry a credential of
    # the server's (no API key, no Authorization header, nothing from the environment).
    allow_caller_endpoints: bool = False
    # The "default" judge when evaluator.judges has none of that name (kept for existing deployments).
    judge_base_url: str | None = None
    judge_model: str = "gpt-4o-mini"
    judge_api_key: SecretStr = SecretStr("")
    # Malformed judgments are asked again up to this many times in all, then counted as failures.
    judge_max_attempts: int = Field(3, ge=1)
    # Judge replies the benchmark's official rule rejects (a dict inside other text, {"maximum probability":
    # "(B)"}) are also read by a forgiving rule and reported in separate "(lenient)" rows; the official
    # rows never use them (judge.py).
    lenient_judge_replies: bool = False
    # Also report a lenient reading of MVBench-style multiple-choice replies ("Option B", "Best option:
    # (B)", an option's exact text) in its own column; the score stays MVBench's official check.
    lenient_answer_matching: bool = False
    # Video-Bench: also report, in the "(lenient)" column, a reading in which a reply that is nothing but
    # one of the item's letters ("B", "(B)", "B.", "B. <its text>") is that letter without the judge. Ours:
    # Video-Bench's Step 2 sends every reply to the judge, and so does the official score here.
    lenient_letter_replies: bool = False
    judge_timeout_seconds: float = Field(120.0, gt=0)
    # Judge calls in flight at once (they are I/O bound; the model under test runs one item at a time).
    judge_parallel_calls: int = Field(8, ge=1)
    # Vision endpoints under test (ModelSpec.endpoint).
    endpoint_timeout_seconds: float = Field(300.0, gt=0)
    # Transport retries (connection errors, 429, 5xx) of the openai client, for endpoints and the judge.
    openai_max_retries: int = Field(2, ge=0)
    # Frames sampled per video when a ModelSpec leaves num_frames at 0.
    num_frames: int = Field(8, ge=1, le=256)
    max_new_tokens: int = Field(128, ge=1)
    # CLIP-style image encoder for style consistency: "tiny" or a path / hub id.
    image_encoder: str = "tiny"
    # Video-LLM preset name → local path or hub id, for ModelSpec.preset (as the trainer's).
    model_paths: dict[str, str] = Field(default_factory=dict)
    # Local scratch: checkpoints downloaded from storage, decoded videos.
    work_dir: Path = Path(".dreamframe/evaluator")
    # The size limit of work_dir's volume when its filesystem does not show it (an emptyDir's sizeLimit;
    # the chart sets it from scratch.sizeLimit): a checkpoint download that cannot fit fails before it
    # starts. "200GiB", "200GB" or bytes; empty: the filesystem's free space.
    work_dir_size_limit: ByteSize | None = None
    # Keep each checkpoint downloaded from storage in work_dir for the next evaluation of it (off: its
    # files are deleted once loaded, so scratch does not grow by a model per evaluated job).
    keep_downloaded_checkpoints: bool = False
    # Directories a benchmark's data_prefix/video_prefix may name as file:///<dir>/... (empty: none).
    local_data_roots: list[Path] = Field(default_factory=list)
    # Where model answers and judgments are cached in storage (shared by every report).
    cache_prefix: str = "cache/evaluator/"
    # Evaluations running at once (each holds a model in GPU memory); more wait their turn.
    max_concurrent_evaluations: int = Field(1, ge=1)
