"""Video-ChatGPT's judged open answers: ``generic_qa.json`` and ``temporal_qa.json`` (lists of
``{video_name, Q, A}``) and ``consistency_qa.json`` (``{video_name, Q1, Q2, A}``); videos
``<video_name>.{mp4,avi,mov,mkv}``. Files that already hold the model's answers (``pred``, or
``pred1``/``pred2``: Video-ChatGPT's predictions format) are judged as they are by a model spec without
a source.

The judge scores each answer 0-5 on Video-ChatGPT's criteria with its own prompts: generic answers on
correctness, detail orientation and contextual understanding; temporal answers on temporal
understanding; the two answers of a consistency pair on consistency. It replies with a Python dict
string ``{'score': n}``, read with ast.literal_eval; a malformed reply is asked again (up to
``judge_max_attempts`` calls) and then counted as a failure, never dropped silently. Each criterion's
score is the mean over the items the judge scored; ``mean`` averages the five criteria.
"""

from __future__ import annotations

import posixpath
from collections import defaultdict

from ..items import Item, ItemError, LoadedBenchmark, resolve_visual
from ..judge import Judge
from ..prompts import CRITERIA
from .base import Asker, Benchmark, Graded, Location, ScoreRow, cap_per_task
from .mvbench import json_files, read_json

VIDEO_FORMATS = (".mp4", ".avi", ".mov", ".mkv")
GENERIC, TEMPORAL, CONSISTENCY = "generic", "temporal", "consistency"
CRITERIA_OF = {
    GENERIC: ("correctness", "detail_orientation", "contextual_understanding"),
    TEMPORAL: ("temporal_understanding",),
    CONSISTENCY: ("consistency",),
}


def question_set(key: str, entries: list) -> str:
    if entries and isinstance(entries[0], dict) and "Q1" in entries[0]:
        return CONSISTENCY
    return TEMPORAL if "temporal" in posixpath.basename(key).lower() else GENERIC


class VideoChatGPT(Benchmark):
    kind = "video_chatgpt"
    requires_judge = True

    def load(self, data: Location, videos: Location | None, *, max_items: int) -> LoadedBenchmark:
        loaded = LoadedBenchmark()
        root = posixpath.dirname(data.base) if data.base.endswith(".json") else data.base
        source = videos.source if videos else data.source
        bases = (
            [videos.base]
            if videos
            else [root, source.join(root, "videos"), source.join(source.parent(root), "videos")]
        )
        for key in json_files(data):
            try:
                entries = read_json(data, key)
            except (ValueError, UnicodeDecodeError) as exc:
                loaded.errors.append(ItemError(posixpath.basename(key), key, f"not valid JSON: {exc}"))
                continue
            if not isinstance(entries, list):
                continue  # not a question file (a manifest, say)
            qset = question_set(key, entries)
            loaded.files.append(key)
            stem = posixpath.splitext(posixpath.basename(key))[0]
            for i, raw in enumerate(entries):
                item_id = f"{stem}/{i}"
                try:
                    fields = self._fields(qset, raw)
                except ValueError as exc:
                    loaded.errors.append(ItemError(qset, item_id, str(exc)))
                    continue
                name = fields["video_name"]
                names = (
                    [name] if name.lower().endswith(VIDEO_FORMATS) else [name + ext for ext in VIDEO_FORMATS]
                )
                visual = resolve_visual(source, [source.join(b, n) for b in bases for n in names])
                has_preds = all(
                    k in fields for k in (("pred1", "pred2") if qset == CONSISTENCY else ("pred",))
                )
                if visual is None and not has_preds:
                    loaded.errors.append(ItemError(qset, item_id, f"video {name!r} not found"))
                    continue
                loaded.items.append(Item(self.kind, qset, item_id, visual, fields))
        loaded.items = cap_per_task(loaded.items, max_items)
        return loaded

    @staticmethod
    def _fields(qset: str, raw: object) -> dict:
        if not isinstance(raw, dict):
            raise ValueError("item is not an object")
        needed = ("video_name", "Q1", "Q2", "A") if qset == CONSISTENCY else ("video_name", "Q", "A")
        missing = [
            k for k in needed if not isinstance(raw.get(k), str | int) or str(raw.get(k)).strip() == ""
        ]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        fields = {k: str(raw[k]) for k in needed}
        for pred in ("pred", "pred1", "pred2"):
            if isinstance(raw.get(pred), str):
                fields[pred] = raw[pred]
        return fields

    def answer(self, item: Item, asker: Asker) -> dict:
        keys = ("pred1", "pred2") if item.task == CONSISTENCY else ("pred",)
        if asker.predictions_only:
            missing = [k for k in keys if k not in item.data]
            if missing:
                raise ValueError(f"the benchmark file has no {', '.join(missing)} for this item")
            return {k: item.data[k] for k in keys}
        if item.task == CONSISTENCY:
            return {"pred1": asker.answer(item.data["Q1"]), "pred2": asker.answer(item.data["Q2"])}
        return {"pred": asker.answer(item.data["Q"])}

    def grade(self, item: Item, answers: dict, judge: Judge | None) -> Graded:
        if judge is None:  # guarded by requires_judge; kept for direct callers
            raise ValueError("Video-ChatGPT answers need a judge")
        fields = {**item.data, **answers}
        graded = Graded(item.task, detail={"answers": answers, "judgments": {}})
        for criterion in CRITERIA_OF[item.task]:
            verdict = judge.score(criterion, fields)
            graded.scores[criterion] = verdict.value
            graded.failures += int(verdict.value is None)
            graded.judge_calls += 1
            graded.detail["judgments"][criterion] = verdict.to_json()
        return graded

    def summarize(self, graded: list[Graded]) -> list[ScoreRow]:
        values: dict[str, list[float]] = defaultdict(list)
        failures: dict[str, int] = defaultdict(int)
        for g in graded:
            for criterion, score in g.scores.items():
                if score is None:
                    failures[criterion] += 1
                else:
                    values[criterion].append(score)
        rows = []
        for criterion in CRITERIA:
            n = len(values[criterion]) + failures[criterion]
            if n == 0:
                continue
            mean = sum(values[criterion]) / len(values[criterion]) if values[criterion] else None
            rows.append(ScoreRow(criterion, mean, n, failures[criterion], unit="judge_score"))
        scored = [r.score for r in rows if r.score is not None]
        if scored:
            rows.append(
                ScoreRow(
                    "mean",
                    sum(scored) / len(scored),
                    sum(r.items for r in rows),
                    sum(r.failures for r in rows),
                    unit="judge_score",
                    extra={"criteria": len(scored)},
                )
            )
        return rows
