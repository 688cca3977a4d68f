"""The evaluator service's own settings: the ``evaluator`` section
(``DREAMFRAME_EVALUATOR__*``, ``evaluator:`` in
the config file and the Helm chart's ``config:`` values). The shared loader (``dreamframe.config``) finds it
through the ``dreamframe.settings`` entry point in pyproject.toml."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, SecretStr


class EvaluatorSettings(BaseModel):
    device: str = "auto"
    # Default LLM judge (open answers, free-form answer mapping); a request's `judge` overrides it.
    judge_base_url: str | None = None
    judge_model: str = "gpt-4o-mini"
    judge_api_key: SecretStr = SecretStr("")
    # Malformed judgments are asked again up to this many times in all, then counted as failures.
    judge_max_attempts: int = Field(3, ge=1)
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
    # Directories a benchmark's data_prefix/video_prefix may name as file:///<dir>/... (empty: none).
    local_data_roots: list[Path] = Field(default_factory=list)
    # Where model answers and judgments are cached in storage (shared by every report).
    cache_prefix: str = "cache/evaluator/"
    # Evaluations running at once (each holds a model in GPU memory); more wait their turn.
    max_concurrent_evaluations: int = Field(1, ge=1)
