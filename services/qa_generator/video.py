"""Keyframe spans → mp4 files with PyAV (FFmpeg), one keyframe per video frame at a chosen rate.

All of a story's spans are encoded in one pass over its frames: the story video, the current
substory's and the current tiny story's encoders are open together, so each keyframe is read and
resized once. A video's key carries a fingerprint of everything that decides its bytes (frame hashes,
codec, rate, size, quality), so an existing object under that key is the same video and a rerun reuses it.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
from PIL import Image, ImageOps

from dreamframe.errors import FailedPrecondition

VIDEO_FORMAT_VERSION = 1
# FFmpeg's lambda per quantiser step, for MPEG-4 part 2's fixed-quality mode.
_FF_QP2LAMBDA = 118


@dataclass(frozen=True)
class VideoSpec:
    codec: str
    fps: float
    width: int
    height: int
    crf: int

    def fingerprint(self, frame_hashes: Sequence[str]) -> str:
        """Short hash of this spec and the exact frames: same fingerprint ⇒ same video."""
        payload = json.dumps(
            {"v": VIDEO_FORMAT_VERSION, "spec": [self.codec, self.fps, self.width, self.height, self.crf]},
            sort_keys=True,
        )
        digest = hashlib.sha256(payload.encode())
        for h in frame_hashes:
            digest.update(h.encode())
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class VideoJob:
    """Encode frames start, start + step, … < end of one story into the object ``key``."""

    key: str
    start: int
    end: int
    step: int = 1

    @property
    def frame_indices(self) -> range:
        return range(self.start, self.end, self.step)

    def wants(self, index: int) -> bool:
        return (index - self.start) % self.step == 0


def video_step(num_frames: int, max_frames: int) -> int:
    """Keep every k-th keyframe, k as small as keeps a span of ``num_frames`` within ``max_frames``."""
    return max(1, -(-num_frames // max_frames))


def resolve_codec(name: str) -> str:
    """'auto' → libx264 when this FFmpeg build can encode H.264, else mpeg4; explicit names are checked."""
    candidates = ["libx264", "mpeg4"] if name == "auto" else [name]
    for candidate in candidates:
        try:
            av.codec.Codec(candidate, "w")
        except Exception:  # noqa: BLE001 - PyAV raises various errors for an unknown encoder
            continue
        return candidate
    raise FailedPrecondition(
        f"video codec {name!r} is not available in PyAV's FFmpeg", field="qa.video_codec"
    )


def video_dimensions(width: int, height: int, longest_side: int) -> tuple[int, int]:
    """Scale so the longer side is ``longest_side``; both even, as 4:2:0 chroma needs."""
    scale = longest_side / max(width, height)
    w = max(2, round(width * scale / 2) * 2)
    h = max(2, round(height * scale / 2) * 2)
    return w, h


def image_size(png: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(png)) as img:
        return img.size


def prepare_frame(png: bytes, spec: VideoSpec) -> av.VideoFrame:
    """PNG bytes → a YUV 4:2:0 frame of the spec's size (aspect kept, padded with black if it differs)."""
    with Image.open(io.BytesIO(png)) as img:
        rgb = ImageOps.pad(img.convert("RGB"), (spec.width, spec.height), method=Image.Resampling.LANCZOS)
    return av.VideoFrame.from_image(rgb).reformat(format="yuv420p")


class _SpanEncoder:
    def __init__(self, path: Path, spec: VideoSpec) -> None:
        self.path = path
        self.container = av.open(str(path), "w", format="mp4")
        self.stream = self.container.add_stream(spec.codec, rate=Fraction(spec.fps).limit_denominator(1000))
        self.stream.width, self.stream.height = spec.width, spec.height
        self.stream.pix_fmt = "yuv420p"
        if spec.codec == "libx264":
            self.stream.options = {"crf": str(spec.crf), "preset": "medium"}
        else:
            # Fixed quantiser 2..31, roughly the quality a CRF of that value gives with H.264.
            self.stream.codec_context.qscale = True
            self.stream.codec_context.global_quality = max(2, min(31, round(spec.crf / 6))) * _FF_QP2LAMBDA
        self.count = 0

    def add(self, frame: av.VideoFrame) -> None:
        frame.pts = self.count
        self.count += 1
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()

    def abort(self) -> None:
        try:
            self.container.close()
        except Exception:  # noqa: BLE001 - the partial file is thrown away anyway
            pass


def encode_spans(
    jobs: Sequence[VideoJob],
    spec: VideoSpec,
    load_frame: Callable[[int], bytes],
    publish: Callable[[VideoJob, Path], None],
    *,
    check_cancelled: Callable[[], None] = lambda: None,
) -> None:
    """Encode every job in one pass over frame indices; ``publish(job, path)`` gets each finished file
    (a temporary file, removed afterwards) as soon as its last frame is in."""
    if not jobs:
        return
    by_start: dict[int, list[VideoJob]] = {}
    for job in jobs:
        if job.end <= job.start or job.step < 1:
            raise ValueError(f"empty span for {job.key}")
        by_start.setdefault(job.start, []).append(job)
    first, last = min(j.start for j in jobs), max(j.end for j in jobs)
    open_: dict[VideoJob, _SpanEncoder] = {}
    with tempfile.TemporaryDirectory(prefix="qa-videos-") as tmp:
        try:
            for index in range(first, last):
                check_cancelled()
                for job in by_start.get(index, []):
                    open_[job] = _SpanEncoder(Path(tmp) / f"{len(open_)}-{index}.mp4", spec)
                wanting = [job for job in open_ if job.wants(index)]
                if wanting:
                    frame = prepare_frame(load_frame(index), spec)
                    for job in wanting:
                        open_[job].add(frame)
                for job, encoder in list(open_.items()):
                    if index == job.end - 1:
                        encoder.close()
                        del open_[job]
                        publish(job, encoder.path)
                        encoder.path.unlink()
        finally:
            for encoder in open_.values():
                encoder.abort()


def count_video_frames(data: bytes) -> int:
    """Frames in an mp4's first video stream, counted from its packets (no decoding); 0 if unreadable."""
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            return sum(1 for packet in container.demux(stream) if packet.size)
    except Exception:  # noqa: BLE001 - a damaged file is simply "not a usable video"
        return 0
