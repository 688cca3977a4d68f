"""A compile cache shared across processes and pods: PyTorch's own caches, signed.

A GPU service that compiles (renderer, style trainer, trainer) spends minutes in ``torch.compile`` before
its first batch. PyTorch can hand over what it compiled: ``torch.compiler.save_cache_artifacts()``
serializes the artifacts of every compile of the process (inductor's FX graph cache entries with their
Triton kernels, AOTAutograd entries, autotuning results, PGO profiles) and
``torch.compiler.load_cache_artifacts(data)`` writes them into inductor's on-disk caches
(``TORCHINDUCTOR_CACHE_DIR``), where the next compile of the same graphs finds them: dynamo still traces
(seconds), inductor compiles nothing. This module keeps those bundles

- keyed by everything that makes them valid (``cache_key``): the service, the model's identity (preset
  and a hash of its configs), the compile options, the shapes served, the device (GPU name and compute
  capability, or "cpu") and the torch/triton/python versions: a change to any of them is another key,
  never a wrong artifact;
- on the model-cache volume (``<models.cache_dir>/compile-cache/<service>/<key>.bin``) and in the object
  store (``compile-cache/<service>/<key>.bin``), so a pod on a new node fetches what another compiled;
- signed: a bundle is code (pickled graphs, generated Triton/C++ sources and binaries). Each one carries
  an HMAC-SHA256 over its header (with the key it was made for) and its payload, under a secret only the
  compiling services hold (``CompileCacheSettings.key``/``key_file``). A bundle without a valid tag, or
  made for another key, is refused before any byte reaches torch; no key configured: no cache.

Flow (``CompileCache.session``): before the first compiled call of a workload, ``load`` the bundle for its
key (a hit writes it into inductor's cache dir); after the first compiled batch or step (compiling is
lazy), ``finish`` saves a bundle when this process compiled something (a miss, or new graphs beside a
hit). Hits, misses and their seconds are logged and counted in ``stats``.

``record_choice``/``choice`` keep a signed note of which compile mode won a warm-up's timing (the
renderer's ``compile_mode: auto``); ``save_artifact``/``load_artifact`` keep other sealed payloads
(the renderer's functions compiled ahead of time, ``dreamframe.models.aot``).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import importlib.metadata
import json
import logging
import os
import platform
import secrets
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, SecretStr

from dreamframe.errors import NotFound

log = logging.getLogger(__name__)

FORMAT = 1
MAGIC = b"DFCC1\n"
TAG_BYTES = 32
MIN_KEY_CHARS = 32
STORE_PREFIX = "compile-cache"
BUNDLE_SUFFIX = ".bin"
CHOICE_SUFFIX = ".choice"


class CompileCacheSettings(BaseModel):
    """The ``compile_cache`` subsection of a compiling service's settings
    (``DREAMFRAME_RENDERER__COMPILE_CACHE__*``, ``..._STYLE__...``, ``..._TRAINER__...``)."""

    # Used whenever the service compiles (nothing happens without compiling).
    enabled: bool = True
    # Signed bundles on local disk; unset: <models.cache_dir>/compile-cache (the model-cache volume).
    dir: Path | None = None
    # Inductor's own on-disk caches (TORCHINDUCTOR_CACHE_DIR), filled from verified bundles and by this
    # process's compiles; unset: <dir>/inductor. An explicit TORCHINDUCTOR_CACHE_DIR wins. Unsigned:
    # keep it where only this service writes (the chart: the pod's own /scratch).
    inductor_dir: Path | None = None
    # Also keep bundles in the object store (compile-cache/<service>/...), for pods on other nodes.
    use_store: bool = True
    # Save a bundle after a compile that missed (off: read-only replicas, e.g. when a warm-up Job fills it).
    save: bool = True
    # The signing secret (at least 32 characters), or a file holding it (a mounted Secret).
    key: SecretStr = SecretStr("")
    key_file: Path | None = Path(".dreamframe/compile-cache.key")
    # Make key_file (random, mode 0600) when it is missing: local runs; the chart mounts a Secret instead.
    generate_key: bool = True
    # Bundles larger than this are refused unread (a full SDXL base+refiner+VAE bundle is ~100s of MB).
    max_bytes: int = Field(4 << 30, ge=1 << 20)


class CacheRefused(Exception):
    """A bundle failed verification (unsigned, tampered, made for another key, malformed)."""


# --- keys -------------------------------------------------------------------------------------------
def config_hash(*configs: Any) -> str:
    """A short hash of model configs (dicts, diffusers/transformers configs): the model part of a key."""
    plain = []
    for config in configs:
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        elif not isinstance(config, Mapping):
            config = dict(config)
        plain.append({k: v for k, v in config.items() if not str(k).startswith("_")})
    return hashlib.sha256(_canonical(plain)).hexdigest()[:16]


def environment(device: Any = None) -> dict[str, str]:
    """What compiled code depends on besides the model and options: device, torch, triton, python."""
    import torch

    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}
    # Triton ships with CUDA torch builds (a dependency of torch, not ours): read its version, not import it.
    try:
        env["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        env["triton"] = "none"
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        env["device"] = f"{torch.cuda.get_device_name(index)}|sm_{major}{minor}"
        env["cuda"] = str(torch.version.cuda)
    else:
        env["device"] = "cpu"
    return env


def cache_key(
    service: str,
    *,
    model: Mapping[str, Any],
    options: Mapping[str, Any],
    workload: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """The key of a bundle: a hash over everything that makes compiled code valid (see the module doc)."""
    fields_ = {
        "format": FORMAT,
        "service": service,
        "model": dict(model),
        "options": dict(options),
        "workload": dict(workload or {}),
        "env": dict(env if env is not None else environment()),
    }
    return hashlib.sha256(_canonical(fields_)).hexdigest()[:40]


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()


# --- signing ----------------------------------------------------------------------------------------
def seal(secret: bytes, cache_key_: str, payload: bytes, meta: Mapping[str, Any] | None = None) -> bytes:
    """``payload`` in a signed envelope: magic, header length, header (key, size, sha256, meta),
    payload, HMAC-SHA256 tag over all of it."""
    header = _canonical(
        {
            "format": FORMAT,
            "key": cache_key_,
            "size": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
            "meta": dict(meta or {}),
        }
    )
    body = MAGIC + struct.pack(">Q", len(header)) + header + payload
    return body + hmac.new(secret, body, hashlib.sha256).digest()


def unseal(secret: bytes, cache_key_: str, data: bytes) -> tuple[bytes, dict[str, Any]]:
    """The payload and meta of a sealed bundle; ``CacheRefused`` unless its tag verifies under ``secret``
    and it was made for ``cache_key_``. The tag is checked before anything in it is parsed."""
    if len(data) < len(MAGIC) + 8 + TAG_BYTES or not data.startswith(MAGIC):
        raise CacheRefused("not a signed compile-cache bundle")
    body, tag = data[:-TAG_BYTES], data[-TAG_BYTES:]
    if not hmac.compare_digest(hmac.new(secret, body, hashlib.sha256).digest(), tag):
        raise CacheRefused("signature does not verify (unsigned, tampered, or signed with another key)")
    (length,) = struct.unpack(">Q", body[len(MAGIC) : len(MAGIC) + 8])
    start = len(MAGIC) + 8
    try:
        header = json.loads(body[start : start + length])
    except ValueError:
        raise CacheRefused("malformed header") from None
    payload = body[start + length :]
    if header.get("format") != FORMAT or header.get("key") != cache_key_:
        raise CacheRefused(f"made for key {str(header.get('key'))[:40]!r}, not {cache_key_!r}")
    if header.get("size") != len(payload) or header.get("sha256") != hashlib.sha256(payload).hexdigest():
        raise CacheRefused("payload does not match its header")
    return payload, dict(header.get("meta") or {})


def load_secret(settings: CompileCacheSettings) -> bytes | None:
    """The signing secret from the settings (None, with a warning, when there is none: no cache)."""
    value = settings.key.get_secret_value().strip()
    if not value and settings.key_file is not None:
        path = Path(settings.key_file)
        if not path.exists() and settings.generate_key:
            with contextlib.suppress(FileExistsError, OSError):
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_hex(32))
                log.info("compile cache: generated a signing key at %s", path)
        try:
            value = path.read_text().strip()
        except OSError as exc:
            log.warning("compile cache off: cannot read key_file %s (%s)", path, exc.strerror)
            return None
    if not value:
        log.warning("compile cache off: no signing key (compile_cache.key or key_file)")
        return None
    if len(value) < MIN_KEY_CHARS:
        log.warning("compile cache off: the signing key has fewer than %d characters", MIN_KEY_CHARS)
        return None
    return value.encode()


# --- the cache ---------------------------------------------------------------------------------------
@dataclass
class Stats:
    hits: int = 0
    misses: int = 0
    refused: int = 0
    saved: int = 0
    load_seconds: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)


def _inductor_counter(name: str) -> int:
    from torch._dynamo.utils import counters

    return int(counters["inductor"].get(name, 0))


class Session:
    """One workload's lookup: ``hit`` says whether artifacts were loaded; ``finish()`` after the first
    compiled batch/step saves a bundle when this process compiled graphs of its own."""

    def __init__(self, cache: CompileCache, key: str, meta: Mapping[str, Any]) -> None:
        self.cache = cache
        self.key = key
        self.meta = dict(meta)
        self.hit = False
        self.loaded_meta: dict[str, Any] = {}
        self.started = time.monotonic()
        self.finished = False
        self._misses_before = _inductor_counter("fxgraph_cache_miss")

    @property
    def compiled_new(self) -> bool:
        """Whether inductor compiled a graph it found in no cache since the session began."""
        return _inductor_counter("fxgraph_cache_miss") > self._misses_before

    def finish(self, *, compiled_ahead: bool = False, **meta: Any) -> bool:
        """Call once the first compiled batch/step is done; returns whether a bundle was saved.
        ``compiled_ahead``: the caller compiled functions ahead of time (``dreamframe.models.aot``), which
        bypasses inductor's graph cache; their kernels still go into a bundle."""
        if self.finished:
            return False
        self.finished = True
        seconds = time.monotonic() - self.started
        new = self.compiled_new or compiled_ahead
        log.info(
            "compile cache %s for %s/%s: first compiled run %.1f s%s",
            "hit" if self.hit else "miss",
            self.cache.service,
            self.key[:12],
            seconds,
            " (compiled new graphs)" if new else "",
        )
        self.cache.stats.events.append(
            {"key": self.key, "hit": self.hit, "first_run_seconds": seconds, "compiled_new": new}
        )
        if not new:
            return False
        return self.cache.save(self.key, {**self.meta, **meta, "compile_seconds": seconds})


