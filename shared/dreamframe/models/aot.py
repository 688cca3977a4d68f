"""A module run through functions compiled ahead of time, one per input signature, kept in the compile cache.

``torch.compile(module).forward.aot_compile((args, kwargs))`` (PyTorch's experimental ahead-of-time
compile) traces and compiles the module's forward for those inputs and returns a function that can be
saved; ``torch.compiler.load_compiled_function`` loads it in another process, which then skips Dynamo's
tracing and inductor's lowering of that module. Plain ``torch.compile`` traces again in every process,
compile cache or not: that is what a renderer replica pays on each start (real SDXL base UNet, 2-core
CPU: 13.5 s to trace, 0.65 s to load its artifact; ``keyframe_renderer.bench.tracing``).

Only tensor guards are kept (shape, stride, dtype, device): module and global guards cannot be
serialized. An artifact is therefore found by a key that names everything else (the caller's
``artifact_key``: model, options, device, torch version, and the input signature), and it is sealed
like the compile cache's bundles (a loaded artifact is unpickled code).
"""

from __future__ import annotations

import io
import logging
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from dreamframe.errors import described
from dreamframe.models.compile_cache import CompileCache

log = logging.getLogger(__name__)

AOT_SUFFIX = ".aot"


def signature(value: Any) -> str:
    """What a compiled function is specialised on, as text: each tensor's shape, stride, dtype, device and
    grad flag; other values by their repr (None, flags, numbers); containers element by element."""
    if isinstance(value, torch.Tensor):
        grad = "g" if value.requires_grad else ""
        return f"T{tuple(value.shape)}{value.stride()}{value.dtype}{value.device.type}{grad}"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{signature(v)}" for k, v in sorted(value.items(), key=str)) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(signature(v) for v in value) + "]"
    if value is None or isinstance(value, bool | int | float | str):
        return repr(value)
    return type(value).__qualname__


class AheadOfTime:
    """Stands in for ``module``'s compiled call (where ``nn.Module.compile`` puts its own): each new input
    signature loads its function from ``cache`` or compiles it ahead of time and saves it there.
    ``module`` is a model's own class (a UNet, a decoder), not a bare ``torch.nn`` built-in: Dynamo
    compiles those without their ``self`` argument."""

    def __init__(
        self,
        module: torch.nn.Module,
        name: str,
        *,
        options: Mapping[str, Any],
        artifact_key: Callable[[str, str], str],
        cache: CompileCache,
    ) -> None:
        self.module = module
        self.name = name
        self.options = dict(options)
        self.artifact_key = artifact_key
        self.cache = cache
        self.functions: dict[str, Callable] = {}
        self.loaded = self.compiled = 0
        self._jit: Callable | None = None
        self._lock = threading.Lock()

    def _just_in_time(self) -> Callable:
        """What ``nn.Module.compile`` would run, shaped like an ahead-of-time function."""
        if self._jit is None:
            self._jit = torch.compile(self.module._call_impl, fullgraph=True, options=self.options)
        jit = self._jit
        return lambda _module, *args, **kwargs: jit(*args, **kwargs)

    def _external(self) -> dict[str, Any]:
        """Objects an artifact refers to but never holds: the module (with its weights) is this process's."""
        return {"module": self.module}

    def install(self) -> None:
        self.module._compiled_call_impl = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = signature((args, kwargs))
        function = self.functions.get(key)
        if function is None:
            with self._lock:
                function = self.functions.get(key) or self._load_or_compile(key, args, kwargs)
                self.functions[key] = function
        return function(self.module, *args, **kwargs)

    def _load_or_compile(self, inputs: str, args: tuple, kwargs: dict) -> Callable:
        key = self.artifact_key(self.name, inputs)
        payload = self.cache.load_artifact(key, AOT_SUFFIX)
        if payload is not None:
            try:
                function = torch.compiler.load_compiled_function(
                    io.BytesIO(payload), external_data=self._external()
                )
            except Exception as exc:  # another torch build's artifact under a colliding key: compile anew
                log.warning(
                    "ahead-of-time %s: cannot load %s (%s); compiling", self.name, key[:12], described(exc)
                )
            else:
                self.loaded += 1
                log.info("ahead-of-time %s: loaded %s (%d bytes)", self.name, key[:12], len(payload))
                return function
        options = {**self.options, "guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe}
        # Traced through the module's __call__, which would come back here: step aside meanwhile.
        self.module._compiled_call_impl = None
        try:
            # torch < 2.13 attaches `aot_compile` only under this flag (off by default there; it is
            # read when torch.compile wraps the forward).
            with torch._dynamo.config.patch(enable_aot_compile=True):
                # Static: a function serves one input signature anyway. Left automatic, torch 2.11 traced a
                # float in the VAE decoder as symbolic in a process that had compiled both UNets first (not
                # in a fresh one), then asked to restart its analysis, which aot_compile cannot do.
                compiled = torch.compile(self.module, fullgraph=True, dynamic=False, options=options)
                function = compiled.forward.aot_compile((args, kwargs))
        except Exception as exc:  # an experimental API: never let it stop a render
            # With its traceback: what 2.11 raised here on the H200 (a restart signal) had no message.
            log.warning(
                "ahead-of-time %s: cannot compile (%s); compiling just in time instead",
                self.name,
                described(exc),
                exc_info=True,
            )
            return self._just_in_time()
        finally:
            self.install()
        self.compiled += 1
        saved = False
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "function"
            try:
                function.save_compiled_function(str(path), external_data=self._external())
            except Exception as exc:  # it still runs here; the next process compiles it again
                log.warning("ahead-of-time %s: cannot save %s (%s)", self.name, key[:12], described(exc))
            else:
                saved = self.cache.save_artifact(key, AOT_SUFFIX, path.read_bytes())
        log.info("ahead-of-time %s: compiled %s%s", self.name, key[:12], ", saved" if saved else "")
        return function


def available() -> bool:
    """Whether this torch has the ahead-of-time API (experimental; newer than the rest we use)."""
    return hasattr(torch.compiler, "load_compiled_function") and hasattr(
        torch.compiler, "keep_tensor_guards_unsafe"
    )


def uninstall(module: torch.nn.Module) -> None:
    """Back to the module's own call (what ``nn.Module.compile`` or ``install`` replaced)."""
    module._compiled_call_impl = None
