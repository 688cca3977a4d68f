"""The dataset card: README.md in the dataset folder, Hugging Face style (YAML header + Markdown).

Everything in it comes from the build's statistics and options, with no timestamps, so the same inputs
give the same bytes (a rerun leaves the card untouched).
"""

from __future__ import annotations

import json

from .options import FRAME_LIST, LLAVA_JSON, MVBENCH_MC, SPLITS, VIDEO_MP4, DatasetOptions
from .samples import LEVELS


def _size_category(n: int) -> str:
    for limit, label in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
    ):
        if n < limit:
            return label
    return "n>1M"


def _yaml_header(name: str, options: DatasetOptions, stats: dict) -> list[str]:
    counts = stats["counts"]
    total_records = sum(counts.get(f"{split}/{level}", 0) for split in SPLITS for level in LEVELS)
    configs = []
    for fmt, config, folder, count_key in (
        (LLAVA_JSON, "conversations", "conversations", None),
        (MVBENCH_MC, "multiple_choice", "mc", "mc_items"),
        (FRAME_LIST, "frame_lists", "frames", None),
    ):
        if not options.wants(fmt):
            continue
        splits = [
            s
            for s in SPLITS
            if counts.get(f"{s}/stories", 0) and (not count_key or counts.get(f"{s}/{count_key}"))
        ]
        if splits:
            configs.append((config, [(s, f"{folder}/{s}.json") for s in splits]))
    lines = [
        "---",
        f"pretty_name: {json.dumps(f'DreamFrame dataset {name}')}",
        "language:",
        "- en",
        "license: other",
        "task_categories:",
        "- video-text-to-text",
        "- visual-question-answering",
        *(["- multiple-choice"] if options.wants(MVBENCH_MC) else []),
        "tags:",
        "- synthetic",
        "- video-question-answering",
        "- dreamframe",
        "size_categories:",
        f"- {_size_category(total_records)}",
    ]
    if configs:
        lines.append("configs:")
        for config, files in configs:
            lines += [f"- config_name: {config}", "  data_files:"]
            for split, path in files:
                lines += [f"  - split: {split}", f"    path: {path}"]
    lines.append("---")
    return lines


_INTRO = """
Synthetic video question-answering data made by DreamFrame: an LLM expands a theme into a movie
story in three levels (story → substories → tiny stories, with dialogues and QA pairs), a
style-consistent image model renders a keyframe for every frame description, and the qa-generator
turns the keyframes (as videos), dialogues and QA into instruction-tuning and evaluation data.
"""

_FILES = {
    "manifest": """
- `manifest.json`: every file of the dataset with its size and SHA-256; written last, so a
  dataset folder without it is incomplete.
- `stats.json`: the counts above, per split and kind, and frame statistics.""",
    LLAVA_JSON: """
- `conversations/<split>.json`: LLaVA / LLaMA-VID conversations for the `{profile}` profile, a list
  of `{"id", "video", "conversations": [{"from": "human", "value": "<image>\\n<question>"}, {"from":
  "gpt", "value": ...}]}`; the `<image>` token opens the first human turn only, the question comes
  after any subtitles (LLaMA-VID's text query keeps the end of a long turn). QA pairs about the same
  span share a multi-turn conversation (at most {max_turns} pairs each). Check it with
  `dreamframe dataset check --profile {profile}`.""",
    VIDEO_MP4: """
- `videos/<story>/<first>-<end>_<fingerprint>.mp4`: one video per span (keyframes `first` ≤ i <
  `end` in story order), one keyframe per video frame at {fps:g} fps, longest side {size} px, at
  most {max_seconds:g} s (a longer span shows every k-th keyframe, `<first>-<end>s<k>_…`).
  `video` fields are relative to this folder (the trainer's `video_folder`).""",
    "no_video": """
- No videos: items list their keyframe object keys in `frames` instead of a `video`.""",
    MVBENCH_MC: """
- `mc/<split>.json`: multiple choice in MVBench's shape, `{video, question, candidates, answer}`
  (the answer is the text of the right candidate), plus `id` and `task` (`<level>/<kind>`).""",
    FRAME_LIST: """
- `frames/<split>.json`: each span's keyframes (object key and SHA-256), in story order.""",
}

