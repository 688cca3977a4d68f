"""Frames for a benchmark item: N frames sampled uniformly from a video file (PyAV), a folder of frame
images, or an explicit list of frame images, honouring an optional [start, end] window in seconds.

Sampling follows MVBench's ``get_index``: the window is cut into N equal segments and the frame at the
middle of each segment is taken, so N frames always cover the whole window.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import av
from PIL import Image

from dreamframe.errors import InvalidArgument

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif", ".m4v")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# MVBench ships TVQA as JPEG folders extracted at 3 fps.
DEFAULT_FRAME_FOLDER_FPS = 3.0


def segment_indices(start_idx: int, end_idx: int, num: int) -> list[int]:
    """``num`` frame indices at the middles of ``num`` equal segments of the frames start_idx..end_idx
    (inclusive). MVBench's ``get_index`` does the same over end - start, which repeats a frame and never
    reaches the last one when there are about as many frames as wanted."""
    if num < 1:
        raise InvalidArgument("must be >= 1", field="num_frames")
    end_idx = max(end_idx, start_idx)
    seg = (end_idx - start_idx + 1) / num
    return [min(end_idx, start_idx + int(seg * (i + 0.5))) for i in range(num)]


def window_indices(
    num_total: int, fps: float, num: int, start: float | None = None, end: float | None = None
) -> list[int]:
    """Indices of ``num`` frames of a ``num_total``-frame clip at ``fps``, within [start, end] seconds."""
    if num_total <= 0:
        return []
    # Frame k shows [k/fps, (k+1)/fps): the window's frames are those overlapping [start, end).
    max_frame = num_total - 1
    start_idx = 0 if start is None else max(0, math.floor(start * fps))
    end_idx = max_frame if end is None else min(math.ceil(end * fps) - 1, max_frame)
    if start_idx > max_frame:  # window past the end: fall back to the last frame, not to nothing
        start_idx = max_frame
    return segment_indices(start_idx, end_idx, num)


def _frame_count(container: av.container.InputContainer, stream: av.video.VideoStream) -> int:
    if stream.frames:
        return int(stream.frames)
    # Some containers do not record a frame count: count packets instead (no decoding).
    count = sum(1 for packet in container.demux(stream) if packet.size)
    container.seek(0)
    return count


def decode_video(
    source: str | Path | bytes, num: int, *, start: float | None = None, end: float | None = None
) -> list[Image.Image]:
    """``num`` RGB frames sampled from a video file (path or bytes); InvalidArgument when unreadable."""
    handle = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    try:
        with av.open(handle) as container:
            if not container.streams.video:
                raise InvalidArgument("has no video stream", field="video")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            fps = float(stream.average_rate or stream.guessed_rate or 25)
            wanted = window_indices(_frame_count(container, stream), fps, num, start, end)
            if not wanted:
                raise InvalidArgument("has no frames", field="video")
            picked: dict[int, Image.Image] = {}
            last_needed = max(wanted)
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted:
                    picked[index] = frame.to_image()
                if index >= last_needed:
                    break
    except av.FFmpegError as exc:
        raise InvalidArgument(f"cannot decode video: {exc}", field="video") from exc
    if not picked:
        raise InvalidArgument("no frame could be decoded", field="video")
    # A container may hold fewer frames than it claims: reuse the last decoded one.
    frames, last = [], picked[min(picked)]
    for index in wanted:
        last = picked.get(index, last)
        frames.append(last)
    return frames


def frame_list_indices(
    count: int, num: int, *, fps: float | None = None, start: float | None = None, end: float | None = None
) -> list[int]:
    """Positions into ``count`` frame images (in order, at ``fps``) to use for ``num`` frames."""
    return window_indices(count, fps or DEFAULT_FRAME_FOLDER_FPS, num, start, end)


def open_image(data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad image data
        raise InvalidArgument(f"cannot decode image: {exc}", field="video") from exc
    return image.convert("RGB")
