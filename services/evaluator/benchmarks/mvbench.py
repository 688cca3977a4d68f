"""MVBench: 20 task files ``json/<task>.json``, each a list of ``{video, question, candidates, answer}``
(``answer`` is the text of the right candidate; some tasks add ``start``/``end`` seconds).

Prompt and scoring as MVBench's own notebook (OpenGVLab/Ask-Anything, video_chat2/mvbench.ipynb): options
listed as "(A) ...", "Only give the best option.", the answer turn pre-filled with "Best option:(", the
reply's first line put after "(" and checked with ``check_ans`` against "(X) <answer>" (``extract``
``mvbench_official_correct``: also its quirks, e.g. an empty reply counts as right and "Option B" as
wrong); accuracy per task and overall (correct / total over all items, the notebook's "Avg"). A lenient
reading ("Option B", "Best option: (B)", the option's text) is kept beside it, never as the score.

Videos: ``<video_prefix>/<task's folder>/<video>`` (the folders of MVBench's ``data_list``, e.g.
``star/Charades_v1_480/``), else ``<video_prefix>/<video>``; ``video_prefix`` defaults to the data
prefix's sibling ``video/`` and then to the data prefix itself. A path that is a folder of images is
read as frames at 3 fps (MVBench ships TVQA that way).
"""

from __future__ import annotations

import json
import posixpath

from ..extract import mvbench_gt, mvbench_letter, mvbench_official_correct, option_letters
from ..items import Item, ItemError, LoadedBenchmark, frame_list_visual, resolve_visual
from ..judge import Judge
from ..prompts import MVBENCH_ANSWER_PREFIX, mvbench_user_prompt
from .base import Asker, Benchmark, Graded, Location, cap_per_task

# file stem → (task name in reports, video folder under MVBench's video/)
MVBENCH_TASKS: dict[str, tuple[str, str]] = {
    "action_sequence": ("Action Sequence", "star/Charades_v1_480"),
    "action_prediction": ("Action Prediction", "star/Charades_v1_480"),
    "action_antonym": ("Action Antonym", "ssv2_video"),
    "fine_grained_action": ("Fine-grained Action", "Moments_in_Time_Raw/videos"),
    "unexpected_action": ("Unexpected Action", "FunQA_test/test"),
    "object_existence": ("Object Existence", "clevrer/video_validation"),
    "object_interaction": ("Object Interaction", "star/Charades_v1_480"),
    "object_shuffle": ("Object Shuffle", "perception/videos"),
    "moving_direction": ("Moving Direction", "clevrer/video_validation"),
    "action_localization": ("Action Localization", "sta/sta_video"),
    "scene_transition": ("Scene Transition", "scene_qa/video"),
    "action_count": ("Action Count", "perception/videos"),
    "moving_count": ("Moving Count", "clevrer/video_validation"),
    "moving_attribute": ("Moving Attribute", "clevrer/video_validation"),
    "state_change": ("State Change", "perception/videos"),
    "fine_grained_pose": ("Fine-grained Pose", "nturgbd"),
    "character_order": ("Character Order", "perception/videos"),
    "egocentric_navigation": ("Egocentric Navigation", "vlnqa"),
    "episodic_reasoning": ("Episodic Reasoning", "tvqa/frames_fps3_hq"),
    "counterfactual_inference": ("Counterfactual Inference", "clevrer/video_validation"),
}
MAX_OPTIONS = 26


def json_files(data: Location) -> list[str]:
    """The JSON files of a benchmark: ``data.base`` itself when it names one, else every .json under it."""
    if data.base.endswith(".json"):
        return [data.base] if data.source.exists(data.base) else []
    prefix = data.base.rstrip("/") + "/" if data.base else ""
    return [k for k in data.source.list(prefix) if k.endswith(".json")]


def read_json(data: Location, key: str) -> object:
    return json.loads(data.source.read_bytes(key))


def _seconds(value: object) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"start/end {value!r} is not a number of seconds") from None