_METHOD = """
## How it was made

Samples come at three granularities, each over the frames it is about: the whole story
(level-1 QA, and "Describe the movie." answered by the overview), each substory (its QA and
content), and each tiny story (its QA, its content, and rule-made dialogue questions: who says a
line, what a character says after a given moment, how one replies to another; a tiny story longer
than the video cap asks these on parts of it). Requests to describe or summarise are never made
multiple choice. Exact-duplicate
QA pairs within a story are removed (the coarsest span keeps its copy).

Multiple-choice distractors are other answers from the same story, preferring answers of the
same kind; candidates are distinct and the right answer's position is drawn from the seed.
Splits are by story (no story is in two splits), drawn from the seed.
"""

_LIMITATIONS = """
## Limitations

Stories, dialogues and QA are machine-written and keyframes machine-rendered: answers can be
wrong or unsupported by the images, and the content inherits the biases of the models that
made it.
"""


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    align = ["---"] + ["---:"] * (len(header) - 1)
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(align) + "|",
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
    ]


def dataset_card(name: str, options: DatasetOptions, stats: dict) -> str:
    counts = stats["counts"]
    frames = stats["frames"]
    lines = _yaml_header(name, options, stats)
    lines += ["", f"# DreamFrame dataset `{name}`", _INTRO, "## Contents", ""]
    lines += _table(
        ["split", "stories", "conversations (story/substory/tiny)", "QA pairs", "multiple choice"],
        [
            [
                split,
                counts.get(f"{split}/stories", 0),
                " / ".join(str(counts.get(f"{split}/{level}", 0)) for level in LEVELS),
                counts.get(f"{split}/qa_pairs", 0),
                counts.get(f"{split}/mc_items", 0),
            ]
            for split in SPLITS
        ],
    )
    lines += ["", "QA pairs by kind:", ""]
    lines += _table(
        ["split", "kind", "QA pairs"],
        [
            [split, kind, n]
            for split in SPLITS
            for kind, n in sorted(stats["qa_by_kind"].get(split, {}).items())
        ],
    )
    lines += [
        "",
        f"Keyframes: {frames['total']} in {len(frames['per_story'])} stories. "
        f"Videos: {counts.get('videos', 0)} ({frames['video_seconds']:.1f} s at {options.fps:g} fps).",
        "",
    ]
    lines += _table(
        ["span", "samples", "frames min", "frames mean", "frames max"],
        [
            [level, s["count"], s["min"], f"{s['mean']:.1f}", s["max"]]
            for level in LEVELS
            if (s := frames["spans"].get(level))
        ],
    )
    lines += [
        "",
        f"Exact-duplicate QA pairs removed: {counts.get('duplicates_removed', 0)}. "
        f"Multiple-choice items skipped for lack of distinct distractors: {counts.get('mc_skipped', 0)}.",
        "",
        "## Files",
    ]
    parts = ["manifest"]
    parts += [fmt for fmt in (LLAVA_JSON, VIDEO_MP4) if options.wants(fmt)]
    parts += [] if options.wants(VIDEO_MP4) else ["no_video"]
    parts += [fmt for fmt in (MVBENCH_MC, FRAME_LIST) if options.wants(fmt)]
    for part in parts:
        text = _FILES[part].replace("{max_turns}", str(options.max_turns_per_conversation))
        text = text.replace("{fps:g}", f"{options.fps:g}").replace("{size}", str(options.video_size))
        text = text.replace("{profile}", options.profile)
        text = text.replace("{max_seconds:g}", f"{options.max_video_seconds:g}")
        lines.append(text.strip("\n"))
    lines += [_METHOD, "Options:", "", "```json", json.dumps(options.as_dict(), indent=2), "```", ""]
    lines += ["Stories (split: id):", ""]
    lines += [f"- {split}: `{sid}`" for split in SPLITS for sid in stats["splits"].get(split, [])]
    lines += [_LIMITATIONS]
    return "\n".join(lines)
