"""Object storage: one interface (``ObjectStore``), two backends, and the ObjectRef <-> proto bridge.

Usage::

    store = open_store(get_settings().storage)
    ref = store.put_file("jobs/j1/frames/000001.png", "/tmp/1.png")
    response.frame.CopyFrom(to_proto(ref))
    ref = from_proto(request.story, field="story")   # InvalidArgument naming "story.key" if bad
"""

from __future__ import annotations

import re
from collections.abc import Collection

from dreamframe.config import StorageSettings
from dreamframe.errors import InvalidArgument
from dreamframe.storage.base import (
    ChunkStream,
    ObjectInfo,
    ObjectRef,
    ObjectStore,
    validate_bucket,
    validate_key,
    validate_prefix,
)
from dreamframe.storage.local import LocalStore
from dreamframe.storage.s3 import S3Store
from dreamframe.v1 import common_pb2

__all__ = [
    "ChunkStream",
    "LocalStore",
    "ObjectInfo",
    "ObjectRef",
    "ObjectStore",
    "S3Store",
    "from_proto",
    "open_store",
    "to_proto",
    "validate_bucket",
    "validate_key",
    "validate_prefix",
]

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def open_store(settings: StorageSettings) -> ObjectStore:
    """The store the settings describe (``backend: local`` or ``s3``)."""
    if settings.backend == "local":
        return LocalStore(settings.root, settings.bucket, allowed_buckets=settings.allowed_buckets)
    if settings.backend == "s3":
        return S3Store(
            settings.endpoint,
            settings.access_key.get_secret_value(),
            settings.secret_key.get_secret_value(),
            settings.bucket,
            secure=settings.secure,
            region=settings.region,
            create_bucket=settings.create_bucket,
            allowed_buckets=settings.allowed_buckets,
        )
    raise InvalidArgument(f"unknown storage backend {settings.backend!r}", field="storage.backend")


def to_proto(ref: ObjectRef) -> common_pb2.ObjectRef:
    return common_pb2.ObjectRef(bucket=ref.bucket, key=ref.key, size=ref.size, sha256=ref.sha256)


def from_proto(
    pb: common_pb2.ObjectRef, field: str = "ref", *, allowed: Collection[str] | None = None
) -> ObjectRef:
    """A request's ObjectRef, checked; errors name the field (``story.key``) so callers know what to fix.
    ``allowed`` (the store's ``allowed_buckets``) refuses other buckets here, naming ``<field>.bucket``;
    the store refuses them anyway, naming just ``bucket``."""
    if not pb.bucket and not pb.key:
        raise InvalidArgument("an object reference (bucket and key) is required", field=field)
    bucket = validate_bucket(pb.bucket, field=f"{field}.bucket", allowed=allowed)
    key = validate_key(pb.key, field=f"{field}.key")
    if pb.size < 0:
        raise InvalidArgument(f"size must not be negative, got {pb.size}", field=f"{field}.size")
    if pb.sha256 and not _SHA256_RE.match(pb.sha256):
        raise InvalidArgument("must be 64 lower-case hex digits (or empty)", field=f"{field}.sha256")
    return ObjectRef(bucket=bucket, key=key, size=pb.size, sha256=pb.sha256)
