"""The plot-llm service's own settings: the ``plot`` section
(``DREAMFRAME_PLOT__*``, ``plot:`` in
the config file and the Helm chart's ``config:`` values). The shared loader (``dreamframe.config``) finds it
through the ``dreamframe.settings`` entry point in pyproject.toml."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, SecretStr


class PlotSettings(BaseModel):
    # "local" runs a transformers model with grammar-constrained decoding; "openai" calls an endpoint;
    # "scripted" calls the scripted OpenAI-protocol server (services/plot_llm/scripted_server.py) started
    # inside this process on 127.0.0.1: the random-weights presets' plot (a random LLM writes no valid
    # story), which still goes through the OpenAI client path.
    backend: Literal["local", "openai", "scripted"] = "local"
    # The default model. local: "tiny" or a model path/hub id; openai: the endpoint's model name.
    model: str = "tiny"
    # Other models a request may name in options.model (anything else is INVALID_ARGUMENT).
    models: list[str] = Field(default_factory=list)
    base_url: str | None = None
    api_key: SecretStr = SecretStr("")
    temperature: float = Field(0.8, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    # Longest answer of one call, in tokens (a whole 11-substory outline fits comfortably).
    max_tokens: int = Field(8192, ge=64)
    max_parallel_calls: int = Field(8, ge=1)
    max_repair_attempts: int = Field(3, ge=0)
    request_timeout_seconds: float = Field(120.0, gt=0)
    # openai: retries of rate-limited / failed / timed-out requests, with exponential backoff.
    max_retries: int = Field(5, ge=0)
    # "strict": structural + semantic checks; "structural": only what the story format needs;
    # "auto": structural for the tiny random model, strict for every other model.
    validation: Literal["auto", "strict", "structural"] = "auto"
    # Longest free-text strings an answer may hold (titles/lines/QA, and overviews/contents).
    max_short_text_chars: int = Field(160, ge=8, le=1000)
    max_long_text_chars: int = Field(600, ge=8, le=4000)
    # Keep every finished call in storage so reruns ask nothing twice.
    cache: bool = True
    device: str = "auto"
