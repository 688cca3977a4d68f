"""Video-ChatGPT's judged open answers (mbzuai-oryx/Video-ChatGPT, quantitative_evaluation/), as its five
scripts judge them.

Files are lists of ``{video_name, Q, A}`` (consistency: ``{video_name, Q1, Q2, A}``); files that already
hold the model's answers (``pred``, or ``pred1``/``pred2``: the predictions the scripts read) are judged
as they are by a model spec without a source. Videos: ``<video_name>.{mp4,avi,mov,mkv}``.

Which file gets which criterion, by its name (evaluate_benchmark.sh's five prediction files):
``correctness_pred`` → correctness only (evaluate_benchmark_1_correctness.py), ``detailed_orientation_pred``
→ detail orientation only (2_detailed_orientation), ``contextual_pred`` → contextual understanding only
(3_context), ``temporal_understanding_pred`` → temporal understanding (4_temporal), ``consistency_pred``
(and any file of Q1/Q2 pairs) → consistency (5_consistency). The question files: ``generic_qa.json`` is the
one question set the README says serves the first three scripts, so its answers get the three generic
criteria; ``temporal_qa.json`` → temporal; ``consistency_qa.json`` → consistency.

The judge gets each script's prompt verbatim (``prompts.video_chatgpt_messages``); its reply is read as
the scripts read it (``judge.video_chatgpt_score_reply``: ``ast.literal_eval`` of the whole reply, then
``int(score)``, no range check); a reply they could not read is asked again (up to
``judge_max_attempts`` calls; theirs loop until every file is judged) and then counted as a failure,
never dropped silently. Each criterion's score is the mean over the items the judge scored (the scripts'
"Average score"); ``mean`` averages the criteria present. With ``evaluator.lenient_judge_replies`` a
criterion row also carries the mean with the forgiving reading (``extra.lenient_score``).
"""

from __future__ import annotations

import posixpath
from collections import defaultdict

from ..items import Item, ItemError, LoadedBenchmark, resolve_visual
from ..judge import Judge
from ..prompts import CRITERIA
from .base import LENIENT_SCORE, Asker, Benchmark, Graded, Location, ScoreRow, cap_per_task
from .mvbench import json_files, read_json

VIDEO_FORMATS = (".mp4", ".avi", ".mov", ".mkv")
GENERIC, TEMPORAL, CONSISTENCY = "generic", "temporal", "consistency"
CRITERIA_OF = {
    GENERIC: ("correctness", "detail_orientation", "contextual_understanding"),
    TEMPORAL: ("temporal_understanding",),
    CONSISTENCY: ("consistency",),
}
# A generic file named for one script is judged by that script's criterion alone (evaluate_benchmark.sh:
# correctness_pred, detailed_orientation_pred, contextual_pred).
SINGLE_CRITERION = (
    ("correctness", "correctness"),
    ("detail", "detail_orientation"),
    ("context", "contextual_understanding"),
)


def question_set(key: str, entries: list) -> str:
    if entries and isinstance(entries[0], dict) and "Q1" in entries[0]:
        return CONSISTENCY
    return TEMPORAL if "temporal" in posixpath.basename(key).lower() else GENERIC


def file_criteria(key: str, qset: str) -> tuple[str, ...]:
    """The criteria a file's answers are judged on (see the module doc)."""
    if qset == GENERIC:
        stem = posixpath.basename(key).lower()
        for word, criterion in SINGLE_CRITERION:
            if word in stem:
                return (criterion,)
    return CRITERIA_OF[qset]


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
            criteria = file_criteria(key, qset)
            # One task per criterion-file (correctness_pred, ...), else the question set.
            task = criteria[0] if len(criteria) == 1 and qset == GENERIC else qset
            loaded.files.append(key)
            stem = posixpath.splitext(posixpath.basename(key))[0]
            for i, raw in enumerate(entries):
                item_id = f"{stem}/{i}"
                try:
                    fields = self._fields(qset, raw)
                except ValueError as exc:
                    loaded.errors.append(ItemError(task, item_id, str(exc)))
                    continue
                fields["qset"], fields["criteria"] = qset, list(criteria)
                name = fields["video_name"]
                names = (
                    [name] if name.lower().endswith(VIDEO_FORMATS) else [name + ext for ext in VIDEO_FORMATS]
                )
                visual = resolve_visual(source, [source.join(b, n) for b in bases for n in names])
                has_preds = all(
                    k in fields for k in (("pred1", "pred2") if qset == CONSISTENCY else ("pred",))
                )
                if visual is None and not has_preds:
                    loaded.errors.append(ItemError(task, item_id, f"video {name[:200]!r} not found"))
                    continue
                loaded.items.append(Item(self.kind, task, item_id, visual, fields))
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
        consistency = item.data["qset"] == CONSISTENCY
        keys = ("pred1", "pred2") if consistency else ("pred",)
        if asker.predictions_only:
            missing = [k for k in keys if k not in item.data]
            if missing:
                raise ValueError(f"the benchmark file has no {', '.join(missing)} for this item")
            return {k: item.data[k] for k in keys}
        if consistency:
            return {"pred1": asker.answer(item.data["Q1"]), "pred2": asker.answer(item.data["Q2"])}
        return {"pred": asker.answer(item.data["Q"])}

    def grade(self, item: Item, answers: dict, judge: Judge | None) -> Graded:
        if judge is None:  # guarded by requires_judge; kept for direct callers
            raise ValueError("Video-ChatGPT answers need a judge")
        fields = {**item.data, **answers}
        graded = Graded(item.task, detail={"answers": answers, "judgments": {}})
        for criterion in item.data["criteria"]:
            verdict = judge.score(criterion, fields)
            graded.scores[criterion] = verdict.value
            graded.failures += int(verdict.value is None)
            graded.judge_calls += 1
            graded.detail["judgments"][criterion] = verdict.to_json()
            if judge.lenient:
                value = verdict.value if verdict.value is not None else verdict.lenient_value
                graded.detail.setdefault("lenient", {})[criterion] = value
        return graded

    def summarize(self, graded: list[Graded]) -> list[ScoreRow]:
        values: dict[str, list[float]] = defaultdict(list)
        lenient: dict[str, list[float]] = defaultdict(list)
        failures: dict[str, int] = defaultdict(int)
        for g in graded:
            for criterion, score in g.scores.items():
                if score is None:
                    failures[criterion] += 1
                else:
                    values[criterion].append(score)
            for criterion, score in g.detail.get("lenient", {}).items():
                if score is not None:
                    lenient[criterion].append(score)
        rows = []
        for criterion in CRITERIA:
            n = len(values[criterion]) + failures[criterion]
            if n == 0:
                continue
            mean = sum(values[criterion]) / len(values[criterion]) if values[criterion] else None
            extra = {}
            if lenient[criterion]:
                extra[LENIENT_SCORE] = sum(lenient[criterion]) / len(lenient[criterion])
            rows.append(ScoreRow(criterion, mean, n, failures[criterion], unit="judge_score", extra=extra))
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
