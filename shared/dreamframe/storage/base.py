"""The one storage interface. Every artifact DreamFrame makes goes through an ObjectStore.

Backends: ``LocalStore`` (a directory; the embedded default) and ``S3Store`` (MinIO/S3 through the
``minio`` client). Both pass the same contract tests (tests/test_storage_contract.py).

Rules every backend keeps:
- keys are validated by ``validate_key`` before any I/O;
- writes are atomic: a reader sees the old object or the whole new one, never a part, and a failed
  write leaves nothing behind;
- ``ObjectRef.sha256`` is the SHA-256 of the bytes, recorded at write time.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dreamframe.errors import InvalidArgument, NotFound

CHUNK_SIZE = 1 << 20
MAX_KEY_BYTES = 1024
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# How much of a bad value an error message shows (requests are hostile: never echo all of one).
_SHOWN = 64
# C0 and C1 control characters and backslash (a path separator on some systems).
_BAD_KEY_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")


@dataclass(frozen=True)
class ObjectRef:
    """Where an artifact is and what it is (mirrors dreamframe.v1.ObjectRef)."""

    bucket: str
    key: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ObjectInfo:
    """A listing entry: cheap to produce, no hash."""

    key: str
    size: int


def validate_key(key: str, *, field: str = "key") -> str:
    """Return ``key`` if it is a safe relative object key, else raise InvalidArgument naming ``field``."""
    if not isinstance(key, str) or not key:
        raise InvalidArgument("must be a non-empty object key", field=field)
    try:
        encoded = key.encode()
    except UnicodeEncodeError:
        raise InvalidArgument(f"object key {key!r} is not valid UTF-8", field=field) from None
    if len(encoded) > MAX_KEY_BYTES:
        raise InvalidArgument(f"object key longer than {MAX_KEY_BYTES} bytes", field=field)
    if key.startswith("/"):
        raise InvalidArgument(f"object key {key!r} must be relative, not absolute", field=field)
    if _BAD_KEY_CHARS.search(key):
        raise InvalidArgument(f"object key {key!r} contains a control character or backslash", field=field)
    for segment in key.split("/"):
        if segment == "":
            raise InvalidArgument(f"object key {key!r} has an empty path segment", field=field)
        if segment in (".", ".."):
            raise InvalidArgument(f"object key {key!r} contains a {segment!r} segment", field=field)
    return key


def validate_prefix(prefix: str, *, field: str = "prefix") -> str:
    """A listing prefix: empty (everything) or the start of a valid key.

    Prefixes match as plain strings, as on S3: "a/b" matches "a/b/c" *and* "a/bc"; use "a/b/" for a
    directory. Complete segments are checked like a key's; the last, partial segment may be anything a
    key segment may start with (".." is a fine start for "..x").
    """
    if prefix == "":
        return prefix
    try:
        prefix.encode()
    except UnicodeEncodeError:
        raise InvalidArgument(f"prefix {prefix!r} is not valid UTF-8", field=field) from None
    if _BAD_KEY_CHARS.search(prefix):
        raise InvalidArgument(f"prefix {prefix!r} contains a control character or backslash", field=field)
    head = prefix.rpartition("/")[0]
    if head or prefix.startswith("/"):
        validate_key(head or "/", field=field)
    return prefix


def _shown(value: object) -> str:
    """A bad value for an error message: its repr, cut to a short prefix."""
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 1] + "…"


def validate_bucket(bucket: str, *, field: str = "bucket", allowed: Collection[str] | None = None) -> str:
    """``bucket`` if it is a valid name and, when ``allowed`` is given (a store's ``allowed_buckets``),
    on that allow-list; else InvalidArgument naming ``field``."""
    if not isinstance(bucket, str) or not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise InvalidArgument(
            f"bucket name {_shown(bucket)} must be 3-63 chars of lower-case letters, digits, '.' and '-'",
            field=field,
        )
    if allowed is not None and bucket not in allowed:
        # Which buckets are allowed is the operator's business, not the caller's: not listed here.
        raise InvalidArgument(f"bucket {bucket!r} is not allowed (storage.allowed_buckets)", field=field)
    return bucket


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_stream(chunks: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return sha256_stream(iter(lambda: f.read(CHUNK_SIZE), b""))


class ChunkStream(Iterator[bytes]):
    """Chunks of one open object that release their file or connection however the reader stops.

    A plain generator only runs its cleanup once iteration has started; this closes on exhaustion,
    on ``close()``, on leaving a ``with`` block, or when garbage-collected, even if never iterated.
    """

    def __init__(self, chunks: Iterator[bytes], release: Callable[[], None]) -> None:
        self._chunks = chunks
        self._release: Callable[[], None] | None = release

    def __next__(self) -> bytes:
        if self._release is None:
            raise StopIteration
        try:
            return next(self._chunks)
        except BaseException:  # exhausted or failed: either way we are done with the source
            self.close()
            raise

    def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> ChunkStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: not every filesystem allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomically(
    chunks: Iterable[bytes],
    dest: Path,
    *,
    tmp_dir: Path | None = None,
    before_replace: Callable[[int, str, os.stat_result], None] | None = None,
) -> tuple[int, str]:
    """Write ``chunks`` to ``dest`` through a temp file + fsync + rename; return (size, sha256).

    A reader sees the old file or the whole new one. On any failure the temp file is removed and
    ``dest`` is untouched. ``tmp_dir`` must be on ``dest``'s filesystem (default: ``dest``'s directory,
    created if missing). ``dest``'s missing parent directories are made only once the data is complete,
    so a failed write leaves no trace. ``before_replace(size, sha256, stat)`` runs on the finished temp
    file just before the rename.
    """
    if tmp_dir is None:
        tmp_dir = dest.parent
        tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f".{secrets.token_hex(8)}.tmp"
    # os.open with 0o666 honours the umask (mkstemp would force 0600 on every object).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        digest, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
            if before_replace is not None:
                before_replace(size, digest.hexdigest(), os.fstat(f.fileno()))
        replace_making_parents(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return size, digest.hexdigest()


def replace_making_parents(src: str | Path, dest: Path) -> None:
    """``os.replace(src, dest)``, making ``dest``'s missing parents, then fsync the directory."""
    for attempt in range(3):
        try:
            os.replace(src, dest)
            break
        except FileNotFoundError:
            # The parent is new, or a concurrent delete just pruned it as empty: (re)make it.
            if attempt == 2 or not os.path.lexists(src):
                raise
            dest.parent.mkdir(parents=True, exist_ok=True)
    fsync_dir(dest.parent)


