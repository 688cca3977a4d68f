"""One contract, two backends: every test in the first part runs on LocalStore and on S3Store against a
real S3 server (tests/s3server.py). Backend-specific behaviour is tested at the end."""

from __future__ import annotations

import builtins
import errno
import gc
import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from minio import Minio
from s3server import S3Server

from dreamframe.config import StorageSettings
from dreamframe.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from dreamframe.storage import LocalStore, ObjectInfo, ObjectRef, ObjectStore, S3Store, open_store

BIG = 6 * 1024 * 1024 + 12345  # over one 5 MiB part: S3 uploads it in two parts


def fresh_bucket() -> str:
    return f"t-{uuid.uuid4().hex[:24]}"


def s3_store(server: S3Server, bucket: str | None = None, **kwargs: object) -> S3Store:
    return S3Store(server.endpoint, server.access_key, server.secret_key, bucket or fresh_bucket(), **kwargs)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    """A store whose allow-list holds, besides its default bucket, one more bucket that exists ("o-…", made
    by the operator, here the test) and one that does not ("m-…")."""
    other, missing = f"o-{uuid.uuid4().hex[:24]}", f"m-{uuid.uuid4().hex[:24]}"
    if request.param == "local":
        (tmp_path / "store" / other).mkdir(parents=True)
        made: ObjectStore = LocalStore(tmp_path / "store", "dreamframe", allowed_buckets=[other, missing])
    else:
        server = request.getfixturevalue("s3_server")
        raw_client(server).make_bucket(other)
        made = s3_store(server, allowed_buckets=[other, missing])
    yield made
    made.close()


def other_bucket(store: ObjectStore) -> str:
    """The allowed, existing bucket besides the default one."""
    return next(b for b in store.allowed_buckets if b.startswith("o-"))


def missing_bucket(store: ObjectStore) -> str:
    """The allowed bucket that nobody made."""
    return next(b for b in store.allowed_buckets if b.startswith("m-"))


def bucket_exists(store: ObjectStore, bucket: str, s3_server: S3Server | None = None) -> bool:
    if isinstance(store, S3Store):
        return raw_client(s3_server).bucket_exists(bucket)
    return (store.root / bucket).exists()


