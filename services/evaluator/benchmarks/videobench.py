"""Video-Bench: one file per dataset, ``Eval_QA/<Dataset>_QA_new.json`` =
``{qid: {vid_path, video_id, question, choices: {A..F}, answer}}`` (``answer`` a letter; the choice's text
is accepted too); ``vid_path`` is relative to the Video-Bench root (``Eval_video/<Dataset>/<id>.mp4``).

The model answers Video-Bench's prompt ("... Among the four options A, B, C, D above, the one closest to
the correct answer is:"). Video-Bench has ChatGPT map every free-form output to a choice; here outputs
that already name one option unambiguously ("B", "(B)", "B. text", a choice's exact text) are read by
rule and only the rest go to the judge, with Video-Bench's own selection prompt. Without a judge the rest
count as wrong and as failures.

Scores: accuracy per dataset; each level is the weighted mean of its datasets' accuracies with
Video-Bench's Step3_compute_scores.py weights (all 1 except MOT and Driving-exam, 0.5), re-normalised
over the datasets present; ``final`` is the plain mean of the levels present (Video-Bench's final score).
Datasets outside the three levels are reported but in no level; ``overall`` is correct / total over all
items.
"""

from __future__ import annotations

import posixpath
import re

from ..extract import videobench_letter
from ..items import Item, ItemError, LoadedBenchmark, resolve_visual
from ..judge import Judge
from ..prompts import videobench_prompt
from .base import Asker, Benchmark, Graded, Location, ScoreRow, accuracy_rows, cap_per_task
from .mvbench import json_files, read_json

LEVELS: dict[str, dict[str, float]] = {
    "Video-Exclusive Understanding": {
        "ActivityNet": 1,
        "MSVD": 1,
        "MSRVTT": 1,
        "TGIF": 1,
        "Youcook2": 1,
        "Ucfcrime": 1,
        "MOT": 0.5,
    },
    "Prior Knowledge-based QA": {"TVQA": 1, "MV": 1, "NBA": 1},
    "Comprehension and Decision-making": {"Driving-exam": 0.5, "Driving-decision-making": 1, "SQA3D": 1},
}


def dataset_name(key: str) -> str:
    stem = posixpath.splitext(posixpath.basename(key))[0]
    return re.sub(r"(_QA_new|_QA)$", "", stem)


class VideoBench(Benchmark):
    kind = "video_bench"

    def load(self, data: Location, videos: Location | None, *, max_items: int) -> LoadedBenchmark:
        loaded = LoadedBenchmark()
        qa_dir = posixpath.dirname(data.base) if data.base.endswith(".json") else data.base
        source = videos.source if videos else data.source
        bases = [videos.base] if videos else [source.parent(qa_dir), qa_dir]
        for key in json_files(data):
            name = dataset_name(key)
            try:
                content = read_json(data, key)
            except (ValueError, UnicodeDecodeError) as exc:
                loaded.errors.append(ItemError(name, key, f"not valid JSON: {exc}"))
                continue
            if not isinstance(content, dict):
                loaded.errors.append(
                    ItemError(name, key, "expected {qid: {vid_path, question, choices, ...}}")
                )
                continue
            loaded.files.append(key)
            for qid, raw in content.items():
                item_id = f"{name}/{qid}"
                try:
                    fields, vid_path = self._fields(raw)
                except ValueError as exc:
                    loaded.errors.append(ItemError(name, item_id, str(exc)))
                    continue
                visual = resolve_visual(source, [source.join(b, vid_path) for b in bases])
                if visual is None:
                    loaded.errors.append(ItemError(name, item_id, f"video {vid_path!r} not found"))
                    continue
                loaded.items.append(Item(self.kind, name, item_id, visual, fields))
        loaded.items = cap_per_task(loaded.items, max_items)
        return loaded

    @staticmethod
    def _fields(raw: object) -> tuple[dict, str]:
        if not isinstance(raw, dict):
            raise ValueError("item is not an object")
        choices, question, vid_path = raw.get("choices"), raw.get("question"), raw.get("vid_path")
        if not isinstance(choices, dict) or not choices:
            raise ValueError("empty candidate list")
        if len(choices) < 2:
            raise ValueError(f"needs at least 2 choices, has {len(choices)}")
        choices = {str(k).strip().upper(): str(v) for k, v in choices.items()}
        if not all(len(k) == 1 and k.isalpha() for k in choices):
            raise ValueError(f"choice keys must be letters, got {sorted(choices)}")
        if not isinstance(question, str) or not question.strip():
            raise ValueError("missing question")
        if not isinstance(vid_path, str) or not vid_path:
            raise ValueError("missing vid_path")
        answer = raw.get("answer")
        if answer is None:
            raise ValueError("missing answer")
        answer = str(answer).strip()
        if answer.upper() not in choices:
            by_text = {v.strip(): k for k, v in choices.items()}
            if answer not in by_text:
                raise ValueError(f"answer {answer!r} is neither a choice letter nor a choice's text")
            answer = by_text[answer]
        return {"question": question, "choices": choices, "answer": answer.upper()}, vid_path

    def answer(self, item: Item, asker: Asker) -> dict:
        return {"output": asker.answer(videobench_prompt(item.data["question"], item.data["choices"]))}

    def grade(self, item: Item, answers: dict, judge: Judge | None) -> Graded:
        choices, output = item.data["choices"], answers["output"]
        letter = videobench_letter(output, choices)
        detail: dict = {
            "output": output,
            "gt": item.data["answer"],
            "matched_by": "rule" if letter else "none",
        }
        judge_calls = 0
        if letter is None and judge is not None:
            verdict = judge.map_choice(
                videobench_prompt(item.data["question"], choices), output, list(choices)
            )
            judge_calls = 1
            detail["judge"] = verdict.to_json()
            if verdict.value is not None:
                letter, detail["matched_by"] = verdict.value, "judge"
        detail["pred"] = letter
        return Graded(
            item.task,
            correct=letter == item.data["answer"],
            failures=int(letter is None),
            judge_calls=judge_calls,
            detail=detail,
        )

    def summarize(self, graded: list[Graded]) -> list[ScoreRow]:
        rows = accuracy_rows(graded, overall=None)
        accuracy = {row.task: row.score for row in rows if row.score is not None}
        levels = []
        for level, weights in LEVELS.items():
            present = {name: w for name, w in weights.items() if name in accuracy}
            if not present:
                continue
            total = sum(present.values())
            score = sum(w * accuracy[name] for name, w in present.items()) / total
            items = sum(row.items for row in rows if row.task in present)
            failures = sum(row.failures for row in rows if row.task in present)
            levels.append(ScoreRow(f"level/{level}", score, items, failures, extra={"weights": present}))
        rows += levels
        if levels:
            rows.append(
                ScoreRow(
                    "final",
                    sum(r.score for r in levels) / len(levels),
                    sum(r.items for r in levels),
                    sum(r.failures for r in levels),
                    extra={"levels": len(levels)},
                )
            )
        if graded:
            rows += accuracy_rows(
                [Graded("overall", g.correct, failures=g.failures) for g in graded], overall=None
            )
        return rows
