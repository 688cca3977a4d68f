"""The benchmark formats the evaluator reads, by kind (the names used in reports and requests)."""

from __future__ import annotations

from .base import Benchmark
from .mvbench import DreamFrameMC, MVBench
from .tempcompass import TempCompass
from .videobench import VideoBench
from .videochatgpt import VideoChatGPT

BENCHMARKS: dict[str, Benchmark] = {
    b.kind: b for b in (MVBench(), TempCompass(), VideoBench(), VideoChatGPT(), DreamFrameMC())
}
# Not a question benchmark: measured on keyframes with an image encoder, once per request.
STYLE_CONSISTENCY = "style_consistency"

__all__ = ["BENCHMARKS", "STYLE_CONSISTENCY", "Benchmark"]
