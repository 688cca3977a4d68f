"""The S3 backend (MinIO, SeaweedFS, AWS S3, ...) over the ``minio`` client.

S3 PUTs are atomic: a single PUT or a completed multipart upload replaces the object at once, and a
failed multipart upload is aborted by the client, so readers never see a part. The SHA-256 travels as
user metadata (``x-amz-meta-sha256``), so ``stat`` is one HEAD request; objects written by other tools
without it are hashed by streaming them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import certifi
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError
from minio.helpers import genheaders

from dreamframe.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from dreamframe.storage.base import (
    CHUNK_SIZE,
    ChunkStream,
    ObjectInfo,
    ObjectRef,
    ObjectStore,
    sha256_bytes,
    validate_key,
    validate_prefix,
)

SHA256_META = "sha256"  # minio sends it as x-amz-meta-sha256
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchObject", "NoSuchVersion"}
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken"}
_BUSY_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "ServerBusy"}
# The store has no room (MinIO's free-drive threshold, HTTP 507) or the bucket is over its quota.
_FULL_CODES = {"XMinioStorageFull", "XMinioAdminBucketQuotaExceeded"}


class _HashCheckingReader:
    """Feeds the upload and fails it if the file is not the one we hashed (changed in between)."""

    def __init__(self, f: BinaryIO, size: int, sha256: str, path: str | Path) -> None:
        self._f, self._size, self._sha256, self._path = f, size, sha256, path
        self._digest, self._seen = hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._digest.update(data)
        self._seen += len(data)
        # Raising before the last byte is handed over aborts the PUT / multipart upload.
        complete = self._seen >= self._size
        if (not data and not complete) or (complete and self._digest.hexdigest() != self._sha256):
            raise FailedPrecondition(f"file {str(self._path)!r} changed while it was being uploaded")
        return data


class S3Store(ObjectStore):
    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        default_bucket: str,
        secure: bool = False,
        region: str | None = None,
        create_bucket: bool = True,
        *,
        allowed_buckets: Iterable[str] = (),
        part_size: int = 0,
        timeout_seconds: float = 60.0,
        max_retries: int = 3,
    ) -> None:
        """``part_size`` 0 lets the client choose (5 MiB parts, more for huge files): anything larger
        than one part goes up as a multipart upload, so memory stays bounded whatever the file size.
        ``create_bucket`` makes the default bucket here if it is missing; no other bucket is ever made."""
        super().__init__(default_bucket, allowed_buckets)
        # Accept "http://host:port" too; the minio client wants host:port and a secure flag.
        for scheme, is_secure in (("http://", False), ("https://", True)):
            if endpoint.startswith(scheme):
                endpoint, secure = endpoint[len(scheme) :].rstrip("/"), is_secure
        self.endpoint = endpoint
        self.part_size = part_size
        self.create_bucket = create_bucket
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(timeout_seconds, 10.0), read=timeout_seconds),
            maxsize=10,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            # Retries idempotent requests on connection errors and 5xx, with backoff 0.2, 0.4, 0.8 s.
            retries=urllib3.Retry(
                total=max_retries, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
            ),
        )
        try:
            self._client = Minio(
                endpoint, access_key, secret_key, secure=secure, region=region, http_client=self._http
            )
        except ValueError as exc:
            raise InvalidArgument(f"bad S3 endpoint {endpoint!r}: {exc}", field="storage.endpoint") from None
        self._region = region
        if create_bucket:
            self._make_default_bucket()

    def __repr__(self) -> str:
        return f"S3Store({self.endpoint!r}, bucket={self.default_bucket!r})"

    def close(self) -> None:
        self._http.clear()

    # --- errors -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self, bucket: str, key: str | None = None) -> Iterator[None]:
        """Translate the client's exceptions into DreamFrame's (one place for every call)."""
        where = f"S3 endpoint {self.endpoint!r}"
        try:
            yield
        except S3Error as exc:
            if exc.code == "NoSuchBucket":
                raise NotFound(f"bucket {bucket!r} does not exist at {where}", field="bucket") from None
            if exc.code in _NOT_FOUND_CODES and key is not None:
                raise NotFound(f"no object {key!r} in bucket {bucket!r}", field="key") from None
            if exc.code in _FULL_CODES:
                what = f"to write {key!r}" if key is not None else f"in bucket {bucket!r}"
                raise ResourceExhausted(
                    f"{where} has no room {what} ({exc.code}): delete objects or grow the storage",
                    field="key" if key is not None else "bucket",
                ) from None
            if exc.code in _AUTH_CODES:
                raise FailedPrecondition(
                    f"{where} refused the request on bucket {bucket!r} ({exc.code}); "
                    "check storage.access_key / storage.secret_key and the bucket policy"
                ) from None
            if exc.code in _BUSY_CODES or (exc.response is not None and exc.response.status >= 500):
                raise Unavailable(f"{where} failed: {exc.code}: {exc.message}") from exc
            raise
        except (ServerError, InvalidResponseError) as exc:
            raise Unavailable(f"{where} answered with an error: {exc}") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise Unavailable(f"{where} is unreachable: {exc}") from exc

    def _make_default_bucket(self) -> None:
        """Make the configured bucket if it is missing (start-up only: a write to a missing bucket fails
        NOT_FOUND rather than making one, so no request can create a bucket)."""
        bucket = self.default_bucket
        with self._errors(bucket):
            if not self._client.bucket_exists(bucket):
                try:
                    self._client.make_bucket(bucket, location=self._region)
                except S3Error as exc:  # another process made it first
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

    # --- writes -----------------------------------------------------------------------------------
    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        bucket: str | None = None,
    ) -> ObjectRef:
        validate_key(key)
        name = self._bucket(bucket)
        data = bytes(data)
        sha256 = sha256_bytes(data)
        with self._errors(name, key):
            self._client.put_object(
                name,
                key,
                io.BytesIO(data),
                len(data),
                content_type=content_type,
                metadata={SHA256_META: sha256},
                part_size=self.part_size,
            )
        return ObjectRef(name, key, len(data), sha256)

    def put_file(
        self,
        key: str,
        path: str | Path,
        *,
        content_type: str = "application/octet-stream",
        bucket: str | None = None,
    ) -> ObjectRef:
        validate_key(key)
        name = self._bucket(bucket)
        # The hash goes in the request headers, so it must be known before the first byte is sent.
        digest, size = hashlib.sha256(), 0
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(CHUNK_SIZE), b""):
                digest.update(chunk)
                size += len(chunk)
        sha256 = digest.hexdigest()
        with open(path, "rb") as f, self._errors(name, key):
            self._client.put_object(
                name,
                key,
                _HashCheckingReader(f, size, sha256, path),
                size,
                content_type=content_type,
                metadata={SHA256_META: sha256},
                part_size=self.part_size,
            )
        return ObjectRef(name, key, size, sha256)

    # --- reads ------------------------------------------------------------------------------------
    def get_bytes(self, key: str, *, bucket: str | None = None) -> bytes:
        with self.open_stream(key, bucket=bucket) as chunks:
            return b"".join(chunks)

    def open_stream(
        self, key: str, *, chunk_size: int = CHUNK_SIZE, bucket: str | None = None
    ) -> ChunkStream:
        validate_key(key)
        if chunk_size <= 0:
            raise InvalidArgument("must be positive", field="chunk_size")
        name = self._bucket(bucket)
        with self._errors(name, key):
            response = self._client.get_object(name, key)

        def chunks() -> Iterator[bytes]:
            with self._errors(name, key):
                yield from response.stream(chunk_size)

        def release() -> None:
            # close() drops a half-read connection; release_conn() gives its pool slot back.
            response.close()
            response.release_conn()

        return ChunkStream(chunks(), release)

    # --- conditional writes: the version is the object's ETag (S3 If-Match / If-None-Match) -----------
    def get_versioned(self, key: str, *, bucket: str | None = None) -> tuple[bytes, str]:
        validate_key(key)
        name = self._bucket(bucket)
        with self._errors(name, key):
            response = self._client.get_object(name, key)
            try:
                return response.read(), response.headers.get("ETag", "").strip('"')
            finally:
                response.close()
                response.release_conn()

    def put_if(
        self,
        key: str,
        data: bytes,
        *,
        version: str | None,
        content_type: str = "application/octet-stream",
        bucket: str | None = None,
    ) -> str:
        validate_key(key)
        name = self._bucket(bucket)
        data = bytes(data)
        headers = genheaders({SHA256_META: sha256_bytes(data)}, None, None, None, False)
        headers["Content-Type"] = content_type
        if version is None:
            headers["If-None-Match"] = "*"
        else:
            headers["If-Match"] = f'"{version}"'
        try:
            with self._errors(name, key):
                # minio's public put_object turns unknown headers into user metadata; its single-PUT call
                # sends them as they are (small objects only: leases and job state).
                result = self._client._put_object(name, key, data, headers=headers)
        except (NotFound, S3Error) as exc:
            if isinstance(exc, NotFound) and exc.field == "bucket":
                raise  # no bucket: not a lost race
            code = getattr(exc, "code", "NoSuchKey")
            if isinstance(exc, NotFound) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise Aborted(f"object {key!r} changed since it was read", field="key") from None
            raise
        return (result.etag or "").strip('"')

    def exists(self, key: str, *, bucket: str | None = None) -> bool:
        try:
            self._head(key, self._bucket(bucket))
        except NotFound:
            return False
        return True

    def _head(self, key: str, name: str):  # noqa: ANN202 - minio's Object
        validate_key(key)
        with self._errors(name, key):
            return self._client.stat_object(name, key)

    def stat(self, key: str, *, bucket: str | None = None) -> ObjectRef:
        name = self._bucket(bucket)
        info = self._head(key, name)
        sha256 = (info.metadata or {}).get(f"x-amz-meta-{SHA256_META}", "")
        if not _SHA256_RE.match(sha256):
            # Written by another tool: hash it ourselves.
            digest = hashlib.sha256()
            with self.open_stream(key, bucket=name) as chunks:
                for chunk in chunks:
                    digest.update(chunk)
            sha256 = digest.hexdigest()
        return ObjectRef(name, key, int(info.size or 0), sha256)

    def list(self, prefix: str = "", *, bucket: str | None = None) -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        name = self._bucket(bucket)
        found: list[ObjectInfo] = []
        try:
            with self._errors(name):
                for obj in self._client.list_objects(name, prefix=prefix or None, recursive=True):
                    key = obj.object_name or ""
                    # Skip folder markers and keys we could never address (written by other tools).
                    if obj.is_dir or not _valid_key(key):
                        continue
                    found.append(ObjectInfo(key, int(obj.size or 0)))
        except NotFound:  # a missing bucket holds nothing
            return iter(())
        # S3 promises UTF-8 byte order, but not every server keeps it across "directories".
        found.sort(key=lambda info: info.key)
        return iter(found)

    # --- deletes ----------------------------------------------------------------------------------
    def delete(self, key: str, *, bucket: str | None = None) -> None:
        validate_key(key)
        name = self._bucket(bucket)
        with contextlib.suppress(NotFound), self._errors(name, key):
            self._client.remove_object(name, key)

    def delete_prefix(self, prefix: str, *, bucket: str | None = None) -> int:
        if not prefix:
            raise InvalidArgument("refusing to delete the whole bucket", field="prefix")
        name = self._bucket(bucket)
        keys = [info.key for info in self.list(prefix, bucket=name)]
        if keys:
            with self._errors(name):
                # One request per 1000 keys; the errors iterator is lazy, so draining it does the work.
                errors = list(self._client.remove_objects(name, (DeleteObject(k) for k in keys)))
            failed = [e for e in errors if e.code not in _NOT_FOUND_CODES]
            if failed:
                raise Unavailable(
                    f"S3 endpoint {self.endpoint!r} did not delete {len(failed)} of {len(keys)} objects "
                    f"under {prefix!r}: first {failed[0].name!r}: {failed[0].code} {failed[0].message}"
                )
        return len(keys)


def _valid_key(key: str) -> bool:
    try:
        validate_key(key)
    except InvalidArgument:
        return False
    return True