def keys(store: ObjectStore, prefix: str = "", bucket: str | None = None) -> list[str]:
    return [info.key for info in store.list(prefix, bucket=bucket)]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def random_bytes(n: int, seed: int = 0) -> bytes:
    # Incompressible and different per seed, without os.urandom's cost for big sizes.
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    return (block * (n // len(block) + 1))[:n]


def open_resources(store: ObjectStore) -> int:
    """What an unclosed stream would leak: file descriptors (local) or checked-out connections (S3)."""
    if isinstance(store, S3Store):
        pools = [store._http.pools[k] for k in store._http.pools.keys()]
        return sum(p.pool.maxsize - p.pool.qsize() for p in pools if p.pool is not None)
    return len(os.listdir("/proc/self/fd"))


# --- bytes, files, JSON -------------------------------------------------------------------------------


def test_put_get_bytes(store: ObjectStore) -> None:
    data = b"hello \x00 world"
    ref = store.put_bytes("a/b/hello.bin", data)
    assert ref == ObjectRef(store.default_bucket, "a/b/hello.bin", len(data), sha(data))
    assert store.get_bytes("a/b/hello.bin") == data
    assert store.stat("a/b/hello.bin") == ref


def test_empty_object(store: ObjectStore) -> None:
    ref = store.put_bytes("empty", b"")
    assert ref.size == 0 and ref.sha256 == sha(b"")
    assert store.get_bytes("empty") == b""
    assert list(store.open_stream("empty")) == []
    assert store.stat("empty") == ref


@pytest.mark.parametrize("size", [0, 1000, BIG])
def test_put_get_file(store: ObjectStore, tmp_path: Path, size: int) -> None:
    data = random_bytes(size, seed=size)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    ref = store.put_file("files/f.bin", src, content_type="image/png")
    assert ref == ObjectRef(store.default_bucket, "files/f.bin", size, sha(data))
    assert store.stat("files/f.bin") == ref

    dest = tmp_path / "out" / "nested" / "f.bin"  # parents are created
    got = store.get_file("files/f.bin", dest)
    assert got == ref
    assert dest.read_bytes() == data
    assert os.listdir(dest.parent) == ["f.bin"]  # no temp file left next to it


def test_get_file_replaces_existing_target(store: ObjectStore, tmp_path: Path) -> None:
    store.put_bytes("k", b"new")
    dest = tmp_path / "t.bin"
    dest.write_bytes(b"old contents, longer")
    store.get_file("k", dest)
    assert dest.read_bytes() == b"new"


def test_get_file_missing_leaves_target_alone(store: ObjectStore, tmp_path: Path) -> None:
    dest = tmp_path / "downloads" / "t.bin"
    dest.parent.mkdir()
    dest.write_bytes(b"keep me")
    with pytest.raises(NotFound):
        store.get_file("missing", dest)
    assert dest.read_bytes() == b"keep me"
    assert os.listdir(dest.parent) == ["t.bin"]


@pytest.mark.parametrize("size", [0, 1000, BIG])
def test_move_file_stores_it_and_removes_the_source(store: ObjectStore, tmp_path: Path, size: int) -> None:
    data = random_bytes(size, seed=size + 1)
    src = tmp_path / "export" / "model.safetensors"
    src.parent.mkdir()
    src.write_bytes(data)
    ref = store.move_file("runs/r/final/model.safetensors", src)
    assert ref == ObjectRef(store.default_bucket, "runs/r/final/model.safetensors", size, sha(data))
    assert not src.exists()
    assert store.stat(ref.key) == ref
    assert store.get_bytes(ref.key) == data


@pytest.mark.parametrize(
    ("key", "bucket", "error"),
    [("../escape", None, InvalidArgument), ("k", "missing", NotFound)],
)
def test_failed_move_file_keeps_the_source(
    store: ObjectStore, tmp_path: Path, key: str, bucket: str | None, error: type
) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"not lost")
    with pytest.raises(error):
        store.move_file(key, src, bucket=missing_bucket(store) if bucket else None)
    assert src.read_bytes() == b"not lost"
    assert keys(store) == []


def test_get_readonly_file_is_what_was_stored_then(store: ObjectStore, tmp_path: Path) -> None:
    first = random_bytes(BIG, seed=7)
    ref = store.put_bytes("ckpt/weights.bin", first)
    dest = tmp_path / "load" / "weights.bin"  # parents are created
    assert store.get_readonly_file("ckpt/weights.bin", dest) == ref
    assert dest.read_bytes() == first
    assert os.listdir(dest.parent) == ["weights.bin"]  # no temp file or link name left
    # A later write of the key does not reach the copy, nor does deleting the copy reach the object.
    store.put_bytes("ckpt/weights.bin", b"retrained")
    assert dest.read_bytes() == first
    dest.unlink()
    assert store.get_bytes("ckpt/weights.bin") == b"retrained"


def test_get_readonly_file_of_a_missing_key(store: ObjectStore, tmp_path: Path) -> None:
    dest = tmp_path / "downloads" / "t.bin"
    dest.parent.mkdir()
    dest.write_bytes(b"keep me")
    with pytest.raises(NotFound) as err:
        store.get_readonly_file("absent/key", dest)
    assert err.value.field == "key" and "absent/key" in err.value.message
    assert dest.read_bytes() == b"keep me"
    assert os.listdir(dest.parent) == ["t.bin"]


def test_shares_disk_with_says_whether_stored_objects_take_that_disk(
    store: ObjectStore, tmp_path: Path
) -> None:
    # A disk-space forecast asks: only a local store keeps objects on the caller's disk (and takes files
    # from it by rename); a path not made yet is judged by its nearest existing parent.
    expected = isinstance(store, LocalStore)
    assert store.shares_disk_with(tmp_path / "work" / "not-yet") is expected


def test_json_round_trip(store: ObjectStore) -> None:
    value = {"overview": "ünïcødé ✓", "img_diag": [["frame", "x"], ["dialogue", "y"]], "n": 3, "f": None}
    ref = store.put_json("story.json", value)
    assert store.get_json("story.json") == value
    assert ref.sha256 == sha(store.get_bytes("story.json"))
    assert json.loads(store.get_bytes("story.json")) == value


def test_overwrite_replaces(store: ObjectStore) -> None:
    first = store.put_bytes("k", b"first version, which is longer")
    second = store.put_bytes("k", b"second")
    assert store.get_bytes("k") == b"second"
    assert store.stat("k") == second
    assert second.sha256 != first.sha256
    assert keys(store) == ["k"]


# --- streaming ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 7, 1 << 20])
def test_stream_chunks_concatenate_to_the_object(store: ObjectStore, chunk_size: int) -> None:
    data = random_bytes(50_000 if chunk_size > 1 else 3_000)
    store.put_bytes("s", data)
    chunks = list(store.open_stream("s", chunk_size=chunk_size))
    assert b"".join(chunks) == data
    assert all(0 < len(c) <= chunk_size for c in chunks)
    if chunk_size < len(data):
        assert len(chunks) > 1


def test_stream_of_missing_raises_at_the_call(store: ObjectStore) -> None:
    with pytest.raises(NotFound) as err:
        store.open_stream("nope")  # not on the first next(): callers learn before they start consuming
    assert err.value.field == "key"


def test_stream_rejects_bad_chunk_size(store: ObjectStore) -> None:
    store.put_bytes("s", b"x")
    with pytest.raises(InvalidArgument) as err:
        store.open_stream("s", chunk_size=0)
    assert err.value.field == "chunk_size"


@pytest.mark.parametrize("how", ["close", "with", "break-and-drop", "never-iterated"])
def test_early_stopping_consumer_does_not_leak(store: ObjectStore, how: str) -> None:
    store.put_bytes("s", random_bytes(300_000))
    store.get_bytes("s")  # warm the connection pool so the baseline is steady
    gc.collect()  # and let earlier garbage close its files first
    baseline = open_resources(store)
    for _ in range(12):  # more than the S3 pool's 10 connections
        if how == "close":
            stream = store.open_stream("s", chunk_size=1000)
            next(stream)
            stream.close()
        elif how == "with":
            with store.open_stream("s", chunk_size=1000) as stream:
                next(stream)
        elif how == "break-and-drop":
            for _chunk in store.open_stream("s", chunk_size=1000):
                break
        else:
            stream = store.open_stream("s", chunk_size=1000)
            del stream  # released at once by reference counting, not at some later GC
        assert open_resources(store) == baseline
    # And the store still works afterwards (no exhausted pool, no half-read connection reused).
    assert store.get_bytes("s") == random_bytes(300_000)


def test_exhausted_stream_releases_by_itself(store: ObjectStore) -> None:
    store.put_bytes("s", b"abc" * 1000)
    store.get_bytes("s")
    gc.collect()
    baseline = open_resources(store)
    stream = store.open_stream("s", chunk_size=100)
    assert b"".join(stream) == b"abc" * 1000
    assert open_resources(store) == baseline
    assert list(stream) == []  # still an iterator, just empty


# --- exists, stat, verify, NotFound -------------------------------------------------------------------


def test_exists(store: ObjectStore) -> None:
    assert not store.exists("x/y")
    store.put_bytes("x/y", b"1")
    assert store.exists("x/y")
    assert not store.exists("x")  # a "directory" is not an object
    assert not store.exists("x/y/z")


def test_stat_matches_hashlib(store: ObjectStore, tmp_path: Path) -> None:
    data = random_bytes(123_457, seed=7)
    src = tmp_path / "f"
    src.write_bytes(data)
    store.put_file("f", src)
    ref = store.stat("f")
    assert (ref.size, ref.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert store.sha256("f") == ref.sha256


def test_verify(store: ObjectStore) -> None:
    ref = store.put_bytes("v", b"version one")
    assert store.verify(ref)
    assert not store.verify(ObjectRef(ref.bucket, ref.key, ref.size + 1, ref.sha256))
    assert not store.verify(ObjectRef(ref.bucket, ref.key, ref.size, "0" * 64))
    store.put_bytes("v", b"version two")  # same size, other bytes
    assert not store.verify(ref)
    store.delete("v")
    assert not store.verify(ref)
    assert not store.verify(ObjectRef(missing_bucket(store), "v", ref.size, ref.sha256))


@pytest.mark.parametrize("call", ["get_bytes", "stat", "get_file", "open_stream"])
def test_missing_key_is_not_found_naming_the_key(store: ObjectStore, tmp_path: Path, call: str) -> None:
    store.put_bytes("present", b"1")
    args = (tmp_path / "out",) if call == "get_file" else ()
    with pytest.raises(NotFound) as err:
        getattr(store, call)("absent/key", *args)
    assert err.value.field == "key"
    assert "absent/key" in err.value.message


def test_missing_bucket(store: ObjectStore) -> None:
    other = missing_bucket(store)
    with pytest.raises(NotFound) as err:
        store.get_bytes("k", bucket=other)
    assert err.value.field in ("bucket", "key")
    assert not store.exists("k", bucket=other)
    assert keys(store, bucket=other) == []
    store.delete("k", bucket=other)  # nothing to delete is fine


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.put_bytes("../escape", b"x"),
        lambda s: s.get_bytes("/etc/passwd"),
        lambda s: s.stat("a//b"),
        lambda s: s.exists("a\\b"),
        lambda s: s.delete("a/../b"),
        lambda s: s.open_stream("a\nb"),
        lambda s: list(s.list("../")),
        lambda s: s.put_bytes("ok", b"x", bucket="Bad_Bucket"),
    ],
)
def test_bad_keys_are_rejected_before_any_io(store: ObjectStore, call) -> None:  # noqa: ANN001
    with pytest.raises(InvalidArgument) as err:
        call(store)
    assert err.value.field in ("key", "prefix", "bucket")
    assert keys(store) == []