def validate_mc(raw: object) -> tuple[str, list[str], int]:
    """(question, candidates, index of the answer) of an MVBench-shaped item, or ValueError saying why not."""
    if not isinstance(raw, dict):
        raise ValueError("item is not an object")
    question, candidates, answer = raw.get("question"), raw.get("candidates"), raw.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("missing question")
    if not isinstance(candidates, list) or not candidates:
        raise ValueError("empty candidate list")
    if len(candidates) < 2 or len(candidates) > MAX_OPTIONS:
        raise ValueError(f"needs 2 to {MAX_OPTIONS} candidates, has {len(candidates)}")
    if not all(isinstance(c, str | int | float) for c in candidates):
        raise ValueError("candidates must be strings")
    candidates = [str(c) for c in candidates]
    if str(answer) not in candidates:
        raise ValueError(f"answer {str(answer)[:80]!r} is not one of the candidates")
    # qa_template's loop keeps the last candidate equal to the answer (a repeated text is the later letter).
    return question, candidates, len(candidates) - 1 - candidates[::-1].index(str(answer))


class MVBench(Benchmark):
    kind = "mvbench"

    def default_video_bases(self, data: Location) -> list[str]:
        base = posixpath.dirname(data.base) if data.base.endswith(".json") else data.base.rstrip("/")
        return [data.source.join(data.source.parent(base), "video"), base]

    def load(self, data: Location, videos: Location | None, *, max_items: int) -> LoadedBenchmark:
        loaded = LoadedBenchmark()
        video_source = videos.source if videos else data.source
        video_bases = [videos.base] if videos else self.default_video_bases(data)
        for key in json_files(data):
            stem = posixpath.splitext(posixpath.basename(key))[0]
            task, folder = MVBENCH_TASKS.get(stem, (stem, ""))
            try:
                entries = read_json(data, key)
            except (ValueError, UnicodeDecodeError) as exc:
                loaded.errors.append(ItemError(task, key, f"not valid JSON: {exc}"))
                continue
            if not isinstance(entries, list):
                loaded.errors.append(ItemError(task, key, "an MVBench task file must be a JSON list"))
                continue
            loaded.files.append(key)
            for i, raw in enumerate(entries):
                item_id = f"{stem}/{i}"
                try:
                    question, candidates, answer_idx = validate_mc(raw)
                    start, end = _seconds(raw.get("start")), _seconds(raw.get("end"))
                    video = raw.get("video")
                    if not isinstance(video, str) or not video:
                        raise ValueError("missing video")
                    candidates_keys = [
                        video_source.join(b, posixpath.join(folder, video)) for b in video_bases if folder
                    ] + [video_source.join(b, video) for b in video_bases]
                except ValueError as exc:
                    loaded.errors.append(ItemError(task, item_id, str(exc)))
                    continue
                visual = resolve_visual(video_source, candidates_keys, start=start, end=end)
                if visual is None:
                    loaded.errors.append(ItemError(task, item_id, f"video {video!r} not found"))
                    continue
                data_fields = {"question": question, "candidates": candidates, "answer": answer_idx}
                loaded.items.append(Item(self.kind, task, item_id, visual, data_fields))
        loaded.items = cap_per_task(loaded.items, max_items)
        return loaded

    def answer(self, item: Item, asker: Asker) -> dict:
        prompt = mvbench_user_prompt(item.data["question"], item.data["candidates"])
        return asker.choose(prompt, item.data["candidates"], prefix=MVBENCH_ANSWER_PREFIX).to_json()

    def grade(self, item: Item, answers: dict, judge: Judge | None) -> Graded:
        candidates, answer_idx = item.data["candidates"], item.data["answer"]
        gt = option_letters(len(candidates))[answer_idx]
        raw = answers.get("raw", "")
        if answers.get("method") == "generated":
            # A generated reply: MVBench's check on the text itself; the letter is the lenient reading.
            letter = mvbench_letter(raw, candidates)
            correct = mvbench_official_correct(raw, candidates, answer_idx)
        else:
            # Scored from the option letters' logits: the first token is a letter, exactly what the
            # notebook's check compares ("(" + letter against "(X)").
            letter = answers.get("letter")
            correct = letter is not None and mvbench_official_correct(letter, candidates, answer_idx)
        return Graded(
            item.task,
            correct=correct,
            # Wrong because nothing names an option (counted, as in every benchmark here).
            failures=int(letter is None and not correct),
            detail={"pred": letter, "gt": gt, "gt_text": mvbench_gt(candidates, answer_idx), "raw": raw},
            lenient=letter == gt,
        )