class CompileCache:
    """Signed compile artifacts of one service, on local disk and in the object store."""

    def __init__(
        self,
        settings: CompileCacheSettings,
        *,
        service: str,
        models_cache_dir: Path = Path(".dreamframe/models"),
        store: Any = None,
        secret: bytes | None = None,
    ) -> None:
        self.settings = settings
        self.service = service
        self.dir = Path(settings.dir or Path(models_cache_dir) / "compile-cache")
        self.store = store if settings.use_store else None
        # Read (or made) on first use, as is inductor's cache dir: a process that never compiles leaves
        # no trace.
        self._secret = secret
        self._pointed = False
        self.stats = Stats()
        self._lock = threading.Lock()

    @property
    def secret(self) -> bytes | None:
        if self._secret is None:
            self._secret = (load_secret(self.settings) if self.settings.enabled else None) or b""
        return self._secret or None

    @property
    def enabled(self) -> bool:
        """Whether the cache is in use (configured and able to sign); on first ask it also points
        inductor's on-disk cache at ``inductor_dir``."""
        on = bool(self.settings.enabled and self.secret)
        if on and not self._pointed:
            self._pointed = True
            self._point_inductor()
        return on

    @classmethod
    def disabled(cls, service: str = "none") -> CompileCache:
        return cls(CompileCacheSettings(enabled=False, key_file=None), service=service, secret=b"")

    def _point_inductor(self) -> None:
        """Inductor's on-disk cache dir, before anything compiles (an explicit environment wins)."""
        if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
            return
        inductor = Path(self.settings.inductor_dir or self.dir / "inductor").resolve()
        with contextlib.suppress(OSError):
            inductor.mkdir(parents=True, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor)

    # --- keys and locations -------------------------------------------------------------------------
    def key(
        self,
        *,
        model: Mapping[str, Any],
        options: Mapping[str, Any],
        workload: Mapping[str, Any] | None = None,
        device: Any = None,
    ) -> str:
        env = environment(device)
        return cache_key(self.service, model=model, options=options, workload=workload, env=env)

    def object_key(self, key: str, suffix: str = BUNDLE_SUFFIX) -> str:
        return f"{STORE_PREFIX}/{self.service}/{key}{suffix}"

    def local_path(self, key: str, suffix: str = BUNDLE_SUFFIX) -> Path:
        return self.dir / self.service / f"{key}{suffix}"

    # --- reading and writing sealed objects ---------------------------------------------------------
    def _read_verified(self, key: str, suffix: str) -> tuple[bytes, dict[str, Any], str] | None:
        """The first copy that verifies (local disk, then the store); refused copies are logged, counted
        and never returned (a bad local copy is removed so a good one can replace it)."""
        secret = self.secret
        assert secret
        path = self.local_path(key, suffix)
        sources: list[tuple[str, Any]] = [("local", path)]
        if self.store is not None:
            sources.append(("store", self.object_key(key, suffix)))
        for where, location in sources:
            data = self._fetch(where, location)
            if data is None:
                continue
            try:
                payload, meta = unseal(secret, key, data)
            except CacheRefused as exc:
                self.stats.refused += 1
                log.warning("compile cache: refused %s copy of %s/%s: %s", where, self.service, key[:12], exc)
                if where == "local":
                    with contextlib.suppress(OSError):
                        path.unlink()
                continue
            if where == "store":
                self._write_local(path, data)
            return payload, meta, where
        return None

    def _fetch(self, where: str, location: Any) -> bytes | None:
        limit = self.settings.max_bytes
        try:
            if where == "local":
                if not location.is_file():
                    return None
                if location.stat().st_size > limit:
                    log.warning("compile cache: %s is over max_bytes; ignored", location)
                    return None
                return location.read_bytes()
            if self.store.stat(location).size > limit:
                log.warning("compile cache: %s is over max_bytes; ignored", location)
                return None
            return self.store.get_bytes(location)
        except (NotFound, FileNotFoundError):
            return None
        except Exception as exc:  # the cache must never stop a service: a miss, said loudly
            log.warning("compile cache: cannot read %s copy %s: %s", where, location, exc)
            return None

    def _write_local(self, path: Path, data: bytes) -> None:
        from dreamframe.storage.base import write_atomically

        try:
            write_atomically([data], path)
        except OSError as exc:
            log.warning("compile cache: cannot write %s: %s", path, exc)

    def _write(self, key: str, suffix: str, data: bytes) -> bool:
        self._write_local(self.local_path(key, suffix), data)
        if self.store is None:
            return True
        try:
            self.store.put_bytes(self.object_key(key, suffix), data)
        except Exception as exc:
            log.warning("compile cache: cannot store %s: %s", self.object_key(key, suffix), exc)
            return False
        return True

    # --- artifacts ------------------------------------------------------------------------------------
    def load(self, key: str) -> dict[str, Any] | None:
        """Load the bundle for ``key`` into torch's caches; its meta on a hit, None on a miss."""
        if not self.enabled:
            return None
        import torch

        started = time.monotonic()
        found = self._read_verified(key, BUNDLE_SUFFIX)
        if found is None:
            self.stats.misses += 1
            log.info("compile cache miss for %s/%s", self.service, key[:12])
            return None
        payload, meta, where = found
        with self._lock:
            info = torch.compiler.load_cache_artifacts(payload)
        seconds = time.monotonic() - started
        self.stats.hits += 1
        self.stats.load_seconds += seconds
        counts = {kind: len(names) for kind, names in (info.artifacts if info else {}).items()}
        log.info(
            "compile cache hit for %s/%s from %s: %d bytes, %s, loaded in %.2f s",
            self.service,
            key[:12],
            where,
            len(payload),
            counts,
            seconds,
        )
        return meta

    def save(self, key: str, meta: Mapping[str, Any] | None = None) -> bool:
        """Seal and store everything this process compiled so far under ``key``."""
        if not (self.enabled and self.settings.save):
            return False
        import torch

        with self._lock:
            saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            log.info("compile cache: nothing compiled to save for %s/%s", self.service, key[:12])
            return False
        payload, info = saved
        meta = {**(meta or {}), "artifacts": {k: len(v) for k, v in info.artifacts.items()}}
        ok = self._write(key, BUNDLE_SUFFIX, seal(self.secret, key, payload, meta))
        if ok:
            self.stats.saved += 1
            log.info("compile cache: saved %d bytes for %s/%s", len(payload), self.service, key[:12])
        return ok

    def session(self, key: str, **meta: Any) -> Session:
        """Look ``key`` up (loading its bundle on a hit) before the first compiled call."""
        session = Session(self, key, meta)
        loaded = self.load(key)
        session.hit = loaded is not None
        session.loaded_meta = loaded or {}
        return session

    # --- other sealed artifacts (e.g. functions compiled ahead of time) --------------------------------
    def save_artifact(self, key: str, suffix: str, payload: bytes) -> bool:
        """Seal and store ``payload`` under ``key`` + ``suffix`` (beside the bundles, same rules)."""
        if not (self.enabled and self.settings.save):
            return False
        ok = self._write(key, suffix, seal(self.secret, key, payload))
        if ok:
            self.stats.saved += 1
        return ok

    def load_artifact(self, key: str, suffix: str) -> bytes | None:
        """The payload saved under ``key`` + ``suffix`` if a copy verifies; None otherwise."""
        if not self.enabled:
            return None
        found = self._read_verified(key, suffix)
        if found is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        return found[0]

    # --- choices ----------------------------------------------------------------------------------------
    def record_choice(self, key: str, choice: Mapping[str, Any]) -> bool:
        """A signed note (e.g. the compile mode that won a warm-up's timing) under ``key``."""
        if not self.enabled:
            return False
        return self._write(key, CHOICE_SUFFIX, seal(self.secret, key, _canonical(dict(choice))))

    def choice(self, key: str) -> dict[str, Any] | None:
        if not self.enabled:
            return None
        found = self._read_verified(key, CHOICE_SUFFIX)
        if found is None:
            return None
        try:
            value = json.loads(found[0])
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def report(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "hits": self.stats.hits,
            "misses": self.stats.misses,
            "refused": self.stats.refused,
            "saved": self.stats.saved,
            "load_seconds": round(self.stats.load_seconds, 3),
        }


def open_cache(
    settings: CompileCacheSettings, *, service: str, models_cache_dir: Path, store: Any = None
) -> CompileCache:
    """The service's compile cache (disabled, with the reason logged, when it cannot sign)."""
    if not settings.enabled:
        return CompileCache.disabled(service)
    return CompileCache(settings, service=service, models_cache_dir=models_cache_dir, store=store)


def open_service_cache(section: str, service: str, *, save: bool = True) -> CompileCache:
    """A service's compile cache from this process's settings: ``<section>.compile_cache`` (defaults
    when the section has none), ``models.cache_dir`` and the store. ``save=False``: read only (a
    trainer rank other than 0)."""
    from dreamframe.config import get_settings
    from dreamframe.storage import open_store

    settings = get_settings()
    cache_settings = (
        getattr(getattr(settings, section, None), "compile_cache", None) or CompileCacheSettings()
    )
    if not save:
        cache_settings = cache_settings.model_copy(update={"save": False})
    return open_cache(
        cache_settings,
        service=service,
        models_cache_dir=settings.models.cache_dir,
        store=open_store(settings.storage) if cache_settings.use_store else None,
    )