# --- listing ------------------------------------------------------------------------------------------

LISTING = ["a/b/c", "a/bc", "a/bd/e", "a-c", "ab", "b", "z/y/x/w"]


@pytest.fixture
def listed(store: ObjectStore) -> ObjectStore:
    for i, key in enumerate(reversed(LISTING)):
        store.put_bytes(key, b"x" * i)
    return store


def test_list_everything_sorted_and_recursive(listed: ObjectStore) -> None:
    infos = list(listed.list())
    # Byte order, as S3 lists: '-' (0x2d) < '/' (0x2f) < letters.
    assert (
        [i.key for i in infos] == sorted(LISTING) == ["a-c", "a/b/c", "a/bc", "a/bd/e", "ab", "b", "z/y/x/w"]
    )
    sizes = {key: i for i, key in enumerate(reversed(LISTING))}
    assert infos == [ObjectInfo(key, sizes[key]) for key in sorted(LISTING)]


def test_prefix_is_a_plain_string_prefix(listed: ObjectStore) -> None:
    # As on S3, "a/b" also matches "a/bc" and "a/bd/e": end a prefix with "/" to mean a directory.
    assert keys(listed, "a/b") == ["a/b/c", "a/bc", "a/bd/e"]
    assert keys(listed, "a/b/") == ["a/b/c"]
    assert keys(listed, "a") == ["a-c", "a/b/c", "a/bc", "a/bd/e", "ab"]
    assert keys(listed, "a/") == ["a/b/c", "a/bc", "a/bd/e"]
    assert keys(listed, "z/y/") == ["z/y/x/w"]
    assert keys(listed, "a/bc/") == []
    assert keys(listed, "nothing") == []
    assert keys(listed, "b") == ["b"]


def test_delete(listed: ObjectStore) -> None:
    listed.delete("a/bc")
    listed.delete("a/bc")  # missing is fine
    listed.delete("never/existed")
    assert keys(listed, "a/") == ["a/b/c", "a/bd/e"]
    assert not listed.exists("a/bc")


