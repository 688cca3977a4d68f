"""plot-llm's data plane, free of gRPC: settings → backends (loaded once per process) → generator."""

from __future__ import annotations

import asyncio
from pathlib import Path

from dreamframe.errors import InvalidArgument
from dreamframe.keys import story_key
from dreamframe.storage.base import ObjectStore
from services.plot_llm.settings import PlotSettings

from .generator import GeneratorConfig, ProgressCallback, StoryGenerator, StoryResult
from .llm import ChatBackend, LocalChatBackend, OpenAIChatBackend
from .options import StoryOptions, validate_theme
from .schemas import TextLimits
from .validation import STRICT, STRUCTURAL

TINY = "tiny"
# A random model writes noise; short noise keeps the tiny preset's answers (and tests) fast.
TINY_TEXT_LIMITS = TextLimits(short=16, long=32)


class PlotService:
    def __init__(
        self,
        settings: PlotSettings,
        store: ObjectStore,
        *,
        model_cache_dir: Path = Path(".dreamframe/models"),
        bucket: str | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.bucket = bucket
        self.model_cache_dir = Path(model_cache_dir)
        self._backends: dict[str, ChatBackend] = {}
        self._loading = asyncio.Lock()
        self._scripted = None  # backend "scripted": its in-process server, started on first use

    # --- models ------------------------------------------------------------------------------------------
    def resolve_model(self, requested: str) -> str:
        """The model a request names (empty: the configured default); only configured ones are served."""
        allowed = [self.settings.model, *self.settings.models]
        model = requested.strip() or self.settings.model
        if model not in allowed:
            # The endpoint, its key and its models are the server's; a caller's value is quoted short.
            shown = model if len(model) <= 40 else model[:40] + "…"
            raise InvalidArgument(
                f"unknown model {shown!r}; this service serves {', '.join(allowed)}", field="options.model"
            )
        return model

    async def backend(self, model: str) -> ChatBackend:
        """The backend for ``model``, created on first use and kept (local weights load once)."""
        async with self._loading:
            backend = self._backends.get(model)
            if backend is None:
                backend = await asyncio.to_thread(self._create_backend, model)
                self._backends[model] = backend
            return backend

    def _create_backend(self, model: str) -> ChatBackend:
        s = self.settings
        if s.backend in ("openai", "scripted"):
            base_url, api_key = s.base_url, s.api_key.get_secret_value()
            if s.backend == "scripted":
                from services.plot_llm.scripted_server import ScriptedChatServer

                # One server for every model this process serves; stopped by aclose.
                self._scripted = self._scripted or ScriptedChatServer(keep_bodies=False).start()
                base_url, api_key = self._scripted.base_url, "scripted"
            return OpenAIChatBackend(
                model=model,
                base_url=base_url,
                api_key=api_key,
                timeout=s.request_timeout_seconds,
                max_retries=s.max_retries,
            )
        from dreamframe.models.text_llm import load_text_llm

        backend = LocalChatBackend(load_text_llm(model, cache_dir=self.model_cache_dir, device=s.device))
        backend.warm_up()
        return backend

    def is_tiny(self, model: str) -> bool:
        return self.settings.backend == "local" and model == TINY

    def generator_config(self, model: str) -> GeneratorConfig:
        s = self.settings
        mode = s.validation
        if mode == "auto":
            # A random model can only be held to the structural checks; every real model to all of them.
            mode = STRUCTURAL if self.is_tiny(model) else STRICT
        limits = TextLimits(short=s.max_short_text_chars, long=s.max_long_text_chars)
        if self.is_tiny(model):
            limits = TINY_TEXT_LIMITS
        return GeneratorConfig(
            validation=mode,
            max_repair_attempts=s.max_repair_attempts,
            limits=limits,
            max_parallel_calls=s.max_parallel_calls,
            temperature=s.temperature,
            top_p=s.top_p,
            max_tokens=s.max_tokens,
            cache=s.cache,
        )

    # --- the one operation -------------------------------------------------------------------------------
    async def generate(
        self,
        job_id: str,
        theme: str,
        options: StoryOptions,
        *,
        story_index: int = 0,
        on_progress: ProgressCallback | None = None,
    ) -> StoryResult:
        # Cheap checks first: a bad request must not wait for (or trigger) a model load.
        validate_theme(theme)
        story_key(job_id, story_index)
        model = self.resolve_model(options.model)
        backend = await self.backend(model)
        generator = StoryGenerator(backend, self.store, self.generator_config(model), bucket=self.bucket)
        return await generator.generate(
            job_id, theme, options, story_index=story_index, on_progress=on_progress
        )

    async def aclose(self) -> None:
        for backend in self._backends.values():
            await backend.aclose()
        self._backends.clear()
        if self._scripted is not None:
            self._scripted.stop()
            self._scripted = None
