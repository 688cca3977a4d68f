"""Shared pieces of the trainer tests (no tests here): tiny mp4 datasets written with PyAV, the tiny
video-LLM cache built once per test process, and run specs small enough for a CPU."""

from __future__ import annotations

import atexit
import functools
import io
import shutil
import tempfile
from pathlib import Path

import av
import numpy as np

from dreamframe.storage import LocalStore
from dreamframe.storage.base import ObjectRef, ObjectStore
from services.trainer.spec import DatasetSource, RunSpec, build_spec
from services.trainer.training import Runtime

ANSWERS = [
    "A man walks in the park.",
    "The woman is sad.",
    "They hug and smile.",
    "At night by the sea.",
    "He holds a red cup.",
    "She sits and talks.",
]


@functools.lru_cache(maxsize=1)
def tiny_cache() -> Path:
    """A model cache holding the tiny video LLM, built once for the whole test process."""
    from dreamframe.models import video_llm

    root = Path(tempfile.mkdtemp(prefix="trainer-models-"))
    atexit.register(shutil.rmtree, root, True)
    video_llm.tiny_video_llm_dir(root)
    return root


def make_mp4(seed: int, frames: int = 6, size: int = 32) -> bytes:
    """A short mp4 of random frames (MPEG-4 part 2: in every FFmpeg build)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=2)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def make_dataset(
    store: ObjectStore,
    prefix: str = "datasets/toy/",
    n: int = 6,
    *,
    missing: tuple[int, ...] = (),
    seed: int = 0,
) -> ObjectRef:
    """A qa-generator-shaped dataset: ``<prefix>videos/v<i>.mp4`` and ``<prefix>conversations/train.json``
    (videos relative to the dataset folder); the videos of ``missing`` samples are not written."""
    records = []
    for i in range(n):
        video = f"videos/v{i}.mp4"
        if i not in missing:
            store.put_bytes(prefix + video, make_mp4(seed * 1000 + i))
        records.append(
            {
                "id": f"s{i}",
                "video": video,
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat happens in the video?"},
                    {"from": "gpt", "value": ANSWERS[i % len(ANSWERS)]},
                ],
            }
        )
    return store.put_json(prefix + "conversations/train.json", records)


def local_store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store", "dreamframe")


def runtime(tmp_path: Path) -> Runtime:
    return Runtime(work_dir=tmp_path / "work", model_cache_dir=tiny_cache())


def tiny_spec(run_id: str, dataset: ObjectRef | list[DatasetSource], method: str = "full", **hp) -> RunSpec:
    sources = dataset if isinstance(dataset, list) else [DatasetSource(key=dataset.key)]
    defaults = dict(
        learning_rate=1e-3, per_device_batch_size=2, num_frames=3, lora_rank=8, lora_alpha=16, max_steps=4
    )
    return build_spec(
        run_id=run_id, datasets=sources, base_model="tiny", method=method, hyperparameters=defaults | hp
    )