def test_delete_prefix(listed: ObjectStore) -> None:
    assert listed.delete_prefix("a/b/") == 1
    assert listed.delete_prefix("a/b") == 2  # a string prefix: takes "a/bc" and "a/bd/e" too
    assert keys(listed) == ["a-c", "ab", "b", "z/y/x/w"]
    assert listed.delete_prefix("nothing/") == 0
    with pytest.raises(InvalidArgument) as err:
        listed.delete_prefix("")
    assert err.value.field == "prefix"
    assert len(keys(listed)) == 4


def test_key_freed_by_delete_can_be_reused_as_directory(store: ObjectStore) -> None:
    store.put_bytes("p/q/r", b"1")
    store.delete("p/q/r")
    store.put_bytes("p/q", b"2")  # locally, the empty directory "p/q" must have been removed
    assert keys(store) == ["p/q"]


def test_multiple_buckets(store: ObjectStore) -> None:
    other = other_bucket(store)
    a = store.put_bytes("same/key", b"default bucket")
    b = store.put_bytes("same/key", b"other bucket", bucket=other)
    assert (a.bucket, b.bucket) == (store.default_bucket, other)
    assert store.get_bytes("same/key") == b"default bucket"
    assert store.get_bytes("same/key", bucket=other) == b"other bucket"
    assert store.stat("same/key", bucket=other) == b
    assert store.verify(a) and store.verify(b)
    store.put_json("only/there.json", [1], bucket=other)
    assert keys(store) == ["same/key"]
    assert keys(store, bucket=other) == ["only/there.json", "same/key"]
    assert store.delete_prefix("only/", bucket=other) == 1
    store.delete("same/key", bucket=other)
    assert keys(store, bucket=other) == []
    assert store.get_bytes("same/key") == b"default bucket"


# --- the bucket allow-list -----------------------------------------------------------------------------

# Every ObjectStore method that takes bucket=, with a harmless call.
BUCKET_CALLS = {
    "put_bytes": lambda s, b, p: s.put_bytes("k", b"x", bucket=b),
    "put_file": lambda s, b, p: s.put_file("k", p, bucket=b),
    "move_file": lambda s, b, p: s.move_file("k", p, bucket=b),
    "put_json": lambda s, b, p: s.put_json("k.json", [1], bucket=b),
    "put_if": lambda s, b, p: s.put_if("k", b"x", version=None, bucket=b),
    "get_bytes": lambda s, b, p: s.get_bytes("k", bucket=b),
    "get_json": lambda s, b, p: s.get_json("k.json", bucket=b),
    "get_file": lambda s, b, p: s.get_file("k", p.parent / "out", bucket=b),
    "get_readonly_file": lambda s, b, p: s.get_readonly_file("k", p.parent / "out", bucket=b),
    "get_versioned": lambda s, b, p: s.get_versioned("k", bucket=b),
    "open_stream": lambda s, b, p: s.open_stream("k", bucket=b),
    "exists": lambda s, b, p: s.exists("k", bucket=b),
    "stat": lambda s, b, p: s.stat("k", bucket=b),
    "sha256": lambda s, b, p: s.sha256("k", bucket=b),
    "verify": lambda s, b, p: s.verify(ObjectRef(b, "k", 1, sha(b"x"))),
    "list": lambda s, b, p: list(s.list("", bucket=b)),
    "delete": lambda s, b, p: s.delete("k", bucket=b),
    "delete_prefix": lambda s, b, p: s.delete_prefix("k", bucket=b),
}


@pytest.mark.parametrize("call", sorted(BUCKET_CALLS))
def test_buckets_off_the_allow_list_are_refused(
    store: ObjectStore, tmp_path: Path, request: pytest.FixtureRequest, call: str
) -> None:
    s3 = request.getfixturevalue("s3_server") if isinstance(store, S3Store) else None
    outsider = fresh_bucket()
    if s3 is not None:
        # It exists and the store's credentials reach it: only the allow-list stands in the way.
        raw_client(s3).make_bucket(outsider)
        raw_client(s3).put_object(outsider, "k", io.BytesIO(b"x"), 1)
    src = tmp_path / "src"
    src.write_bytes(b"x")
    with pytest.raises(InvalidArgument) as err:
        BUCKET_CALLS[call](store, outsider, src)
    assert err.value.field == "bucket"
    assert "not allowed" in err.value.message
    if s3 is not None:
        assert [o.object_name for o in raw_client(s3).list_objects(outsider)] == ["k"]
        assert raw_client(s3).get_object(outsider, "k").read() == b"x"
    else:
        assert not (store.root / outsider).exists()
        assert not any(outsider in str(p) for p in store.root.rglob("*"))  # no .meta/.locks trees either


def test_the_default_bucket_is_always_allowed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, "dreamframe", allowed_buckets=["other-team"])
    assert store.allowed_buckets == {"dreamframe", "other-team"}
    assert LocalStore(tmp_path, "dreamframe").allowed_buckets == {"dreamframe"}
    with pytest.raises(InvalidArgument) as err:
        LocalStore(tmp_path, "dreamframe", allowed_buckets=["Bad_Name"])
    assert err.value.field == "storage.allowed_buckets"


