"""A sample's media in storage: which key a record's media path means (``candidate_keys``,
``MediaResolver``) and reading the frames the model sees (``read_frames``)."""

from __future__ import annotations

import io
import posixpath
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from dreamframe.errors import InvalidArgument
from dreamframe.models import video_llm
from dreamframe.storage.base import ObjectStore

from .records import IMAGE, VIDEO


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
    store: ObjectStore, kind: str, keys: Sequence[str], num_frames: int, bucket: str | None
) -> list:
    """The RGB images of a sample: ``num_frames`` frames of its video (PyAV), a sample of its frame
    images, or its one image (PIL)."""
    from PIL import Image

    if kind == VIDEO:
        data = store.get_bytes(keys[0], bucket=bucket)
        return video_llm.read_video_frames(data, num_frames)
    chosen = keys if kind == IMAGE else video_llm.sample_frames(keys, num_frames)
    images = []
    for key in chosen:
        with Image.open(io.BytesIO(store.get_bytes(key, bucket=bucket))) as img:
            images.append(img.convert("RGB"))
    return images