class DreamFrameMC(MVBench):
    """The qa-generator's multiple-choice items: MVBench's item shape in JSON lists (``id`` and ``task``
    optional), the visual either ``video`` (an mp4 relative to the dataset folder) or ``frames`` (frame
    object keys in order). Prompted and scored exactly like MVBench.

    Given a whole dataset folder (``datasets/<name>/`` with ``mc/train.json``, ``mc/validation.json``,
    ``mc/test.json``), only the held-out split is used: test, else validation, else everything there is
    (a split file that holds no items, as a one-story dataset's test split does, counts as absent)."""

    kind = "dreamframe_mc"

    @staticmethod
    def held_out(files: list[str]) -> list[list[str]]:
        """Groups of files to try in order: the test split, the validation split, then all files."""
        by_split = {posixpath.splitext(posixpath.basename(k))[0]: k for k in files}
        groups = [[by_split[s]] for s in ("test", "validation") if s in by_split and "train" in by_split]
        return [*groups, files]

    def load(self, data: Location, videos: Location | None, *, max_items: int) -> LoadedBenchmark:
        for group in self.held_out(json_files(data)):
            loaded = self._load_files(data, videos, group, max_items=max_items)
            if loaded.items or loaded.errors:
                return loaded
        return loaded

    def _load_files(
        self, data: Location, videos: Location | None, files: list[str], *, max_items: int
    ) -> LoadedBenchmark:
        loaded = LoadedBenchmark()
        for key in files:
            try:
                entries = read_json(data, key)
            except (ValueError, UnicodeDecodeError):
                continue
            # A dataset folder also holds conversations and a manifest: only lists of MC items count.
            if not (
                isinstance(entries, list)
                and entries
                and isinstance(entries[0], dict)
                and "candidates" in entries[0]
            ):
                continue
            loaded.files.append(key)
            folder = posixpath.dirname(key)
            stem = posixpath.splitext(posixpath.basename(key))[0]
            for i, raw in enumerate(entries):
                task = str(raw.get("task") or stem) if isinstance(raw, dict) else stem
                item_id = str(raw.get("id") or f"{stem}/{i}") if isinstance(raw, dict) else f"{stem}/{i}"
                try:
                    question, candidates, answer_idx = validate_mc(raw)
                    visual = self._visual(raw, data, videos, folder)
                except ValueError as exc:
                    loaded.errors.append(ItemError(task, item_id, str(exc)))
                    continue
                data_fields = {"question": question, "candidates": candidates, "answer": answer_idx}
                loaded.items.append(Item(self.kind, task, item_id, visual, data_fields))
        loaded.items = cap_per_task(loaded.items, max_items)
        return loaded

    def _visual(self, raw: dict, data: Location, videos: Location | None, folder: str):
        frames = raw.get("frames")
        if isinstance(frames, list) and frames:
            source = videos.source if videos else data.source
            keys = [str(k) for k in frames]
            missing = [k for k in keys if not source.exists(k)]
            if missing:
                raise ValueError(f"{len(missing)} of {len(keys)} frames not found (first: {missing[0]!r})")
            # Keyframes are shown as a video at the qa-generator's default rate (2 fps).
            return frame_list_visual(source, keys, fps=2.0)
        video = raw.get("video")
        if not isinstance(video, str) or not video:
            raise ValueError("item has neither video nor frames")
        source = videos.source if videos else data.source
        # "video" is relative to the dataset folder, which holds the MC file or one of its ancestors.
        bases = [videos.base] if videos else []
        ancestor = folder
        while ancestor not in bases:
            bases.append(ancestor)
            ancestor = posixpath.dirname(ancestor)
        visual = resolve_visual(source, [source.join(b, video) for b in bases])
        if visual is None:
            raise ValueError(f"video {video!r} not found")
        return visual