@pytest.mark.parametrize("call", ["put_bytes", "put_file", "move_file", "put_json", "put_if"])
def test_no_write_creates_a_bucket(
    store: ObjectStore, tmp_path: Path, request: pytest.FixtureRequest, call: str
) -> None:
    """An allowed bucket that nobody made stays unmade: writes to it fail NOT_FOUND naming the bucket."""
    s3 = request.getfixturevalue("s3_server") if isinstance(store, S3Store) else None
    missing = missing_bucket(store)
    src = tmp_path / "src"
    src.write_bytes(b"x")
    with pytest.raises(NotFound) as err:
        BUCKET_CALLS[call](store, missing, src)
    assert err.value.field == "bucket"
    assert not bucket_exists(store, missing, s3)


def test_storage_settings_allowed_buckets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dreamframe.config import load_settings

    (tmp_path / "team-b").mkdir()
    monkeypatch.setenv("DREAMFRAME_STORAGE__ALLOWED_BUCKETS", " team-b, team-c ")
    monkeypatch.setenv("DREAMFRAME_STORAGE__ROOT", str(tmp_path))
    settings = load_settings().storage
    assert settings.allowed_buckets == ["team-b", "team-c"]
    store = open_store(settings)
    assert store.allowed_buckets == {"dreamframe", "team-b", "team-c"}
    store.put_bytes("k", b"b", bucket="team-b")
    monkeypatch.setenv("DREAMFRAME_STORAGE__ALLOWED_BUCKETS", '["team-b"]')
    assert load_settings().storage.allowed_buckets == ["team-b"]
    monkeypatch.delenv("DREAMFRAME_STORAGE__ALLOWED_BUCKETS")
    assert open_store(load_settings().storage).allowed_buckets == {"dreamframe"}


def test_s3_create_bucket_makes_only_the_default_bucket(s3_server: S3Server) -> None:
    default, other = fresh_bucket(), fresh_bucket()
    store = s3_store(s3_server, default, allowed_buckets=[other])
    assert raw_client(s3_server).bucket_exists(default)
    assert not raw_client(s3_server).bucket_exists(other)
    with pytest.raises(NotFound):
        store.put_bytes("k", b"x", bucket=other)
    assert not raw_client(s3_server).bucket_exists(other)


# --- atomicity ----------------------------------------------------------------------------------------


class InjectedFault(OSError):
    pass


class FailingReader:
    """A file whose reads fail once ``fail_after`` bytes have been read (a disk error mid-upload)."""

    def __init__(self, f: io.BufferedReader, fail_after: int) -> None:
        self._f, self._left = f, fail_after

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._left -= len(data)
        if self._left < 0:
            raise InjectedFault("disk read error (injected)")
        return data

    def readinto(self, buf) -> int:  # noqa: ANN001
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def __enter__(self) -> FailingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()

    def __getattr__(self, name: str) -> object:
        return getattr(self._f, name)


def patch_open(
    monkeypatch: pytest.MonkeyPatch, path: Path, fail_on: int | None, fail_after: int
) -> list[int]:
    """Count opens of ``path``; make the ``fail_on``-th one (1-based) fail mid-read. Returns the counter."""
    real_open = builtins.open
    opened = [0]

    def fake_open(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, str | os.PathLike) and os.fspath(file) == str(path) and "r" in mode:
            opened[0] += 1
            if opened[0] == fail_on:
                return FailingReader(f, fail_after)
        return f

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    return opened


def test_failed_put_file_leaves_previous_object_intact(
    store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = store.put_bytes("obj", b"the previous, complete object")
    src = tmp_path / "big.bin"
    src.write_bytes(random_bytes(BIG, seed=1))

    # How many times does this backend open the source (S3: once to hash, once to upload)?
    with monkeypatch.context() as m:
        opened = patch_open(m, src, fail_on=None, fail_after=0)
        store.put_file("probe", src)
    assert opened[0] >= 1
    store.delete("probe")

    # Fail each of those reads in turn, past the first 5 MiB part, so S3 has begun a multipart upload.
    for fail_on in range(1, opened[0] + 1):
        with monkeypatch.context() as m:
            patch_open(m, src, fail_on=fail_on, fail_after=5 * 1024 * 1024 + 100)
            with pytest.raises(InjectedFault):
                store.put_file("obj", src)
        assert store.get_bytes("obj") == b"the previous, complete object"
        assert store.stat("obj") == old
        assert keys(store) == ["obj"]  # no partial or temp object is visible

    # A failed write of a brand-new key leaves nothing at all.
    with monkeypatch.context() as m:
        patch_open(m, src, fail_on=opened[0], fail_after=1000)
        with pytest.raises(InjectedFault):
            store.put_file("new/deep/key", src)
    assert keys(store) == ["obj"]
    assert not store.exists("new/deep/key")


def test_put_file_of_bad_source_writes_nothing(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        store.put_file("k", tmp_path / "does-not-exist")
    (tmp_path / "a-directory").mkdir()
    with pytest.raises(IsADirectoryError):
        store.put_file("k", tmp_path / "a-directory")
    assert keys(store) == []


# --- open_store -----------------------------------------------------------------------------------------


def test_open_store_local(tmp_path: Path) -> None:
    store = open_store(StorageSettings(backend="local", root=tmp_path / "s", bucket="bkt"))
    assert isinstance(store, LocalStore)
    store.put_bytes("k", b"v")
    assert (tmp_path / "s" / "bkt" / "k").read_bytes() == b"v"


def test_open_store_s3(s3_server: S3Server) -> None:
    bucket = fresh_bucket()
    settings = StorageSettings(
        backend="s3",
        endpoint=s3_server.endpoint,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        bucket=bucket,
    )
    store = open_store(settings)
    assert isinstance(store, S3Store)
    ref = store.put_bytes("k", b"v")
    assert open_store(settings).verify(ref)


# --- LocalStore specifics -----------------------------------------------------------------------------


def test_local_layout_and_internal_files_are_never_listed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, "bkt")
    store.put_bytes("a/b", b"1")
    assert (tmp_path / "bkt" / "a" / "b").read_bytes() == b"1"
    # Keys that look like internal names are ordinary objects.
    store.put_bytes(".tmp/x", b"2")
    store.put_bytes(".meta/y", b"3")
    assert keys(store) == [".meta/y", ".tmp/x", "a/b"]
    assert os.listdir(tmp_path / ".tmp") == []


def test_local_failed_write_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path, "bkt")
    src = tmp_path / "src"
    src.write_bytes(b"x" * 10_000)
    patch_open(monkeypatch, src, fail_on=1, fail_after=5000)
    with pytest.raises(InjectedFault):
        store.put_file("a/b/c", src)
    assert os.listdir(tmp_path / ".tmp") == []
    assert not (tmp_path / "bkt" / "a").exists()  # not even the directories


