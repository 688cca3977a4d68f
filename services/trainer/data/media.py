"""A sample's media in storage: which key a record's media path means (``candidate_keys``,
``MediaResolver``) and reading the frames the model sees (``read_frames``: each object streamed from
storage with its size bounded, a video decoded with only the sampled frames converted to images)."""

from __future__ import annotations

import io
import posixpath
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from dreamframe.errors import InvalidArgument
from dreamframe.models import video_llm
from dreamframe.storage.base import ObjectStore

from .records import IMAGE, VIDEO

# The most one media object may be (hostile input: a bounded cost); the index's size is checked too.
MAX_MEDIA_BYTES = 1 << 30


def read_object(store: ObjectStore, key: str, bucket: str | None, size: int | None = None) -> bytes:
    """The object streamed from storage, refusing more than ``size`` (when the index gives it) or
    ``MAX_MEDIA_BYTES``: ValueError if it is not the size the index lists."""
    limit = MAX_MEDIA_BYTES if size is None else min(size, MAX_MEDIA_BYTES)
    buf = bytearray()
    with store.open_stream(key, bucket=bucket) as chunks:
        for chunk in chunks:
            buf += chunk
            if len(buf) > limit:
                raise ValueError(f"{key!r} is larger than {'its index entry' if size is not None else limit}")
    if size is not None and len(buf) != size:
        raise ValueError(f"{key!r} is {len(buf)} bytes, its index entry says {size}")
    return bytes(buf)


def decode_video_frames(data: bytes, num_frames: int) -> list:
    """``num_frames`` RGB images sampled uniformly from an mp4, the same frames as
    ``video_llm.read_video_frames``, but only the sampled frames are converted (the rest are decoded and
    dropped): the container's frame count picks them; a count that turns out wrong falls back to
    converting every frame."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        expected = int(stream.frames or 0)
        if expected > 0:
            wanted = video_llm.uniform_indices(expected, num_frames)
            chosen: dict[int, object] = {}
            n = 0
            for n, frame in enumerate(container.decode(stream), start=1):
                if n - 1 in wanted:
                    chosen[n - 1] = frame.to_image().convert("RGB")
            if n == expected:
                return [chosen[i] for i in wanted]
    return video_llm.read_video_frames(data, num_frames)


def candidate_keys(path: str, base_folder: str) -> list[str]:
    """Keys a media path may mean: relative to the dataset file's folder, then each folder above it,
    then the path as a key of its own."""
    path = path.lstrip("/")
    candidates = []
    folder = base_folder
    while folder:
        candidates.append(posixpath.normpath(posixpath.join(folder, path)))
        folder = posixpath.dirname(folder)
    candidates.append(posixpath.normpath(path))
    return [c for c in dict.fromkeys(candidates) if not c.startswith("..") and c != "."]


class MediaResolver:
    """Finds which candidate key exists, with a bounded thread pool (one HEAD per key on S3)."""

    def __init__(self, store: ObjectStore, bucket: str | None, workers: int = 16) -> None:
        self.store = store
        self.bucket = bucket
        self.workers = workers
        self._exists: dict[str, bool] = {}

    def _check(self, key: str) -> bool:
        try:
            return self.store.exists(key, bucket=self.bucket)
        except InvalidArgument:
            return False

    def resolve_all(self, paths: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str | None]:
        """{(path, base_folder): existing key or None} for every pair."""
        unresolved = {pair: candidate_keys(*pair) for pair in dict.fromkeys(paths)}
        result: dict[tuple[str, str], str | None] = {}
        with ThreadPoolExecutor(self.workers) as pool:
            depth = 0
            while unresolved:
                wanted = {cands[depth] for cands in unresolved.values() if depth < len(cands)}
                wanted -= self._exists.keys()
                for key, ok in zip(wanted, pool.map(self._check, wanted), strict=True):
                    self._exists[key] = ok
                for pair, cands in list(unresolved.items()):
                    if depth >= len(cands):
                        result[pair] = None
                        del unresolved[pair]
                    elif self._exists[cands[depth]]:
                        result[pair] = cands[depth]
                        del unresolved[pair]
                depth += 1
        return result


def read_frames(
    store: ObjectStore,
    kind: str,
    keys: Sequence[str],
    num_frames: int,
    bucket: str | None,
    sizes: Sequence[int] = (),
) -> list:
    """The RGB images of a sample: ``num_frames`` frames of its video (PyAV), a sample of its frame
    images, or its one image (PIL). ``sizes``: the objects' sizes from the index, checked."""
    from PIL import Image

    size_of = dict(zip(keys, sizes, strict=True)) if sizes else {}
    if kind == VIDEO:
        data = read_object(store, keys[0], bucket, size_of.get(keys[0]))
        return decode_video_frames(data, num_frames)
    chosen = keys if kind == IMAGE else video_llm.sample_frames(keys, num_frames)
    images = []
    for key in chosen:
        with Image.open(io.BytesIO(read_object(store, key, bucket, size_of.get(key)))) as img:
            images.append(img.convert("RGB"))
    return images
