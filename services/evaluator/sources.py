"""Where benchmark files and videos are read from: the object store (keys under a prefix) or, when the
operator allows it, a local directory named as ``file:///<dir>/...`` (benchmarks are big and often sit
on a mounted volume). Both look the same to the loaders: keys, existence, listing, bytes, a local copy.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path

from dreamframe.errors import InvalidArgument, NotFound
from dreamframe.storage.base import ObjectStore, validate_key, validate_prefix

FILE_SCHEME = "file://"


class Source(ABC):
    """A namespace of '/'-separated keys holding benchmark files."""

    def __init__(self) -> None:
        self._exists: dict[str, bool] = {}

    @abstractmethod
    def _exists_uncached(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (recursively), sorted."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def local_copy(self, key: str, scratch: Path) -> contextlib.AbstractContextManager[Path]:
        """A local file with the object's bytes for as long as the context lasts."""

    @abstractmethod
    def describe(self, key: str) -> str:
        """Stable human-readable identity of ``key`` (reports, cache keys)."""

    def exists(self, key: str) -> bool:
        if key not in self._exists:
            self._exists[key] = self._exists_uncached(key)
        return self._exists[key]

    def first_existing(self, keys: Sequence[str]) -> str | None:
        return next((k for k in keys if self.exists(k)), None)

    @staticmethod
    def join(base: str, rel: str) -> str:
        """``rel`` (as benchmark files write paths: relative, '/'-separated) under ``base``."""
        parts = [p for p in rel.replace("\\", "/").split("/") if p not in ("", ".")]
        if ".." in parts:
            raise InvalidArgument(f"path {rel!r} must not contain '..'", field="video")
        return "/".join([base.rstrip("/"), *parts]) if base else "/".join(parts)

    @staticmethod
    def parent(base: str) -> str:
        return posixpath.dirname(base.rstrip("/"))


class StoreSource(Source):
    def __init__(self, store: ObjectStore, bucket: str | None = None) -> None:
        super().__init__()
        self.store = store
        self.bucket = bucket

    def _exists_uncached(self, key: str) -> bool:
        try:
            validate_key(key)
        except InvalidArgument:
            return False
        return self.store.exists(key, bucket=self.bucket)

    def list(self, prefix: str) -> list[str]:
        validate_prefix(prefix)
        return [info.key for info in self.store.list(prefix, bucket=self.bucket)]

    def read_bytes(self, key: str) -> bytes:
        return self.store.get_bytes(validate_key(key, field="video"), bucket=self.bucket)

    @contextlib.contextmanager
    def local_copy(self, key: str, scratch: Path) -> Iterator[Path]:
        scratch.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=scratch, suffix=posixpath.splitext(key)[1])
        os.close(fd)
        try:
            self.store.get_file(validate_key(key, field="video"), name, bucket=self.bucket)
            yield Path(name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)

    def describe(self, key: str) -> str:
        return f"store:{self.bucket or self.store.default_bucket}/{key}"


class LocalSource(Source):
    """Absolute paths inside one allowed root directory."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        path = Path(key).resolve()
        if path != self.root and self.root not in path.parents:
            raise InvalidArgument(
                f"{key!r} is outside the allowed directory {str(self.root)!r}", field="video"
            )
        return path

    def _exists_uncached(self, key: str) -> bool:
        try:
            return self._path(key).is_file()
        except InvalidArgument:
            return False

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/") or "/")
        if base.is_file():
            return [str(base)]
        if not base.is_dir():
            return []
        return sorted(str(p) for p in base.rglob("*") if p.is_file())

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise NotFound(f"no file {key!r}", field="video")
        return path.read_bytes()

    @contextlib.contextmanager
    def local_copy(self, key: str, scratch: Path) -> Iterator[Path]:
        path = self._path(key)
        if not path.is_file():
            raise NotFound(f"no file {key!r}", field="video")
        yield path

    def describe(self, key: str) -> str:
        return f"file:{key}"


def open_location(
    spec: str, store: ObjectStore, *, local_roots: Sequence[Path] = (), field: str
) -> tuple[Source, str]:
    """(source, base) for a benchmark's data_prefix / video_prefix: an object-store prefix, or
    ``file:///abs/dir`` inside one of ``local_roots``."""
    if spec.startswith(FILE_SCHEME):
        path = spec[len(FILE_SCHEME) :]
        if not path.startswith("/"):
            raise InvalidArgument(f"{spec!r}: a file:// location must be absolute (file:///dir)", field=field)
        resolved = Path(path).resolve()
        for root in local_roots:
            root = Path(root).resolve()
            if resolved == root or root in resolved.parents:
                return LocalSource(root), str(resolved)
        raise InvalidArgument(
            f"{spec!r} is not inside a directory the evaluator may read (evaluator.local_data_roots)",
            field=field,
        )
    if spec == "":
        return StoreSource(store), ""
    validate_key(spec.rstrip("/") or "/", field=field)
    return StoreSource(store), spec.rstrip("/")