def test_local_full_disk_is_resource_exhausted_and_keeps_the_stored_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path, "bkt")
    store.put_bytes("frames/0001.png", b"first")

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(ResourceExhausted) as err:
        store.put_bytes("frames/0001.png", b"second")
    # The caller's problem, named by its key (RESOURCE_EXHAUSTED), not an internal error with a path.
    assert (
        err.value.field == "key"
        and "no space left" in err.value.message
        and str(tmp_path) not in err.value.message
    )
    monkeypatch.undo()
    assert store.get_bytes("frames/0001.png") == b"first"
    assert os.listdir(tmp_path / ".tmp") == []


def test_local_stat_uses_recorded_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path, "bkt")
    ref = store.put_bytes("k", b"payload")
    monkeypatch.setattr(LocalStore, "_hash_and_cache", lambda *a: pytest.fail("stat() re-hashed"))
    assert store.stat("k") == ref


def test_local_stat_falls_back_to_hashing(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, "bkt")
    store.put_bytes("k", b"payload")
    # Replaced behind the store's back: the sidecar no longer matches, so it is not trusted.
    (tmp_path / "bkt" / "k").write_bytes(b"other bytes")
    assert store.stat("k").sha256 == sha(b"other bytes")
    # Sidecars gone entirely (e.g. a store copied without hidden dirs): still right.
    store.put_bytes("j", b"jjj")
    for meta in (tmp_path / ".meta").rglob("*"):
        if meta.is_file():
            meta.unlink()
    assert store.stat("j").sha256 == sha(b"jjj")


def test_local_symlink_escape_is_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root", "bkt")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (tmp_path / "root" / "bkt" / "link").symlink_to(outside, target_is_directory=True)
    (tmp_path / "root" / "bkt" / "file-link").symlink_to(outside / "secret")
    for call in (
        lambda: store.get_bytes("link/secret"),
        lambda: store.put_bytes("link/new", b"x"),
        lambda: store.get_bytes("file-link"),
        lambda: store.get_readonly_file("file-link", tmp_path / "copy"),
        lambda: store.delete("link/secret"),
    ):
        with pytest.raises(InvalidArgument) as err:
            call()
        assert err.value.field == "key"
        assert "outside its bucket" in err.value.message
    assert sorted(os.listdir(outside)) == ["secret"]
    assert (outside / "secret").read_bytes() == b"secret"
    assert keys(store) == []


def test_local_links_are_judged_by_where_they_lead_also_after_the_directory_was_used(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root", "bkt")
    bucket = tmp_path / "root" / "bkt"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    store.put_bytes("frames/000.png", b"frame")
    assert store.get_bytes("frames/000.png") == b"frame"  # "frames" is now known to be a plain directory
    # a link placed in that known directory afterwards is still checked (the file is looked at each time)
    (bucket / "frames" / "001.png").symlink_to(outside / "secret")
    with pytest.raises(InvalidArgument):
        store.get_bytes("frames/001.png")
    # a link that stays inside the bucket is allowed, as before
    (bucket / "frames" / "alias.png").symlink_to(bucket / "frames" / "000.png")
    assert store.get_bytes("frames/alias.png") == b"frame"
    (bucket / "inner").symlink_to(bucket / "frames", target_is_directory=True)
    assert store.get_bytes("inner/000.png") == b"frame"
    # a directory made later, on the way of a key not seen before, is checked when first used
    (bucket / "deep").mkdir()
    (bucket / "deep" / "way").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidArgument):
        store.get_bytes("deep/way/secret")


def test_local_file_and_directory_cannot_share_a_name(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, "bkt")
    store.put_bytes("a", b"1")
    with pytest.raises(FailedPrecondition) as err:
        store.put_bytes("a/b", b"2")
    assert err.value.field == "key"
    store.put_bytes("d/e", b"3")
    with pytest.raises(FailedPrecondition):
        store.put_bytes("d", b"4")
    assert keys(store) == ["a", "d/e"]
    assert os.listdir(tmp_path / ".tmp") == []


