"""The local-directory backend: buckets are directories under ``root``, objects are files.

Layout::

    root/<bucket>/<key>          the objects
    root/.tmp/                   temp files of writes in flight (renamed into place when complete)
    root/.meta/<bucket>/<key>    sidecar {"sha256", "size", "mtime_ns", "ino"} written before the rename

Bucket names never start with '.', so the internal trees cannot collide with a bucket, and nothing
inside a bucket directory is ever anything but an object. The sidecar is trusted only while the
object's inode, size and mtime still match it; otherwise ``stat`` hashes the file (and re-caches).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from stat import S_ISDIR, S_ISREG

from dreamframe.disk_space import existing_parent
from dreamframe.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from dreamframe.storage.base import (
    CHUNK_SIZE,
    ChunkStream,
    ObjectInfo,
    ObjectRef,
    ObjectStore,
    replace_making_parents,
    sha256_bytes,
    sha256_file,
    sha256_stream,
    validate_key,
    validate_prefix,
    write_atomically,
)

TMP_DIR = ".tmp"
META_DIR = ".meta"
# Lock files of conditional writes (processes sharing this directory take them with flock).
LOCK_DIR = ".locks"
# Temp files this old were left by a killed writer; no live write takes a day.
STALE_TMP_SECONDS = 24 * 3600
# Key directories remembered as free of symlinks (a job's frames, thumbs, ... : a few per story).
PLAIN_DIRS_CACHED = 65536


class LocalStore(ObjectStore):
    def __init__(self, root: str | Path, default_bucket: str, *, allowed_buckets: Iterable[str] = ()) -> None:
        """The default bucket's directory is made here; other allowed buckets' directories must exist
        (the operator's, like S3 buckets): a write never makes one."""
        super().__init__(default_bucket, allowed_buckets)
        self.root = Path(root).absolute()
        self._real_buckets: dict[Path, str] = {}
        self._plain_dirs: set[tuple[Path, str]] = set()
        self._tmp = self.root / TMP_DIR
        self._tmp.mkdir(parents=True, exist_ok=True)
        (self.root / self.default_bucket).mkdir(exist_ok=True)
        self._remove_stale_temp_files()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r}, {self.default_bucket!r})"

    # --- paths ------------------------------------------------------------------------------------
    def _bucket_dir(self, bucket: str | None) -> Path:
        return self.root / self._bucket(bucket)

    def _path(self, key: str, bucket: str | None) -> Path:
        """The object's file; refuses keys that a symlink would lead out of the bucket.

        The common case costs one lstat: the key's directories are checked for links once per process
        (``_plain_dirs``) and the file itself every time. Only a key with a link on its way is resolved
        in full (realpath, an lstat per component from the root: a fifth of the coordinator's CPU when it
        ran for every thumbnail the storyboard reads). The check guards against links present in the
        tree; like any check-then-open it cannot stop someone swapping directories for links on the
        filesystem under a running service."""
        validate_key(key)
        bucket_dir = self._bucket_dir(bucket)
        path = bucket_dir / key
        real_bucket = self._real_buckets.get(bucket_dir)
        if real_bucket is None:  # the bucket directory itself is the operator's: resolved once
            real_bucket = self._real_buckets[bucket_dir] = os.path.realpath(bucket_dir) + os.sep
        parent = key.rpartition("/")[0]
        if self._plain_dir(bucket_dir, parent) and not os.path.islink(path):
            return path
        try:
            inside = os.path.realpath(path).startswith(real_bucket)
        except (OSError, RuntimeError):  # symlink loop
            inside = False
        if not inside:
            raise InvalidArgument(f"object key {key!r} resolves outside its bucket (symlink)", field="key")
        return path

    def _plain_dir(self, bucket_dir: Path, parent: str) -> bool:
        """True when no component of ``parent`` (a key's directory, under the bucket) is a symlink.
        Directories that all exist are remembered; a missing one can still be made, so is not."""
        if not parent or (bucket_dir, parent) in self._plain_dirs:
            return True
        current = str(bucket_dir)
        for part in parent.split("/"):
            current = f"{current}{os.sep}{part}"
            try:
                mode = os.lstat(current).st_mode
            except (FileNotFoundError, NotADirectoryError):
                return True  # nothing below a missing directory exists yet: no link either
            if not S_ISDIR(mode):
                return False  # a link (or a file where a directory should be): the full check decides
        if len(self._plain_dirs) >= PLAIN_DIRS_CACHED:
            self._plain_dirs.clear()
        self._plain_dirs.add((bucket_dir, parent))
        return True

    def _meta_path(self, key: str, bucket: str | None) -> Path:
        return self.root / META_DIR / self._bucket(bucket) / key

    def _not_found(self, key: str, bucket: str | None) -> NotFound:
        name = self._bucket(bucket)
        if not (self.root / name).is_dir():
            return NotFound(f"bucket {name!r} does not exist", field="bucket")
        return NotFound(f"no object {key!r} in bucket {name!r}", field="key")

    def _open(self, key: str, bucket: str | None):  # noqa: ANN202 - a binary file object
        path = self._path(key, bucket)
        try:
            return open(path, "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise self._not_found(key, bucket) from None

    # --- writes -----------------------------------------------------------------------------------
    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        bucket: str | None = None,
    ) -> ObjectRef:
        return self._write(key, [bytes(data)], bucket)

    def put_file(
        self,
        key: str,
        path: str | Path,
        *,
        content_type: str = "application/octet-stream",
        bucket: str | None = None,
    ) -> ObjectRef:
        # Opened here, so a bad source path is reported as such, not as a clash of keys below.
        with open(path, "rb") as f:
            return self._write(key, iter(lambda: f.read(CHUNK_SIZE), b""), bucket)

    def move_file(
        self,
        key: str,
        path: str | Path,
        *,
        content_type: str = "application/octet-stream",
        bucket: str | None = None,
    ) -> ObjectRef:
        """Renamed into the bucket when it is a plain file on this store's filesystem with no other name
        (another hard link could change the object in place later); copied otherwise. Either way it is
        hashed once, and a 14 GB exported model never needs twice its size of disk."""
        dest = self._writable_path(key, bucket)
        try:
            f = open(path, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NOFOLLOW))
        except OSError:  # a symlink (or missing: put_file reports that)
            return super().move_file(key, path, content_type=content_type, bucket=bucket)
        with f:
            st = os.fstat(f.fileno())
            if not S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_dev != self._tmp.stat().st_dev:
                return super().move_file(key, path, content_type=content_type, bucket=bucket)
            os.fsync(f.fileno())  # the caller's bytes may still be in the page cache only
            sha256 = sha256_stream(iter(lambda: f.read(CHUNK_SIZE), b""))
            after = os.fstat(f.fileno())
        if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns) or not _same_file(path, st):
            raise FailedPrecondition(f"{str(path)!r} changed while it was being stored", field="path")
        self._write_meta(self._meta_path(key, bucket), sha256, after)
        with self._write_errors(key):
            replace_making_parents(path, dest)
        return ObjectRef(self._bucket(bucket), key, after.st_size, sha256)

    def _write(self, key: str, chunks: Iterator[bytes] | list[bytes], bucket: str | None) -> ObjectRef:
        dest = self._writable_path(key, bucket)
        meta = self._meta_path(key, bucket)

        def record_sha(size: int, sha256: str, st: os.stat_result) -> None:
            self._write_meta(meta, sha256, st)

        with self._write_errors(key):
            size, sha256 = write_atomically(chunks, dest, tmp_dir=self._tmp, before_replace=record_sha)
        return ObjectRef(self._bucket(bucket), key, size, sha256)

    def _writable_path(self, key: str, bucket: str | None) -> Path:
        """The object's file, in a bucket that exists (a write never makes one)."""
        dest = self._path(key, bucket)
        if not self._bucket_dir(bucket).is_dir():
            raise NotFound(f"bucket {self._bucket(bucket)!r} does not exist", field="bucket")
        return dest

    @staticmethod
    @contextlib.contextmanager
    def _write_errors(key: str) -> Iterator[None]:
        """A write's filesystem errors as the caller's problem: a key clash, or a full disk (a
        RESOURCE_EXHAUSTED naming the key, not an INTERNAL; the write's temp file is already gone)."""
        try:
            yield
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(
                    f"no space left on the store's disk to write {key!r}", field="key"
                ) from None
            if not isinstance(exc, (FileExistsError, NotADirectoryError, IsADirectoryError)):
                raise
            # A directory can't also be a file: S3 allows "a" and "a/b" side by side, a filesystem doesn't.
            raise FailedPrecondition(
                f"object key {key!r} clashes with another key used as its directory (or vice versa); "
                "the local store cannot hold both 'a' and 'a/b'",
                field="key",
            ) from None

    def _write_meta(self, meta: Path, sha256: str, st: os.stat_result) -> None:
        """Cache the hash; best effort, since stat() falls back to hashing when this is missing."""
        record = {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
        with contextlib.suppress(OSError):
            meta.parent.mkdir(parents=True, exist_ok=True)
            write_atomically([json.dumps(record).encode()], meta, tmp_dir=self._tmp)

    def shares_disk_with(self, path: str | Path) -> bool:
        return existing_parent(Path(path)).stat().st_dev == self._tmp.stat().st_dev

    # --- reads ------------------------------------------------------------------------------------
    def get_bytes(self, key: str, *, bucket: str | None = None) -> bytes:
        with self._open(key, bucket) as f:
            return f.read()

    def get_readonly_file(self, key: str, path: str | Path, *, bucket: str | None = None) -> ObjectRef:
        """A hard link when ``path`` is on this store's filesystem: objects are only ever replaced by
        rename, never written in place, so the link keeps the bytes it was made with; copied otherwise."""
        src, path = self._path(key, bucket), Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        link = path.parent / f".{secrets.token_hex(8)}.link"
        try:
            # A symlink inside the bucket (checked by _path) counts as its target; link() would not follow.
            os.link(os.path.realpath(src), link)
        except (FileNotFoundError, NotADirectoryError):
            raise self._not_found(key, bucket) from None
        except OSError:  # another filesystem, a directory, or links not allowed here
            return self.get_file(key, path, bucket=bucket)
        try:
            st = os.lstat(link)
            if not S_ISREG(st.st_mode):
                raise self._not_found(key, bucket)
            sha256 = self._cached_sha(self._meta_path(key, bucket), st)
            if sha256 is None:
                sha256 = sha256_file(link)
            os.replace(link, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)
            raise
        return ObjectRef(self._bucket(bucket), key, st.st_size, sha256)

    def open_stream(
        self, key: str, *, chunk_size: int = CHUNK_SIZE, bucket: str | None = None
    ) -> ChunkStream:
        if chunk_size <= 0:
            raise InvalidArgument("must be positive", field="chunk_size")
        f = self._open(key, bucket)
        return ChunkStream(iter(lambda: f.read(chunk_size), b""), f.close)

    # --- conditional writes: the version is the content's sha256, compared under a per-key flock ------
    @contextlib.contextmanager
    def _key_lock(self, key: str, bucket: str | None) -> Iterator[None]:
        self._path(key, bucket)  # validates the key
        lock = self.root / LOCK_DIR / self._bucket(bucket) / f"{key}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def get_versioned(self, key: str, *, bucket: str | None = None) -> tuple[bytes, str]:
        with self._key_lock(key, bucket):
            data = self.get_bytes(key, bucket=bucket)
        return data, sha256_bytes(data)

    def put_if(
        self,
        key: str,
        data: bytes,
        *,
        version: str | None,
        content_type: str = "application/octet-stream",
        bucket: str | None = None,
    ) -> str:
        with self._key_lock(key, bucket):
            try:
                current: str | None = sha256_bytes(self.get_bytes(key, bucket=bucket))
            except NotFound:
                current = None
            if current != version:
                raise Aborted(f"object {key!r} changed since it was read (another writer)", field="key")
            return self._write(key, [bytes(data)], bucket).sha256

    def exists(self, key: str, *, bucket: str | None = None) -> bool:
        return self._path(key, bucket).is_file()

    def stat(self, key: str, *, bucket: str | None = None) -> ObjectRef:
        path = self._path(key, bucket)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise self._not_found(key, bucket) from None
        if not S_ISREG(st.st_mode):  # a directory is not an object
            raise self._not_found(key, bucket)
        meta = self._meta_path(key, bucket)
        sha256 = self._cached_sha(meta, st)
        if sha256 is None:
            sha256, st = self._hash_and_cache(path, meta)
        return ObjectRef(self._bucket(bucket), key, st.st_size, sha256)

    @staticmethod
    def _cached_sha(meta: Path, st: os.stat_result) -> str | None:
        try:
            record = json.loads(meta.read_bytes())
        except (OSError, ValueError):
            return None
        current = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
        if not isinstance(record, dict) or any(record.get(k) != v for k, v in current.items()):
            return None
        sha256 = record.get("sha256")
        return sha256 if isinstance(sha256, str) and len(sha256) == 64 else None

    def _hash_and_cache(self, path: Path, meta: Path) -> tuple[str, os.stat_result]:
        try:
            with open(path, "rb") as f:
                before = os.fstat(f.fileno())
                sha256 = sha256_stream(iter(lambda: f.read(CHUNK_SIZE), b""))
                after = os.fstat(f.fileno())
        except FileNotFoundError:  # deleted while we looked
            raise NotFound(f"object at {path} vanished", field="key") from None
        # Cache only if nobody changed the file while we hashed it.
        if (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns):
            self._write_meta(meta, sha256, after)
        return sha256, after

    def list(self, prefix: str = "", *, bucket: str | None = None) -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        bucket_dir = self._bucket_dir(bucket)
        # Walk only the deepest directory the prefix names; filter the rest as strings (S3 semantics).
        start = bucket_dir / prefix.rpartition("/")[0]
        real_bucket = bucket_dir.resolve()
        found: list[ObjectInfo] = []
        for dirpath, _dirs, files in os.walk(start):
            for name in files:
                path = Path(dirpath) / name
                key = path.relative_to(bucket_dir).as_posix()
                if not key.startswith(prefix) or not self._listable(key, path, real_bucket):
                    continue
                found.append(ObjectInfo(key, path.stat().st_size))
        found.sort(key=lambda info: info.key)
        return iter(found)

    @staticmethod
    def _listable(key: str, path: Path, real_bucket: Path) -> bool:
        """Regular files inside the bucket whose names are valid keys (skips foreign junk)."""
        try:
            validate_key(key)
            return path.is_file() and path.resolve().is_relative_to(real_bucket)
        except (InvalidArgument, OSError, RuntimeError):
            return False

    # --- deletes ----------------------------------------------------------------------------------
    def delete(self, key: str, *, bucket: str | None = None) -> None:
        path = self._path(key, bucket)
        meta_top = self.root / META_DIR / self._bucket(bucket)
        for file, top in ((path, self._bucket_dir(bucket)), (meta_top / key, meta_top)):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError, IsADirectoryError):
                file.unlink()
            self._prune_empty_dirs(file.parent, top)

    @staticmethod
    def _prune_empty_dirs(directory: Path, top: Path) -> None:
        """Remove now-empty directories up to (not including) ``top`` so "a" can later be a key again."""
        while directory != top and top in directory.parents:
            try:
                directory.rmdir()
            except OSError:  # not empty (or already gone): stop
                return
            directory = directory.parent

    def _remove_stale_temp_files(self) -> None:
        cutoff = time.time() - STALE_TMP_SECONDS
        for entry in os.scandir(self._tmp):
            with contextlib.suppress(OSError):
                if entry.is_file() and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)


def _same_file(path: str | Path, st: os.stat_result) -> bool:
    """``path`` still names the file ``st`` was taken of (nobody swapped it while it was hashed)."""
    try:
        now = os.lstat(path)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)