class ObjectStore(ABC):
    """One bucket-aware object store. ``bucket=None`` everywhere means the store's default bucket.

    Every method that takes ``bucket=`` accepts only the default bucket and ``allowed_buckets``
    (InvalidArgument naming ``bucket`` otherwise), and no method creates a bucket: requests name buckets,
    so a request could otherwise reach, or make, any bucket the store's credentials can.
    """

    def __init__(self, default_bucket: str, allowed_buckets: Iterable[str] = ()) -> None:
        self.default_bucket = validate_bucket(default_bucket, field="storage.bucket")
        extra = {validate_bucket(b, field="storage.allowed_buckets") for b in allowed_buckets}
        self.allowed_buckets: frozenset[str] = frozenset({self.default_bucket, *extra})

    def _bucket(self, bucket: str | None) -> str:
        if bucket is None:
            return self.default_bucket
        return validate_bucket(bucket, allowed=self.allowed_buckets)

    # --- writes -----------------------------------------------------------------------------------
    @abstractmethod
    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        bucket: str | None = None,
    ) -> ObjectRef:
        """Store ``data`` at ``key`` atomically (replacing any object there) and return its ref."""

    @abstractmethod
    def put_file(
        self,
        key: str,
        path: str | Path,
        *,
        content_type: str = "application/octet-stream",
        bucket: str | None = None,
    ) -> ObjectRef:
        """Store the file at ``path`` atomically (streamed, not read into memory)."""

    def move_file(
        self,
        key: str,
        path: str | Path,
        *,
        content_type: str = "application/octet-stream",
        bucket: str | None = None,
    ) -> ObjectRef:
        """``put_file``, then ``path`` is removed: the caller hands the file over (a model or checkpoint
        it wrote only to store). A store on the file's filesystem takes it by rename instead of copying
        it (the local store); the others upload it and delete it. On failure ``path`` is left alone."""
        ref = self.put_file(key, path, content_type=content_type, bucket=bucket)
        Path(path).unlink(missing_ok=True)
        return ref

    def shares_disk_with(self, path: str | Path) -> bool:
        """Whether this store keeps its objects on ``path``'s filesystem, so that ``move_file`` and
        ``get_readonly_file`` there cost no extra disk but every stored object does (a disk-space forecast
        asks). Remote stores: never."""
        return False

    # --- reads ------------------------------------------------------------------------------------
    @abstractmethod
    def get_bytes(self, key: str, *, bucket: str | None = None) -> bytes:
        """The object's bytes; NotFound naming the key if absent."""

    def get_file(self, key: str, path: str | Path, *, bucket: str | None = None) -> ObjectRef:
        """Download to ``path`` atomically (temp file + rename); returns the ref of what was read."""
        with self.open_stream(key, bucket=bucket) as chunks:
            size, sha256 = write_atomically(chunks, Path(path))
        return ObjectRef(self._bucket(bucket), key, size, sha256)

    def get_readonly_file(self, key: str, path: str | Path, *, bucket: str | None = None) -> ObjectRef:
        """``get_file`` for a caller that only reads the copy and never writes to it in place (a model
        or checkpoint to load): a store that can share the bytes instead of copying them does so (the
        local store hard-links them). Deleting the copy is fine."""
        return self.get_file(key, path, bucket=bucket)

    @abstractmethod
    def open_stream(
        self, key: str, *, chunk_size: int = CHUNK_SIZE, bucket: str | None = None
    ) -> ChunkStream:
        """Stream the object in chunks of at most ``chunk_size`` bytes.

        NotFound is raised by this call itself, before any chunk. The stream holds a file or connection:
        exhaust it, ``close()`` it or use it as a context manager (``ChunkStream``).
        """

    @abstractmethod
    def exists(self, key: str, *, bucket: str | None = None) -> bool: ...

    @abstractmethod
    def stat(self, key: str, *, bucket: str | None = None) -> ObjectRef:
        """The object's ref (size and sha256); NotFound if absent."""

    @abstractmethod
    def list(self, prefix: str = "", *, bucket: str | None = None) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, recursively, sorted by key."""

    # --- conditional writes: leases and fenced state -----------------------------------------------
    @abstractmethod
    def get_versioned(self, key: str, *, bucket: str | None = None) -> tuple[bytes, str]:
        """The object's bytes and an opaque version token for ``put_if``; NotFound if absent."""

    @abstractmethod
    def put_if(
        self,
        key: str,
        data: bytes,
        *,
        version: str | None,
        content_type: str = "application/octet-stream",
        bucket: str | None = None,
    ) -> str:
        """Store ``data`` only if the object is still at ``version`` (``None``: only if there is no object);
        returns the new version. ``Aborted`` when another writer changed (or made, or deleted) it first:
        compare-and-swap, so two writers can never both believe they wrote last."""

    # --- deletes ----------------------------------------------------------------------------------
    @abstractmethod
    def delete(self, key: str, *, bucket: str | None = None) -> None:
        """Remove the object; deleting a missing object is not an error."""

    # --- conveniences shared by all backends ------------------------------------------------------
    def sha256(self, key: str, *, bucket: str | None = None) -> str:
        return self.stat(key, bucket=bucket).sha256

    def delete_prefix(self, prefix: str, *, bucket: str | None = None) -> int:
        """Delete everything under ``prefix`` (must be non-empty); returns how many objects."""
        if not prefix:
            raise InvalidArgument("refusing to delete the whole bucket", field="prefix")
        keys = [info.key for info in self.list(prefix, bucket=bucket)]
        for key in keys:
            self.delete(key, bucket=bucket)
        return len(keys)

    def verify(self, ref: ObjectRef) -> bool:
        """True when ``ref`` exists with the recorded size and sha256 (a stage's 'already done' check)."""
        try:
            current = self.stat(ref.key, bucket=ref.bucket)
        except NotFound:
            # Only "missing" means "not done": an unreachable store must fail the stage, not make it
            # redo (and overwrite) finished work.
            return False
        return current.size == ref.size and current.sha256 == ref.sha256

    def put_json(self, key: str, value: object, *, bucket: str | None = None) -> ObjectRef:
        import json

        data = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False).encode()
        return self.put_bytes(key, data, content_type="application/json", bucket=bucket)

    def get_json(self, key: str, *, bucket: str | None = None) -> object:
        import json

        return json.loads(self.get_bytes(key, bucket=bucket))

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the default has nothing to release."""