def test_local_move_file_renames_without_a_second_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path / "root", "bkt")
    src = tmp_path / "model.bin"
    src.write_bytes(b"weights")
    inode = src.stat().st_ino
    ref = store.move_file("m/model.bin", src)
    assert (tmp_path / "root" / "bkt" / "m" / "model.bin").stat().st_ino == inode  # the same file
    monkeypatch.setattr(LocalStore, "_hash_and_cache", lambda *a: pytest.fail("stat() re-hashed"))
    assert store.stat("m/model.bin") == ref  # its hash was recorded on the way in


def test_local_move_file_copies_a_file_with_another_name(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root", "bkt")
    src, other = tmp_path / "src.bin", tmp_path / "other-name.bin"
    src.write_bytes(b"shared")
    os.link(src, other)
    store.move_file("k", src)
    assert not src.exists()
    # Writing through the other name must not change the stored object.
    with open(other, "r+b") as f:
        f.write(b"CHANGE")
    assert store.get_bytes("k") == b"shared"


def test_local_move_file_of_a_symlink_stores_its_target_and_removes_the_link(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root", "bkt")
    target, link = tmp_path / "target.bin", tmp_path / "link.bin"
    target.write_bytes(b"target bytes")
    link.symlink_to(target)
    store.move_file("k", link)
    assert store.get_bytes("k") == b"target bytes"
    assert not link.is_symlink() and target.read_bytes() == b"target bytes"
    with open(target, "r+b") as f:
        f.write(b"CHANGED")
    assert store.get_bytes("k") == b"target bytes"


def test_local_move_file_onto_a_key_clash_keeps_the_source(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root", "bkt")
    store.put_bytes("a", b"1")
    src = tmp_path / "src.bin"
    src.write_bytes(b"2")
    with pytest.raises(FailedPrecondition) as err:
        store.move_file("a/b", src)
    assert err.value.field == "key"
    assert src.read_bytes() == b"2" and keys(store) == ["a"]


def test_local_get_readonly_file_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path / "root", "bkt")
    ref = store.put_bytes("k", b"payload")
    dest = tmp_path / "out.bin"
    monkeypatch.setattr("dreamframe.storage.local.sha256_stream", lambda *a: pytest.fail("re-hashed"))
    assert store.get_readonly_file("k", dest) == ref
    assert dest.stat().st_ino == (tmp_path / "root" / "bkt" / "k").stat().st_ino


def test_local_get_readonly_file_of_a_link_inside_the_bucket_is_its_target(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root", "bkt")
    store.put_bytes("weights/real.bin", b"weights")
    (tmp_path / "root" / "bkt" / "weights" / "alias.bin").symlink_to("real.bin")
    dest = tmp_path / "out.bin"
    assert store.get_readonly_file("weights/alias.bin", dest).sha256 == sha(b"weights")
    assert dest.read_bytes() == b"weights" and not dest.is_symlink()


def test_local_get_readonly_file_copies_where_links_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    store = LocalStore(tmp_path / "root", "bkt")
    ref = store.put_bytes("k", b"payload")

    def cross_device(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    dest = tmp_path / "out.bin"
    assert store.get_readonly_file("k", dest) == ref
    assert dest.read_bytes() == b"payload"
    assert dest.stat().st_ino != (tmp_path / "root" / "bkt" / "k").stat().st_ino
    assert set(os.listdir(tmp_path)) == {"out.bin", "root"}


def test_local_stale_temp_files_are_cleaned_on_open(tmp_path: Path) -> None:
    LocalStore(tmp_path, "bkt")
    stale, fresh = tmp_path / ".tmp" / ".old.tmp", tmp_path / ".tmp" / ".new.tmp"
    stale.write_bytes(b"left by a killed writer")
    fresh.write_bytes(b"a write in flight")
    os.utime(stale, (0, 0))
    LocalStore(tmp_path, "bkt")
    assert os.listdir(tmp_path / ".tmp") == [".new.tmp"]


# --- S3Store specifics --------------------------------------------------------------------------------


def raw_client(server: S3Server) -> Minio:
    return Minio(server.endpoint, server.access_key, server.secret_key, secure=False)


def test_s3_sha256_travels_as_metadata_and_big_files_go_multipart(
    s3_server: S3Server, tmp_path: Path
) -> None:
    store = s3_store(s3_server)
    src = tmp_path / "big"
    src.write_bytes(random_bytes(BIG, seed=3))
    ref = store.put_file("big", src)
    head = raw_client(s3_server).stat_object(store.default_bucket, "big")
    assert head.metadata["x-amz-meta-sha256"] == ref.sha256
    assert head.etag.endswith("-2")  # S3's multipart ETag: md5-of-part-md5s, dash, part count
    small = store.put_bytes("small", b"x")
    assert "-" not in raw_client(s3_server).stat_object(store.default_bucket, "small").etag
    assert store.stat("small") == small


def test_s3_foreign_object_without_metadata_is_hashed(s3_server: S3Server) -> None:
    store = s3_store(s3_server)
    data = random_bytes(70_000, seed=9)
    raw_client(s3_server).put_object(store.default_bucket, "foreign", io.BytesIO(data), len(data))
    ref = store.stat("foreign")
    assert (ref.size, ref.sha256) == (len(data), sha(data))


def test_s3_source_changing_during_upload_fails(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = s3_store(s3_server)
    store.put_bytes("obj", b"old")
    src = tmp_path / "src"
    src.write_bytes(b"a" * 1000)
    real_open, opens = builtins.open, [0]

    def open_then_modify(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if isinstance(file, str | os.PathLike) and os.fspath(file) == str(src):
            opens[0] += 1
            if opens[0] == 2:  # after hashing, before uploading: another writer changes the file
                with real_open(src, "r+b") as f:
                    f.write(b"b")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_then_modify)
    with pytest.raises(FailedPrecondition, match="changed while it was being uploaded"):
        store.put_file("obj", src)
    monkeypatch.undo()
    assert store.get_bytes("obj") == b"old"


def test_s3_unreachable_endpoint_is_unavailable(s3_server: S3Server) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"127.0.0.1:{port}"
    with pytest.raises(Unavailable) as err:
        S3Store(endpoint, "k", "s", "dreamframe", max_retries=0)
    assert endpoint in err.value.message and "unreachable" in err.value.message
    store = S3Store(endpoint, "k", "s", "dreamframe", create_bucket=False, max_retries=0)
    for call in (
        lambda: store.get_bytes("k"),
        lambda: store.put_bytes("k", b"x"),
        lambda: list(store.list()),
    ):
        with pytest.raises(Unavailable, match=endpoint):
            call()


def test_s3_full_store_is_resource_exhausted() -> None:
    """A MinIO past its free-drive threshold answers writes with 507 XMinioStorageFull: the caller gets
    RESOURCE_EXHAUSTED naming the key (not UNAVAILABLE, which invites retrying into a full disk)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body = (
        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>XMinioStorageFull</Code>'
        b"<Message>Storage backend has reached its minimum free drive threshold.</Message>"
        b"<Resource>/dreamframe/frames/1.png</Resource><RequestId>1</RequestId><HostId>h</HostId></Error>"
    )

    class Full(BaseHTTPRequestHandler):
        def answer(self, status: int, data: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - the http.server handler name; the bucket's region
            self.answer(
                200, b'<?xml version="1.0" encoding="UTF-8"?><LocationConstraint></LocationConstraint>'
            )

        def do_PUT(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.answer(507, body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Full)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"127.0.0.1:{server.server_address[1]}"
        store = S3Store(endpoint, "k", "s", "dreamframe", create_bucket=False, max_retries=0)
        with pytest.raises(ResourceExhausted) as err:
            store.put_bytes("frames/1.png", b"png")
        assert err.value.field == "key" and "'frames/1.png'" in err.value.message
        assert "XMinioStorageFull" in err.value.message
    finally:
        server.shutdown()
        server.server_close()


def test_s3_wrong_credentials_fail_clearly(s3_server: S3Server) -> None:
    if s3_server.kind == "moto":
        pytest.skip("moto accepts any credentials")
    with pytest.raises(FailedPrecondition, match="access_key"):
        S3Store(s3_server.endpoint, s3_server.access_key, "wrong-secret", fresh_bucket())


def test_s3_without_create_bucket_reports_missing_bucket(s3_server: S3Server) -> None:
    store = s3_store(s3_server, create_bucket=False)
    with pytest.raises(NotFound) as err:
        store.put_bytes("k", b"x")
    assert err.value.field == "bucket"
    assert keys(store) == []


def test_s3_endpoint_may_carry_a_scheme(s3_server: S3Server) -> None:
    store = S3Store(
        f"http://{s3_server.endpoint}", s3_server.access_key, s3_server.secret_key, fresh_bucket()
    )
    assert store.endpoint == s3_server.endpoint
    store.put_bytes("k", b"v")
    assert store.get_bytes("k") == b"v"


def test_conditional_writes_are_compare_and_swap(store: ObjectStore) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from dreamframe.errors import Aborted

    first = store.put_if("lease/leader.json", b'{"holder": "a"}', version=None)
    with pytest.raises(Aborted, match="changed since it was read"):
        store.put_if("lease/leader.json", b'{"holder": "b"}', version=None)  # exists already
    data, version = store.get_versioned("lease/leader.json")
    assert data == b'{"holder": "a"}' and version == first
    second = store.put_if("lease/leader.json", b'{"holder": "a", "n": 2}', version=version)
    assert second != first
    with pytest.raises(Aborted):
        store.put_if("lease/leader.json", b'{"holder": "late"}', version=first)  # a stale reader
    assert store.get_bytes("lease/leader.json") == b'{"holder": "a", "n": 2}'
    assert store.stat("lease/leader.json").sha256 == hashlib.sha256(b'{"holder": "a", "n": 2}').hexdigest()

    # Racing writers from the same version: exactly one wins.
    def attempt(i: int) -> bool:
        try:
            store.put_if("lease/leader.json", f'{{"holder": "w{i}"}}'.encode(), version=second)
            return True
        except Aborted:
            return False

    with ThreadPoolExecutor(4) as pool:
        assert sum(pool.map(attempt, range(4))) == 1
    with pytest.raises(NotFound):
        store.get_versioned("lease/missing.json")
    with pytest.raises(Aborted):
        store.put_if("lease/missing.json", b"x", version=second)  # it is not there to replace
    assert [i.key for i in store.list("lease/")] == ["lease/leader.json"]
