"""TempCompass: ``questions/<type>.json`` = ``{video_id: {dimension: [{question, answer}]}}`` for the four
task types multi-choice, yes_no, caption_matching and captioning; videos ``videos/<video_id>.mp4``.

The model gets the question plus TempCompass's answer prompt ("Please directly give the best option:",
"Please answer yes or no:"); its reply is matched with TempCompass's hand-written rules first and goes to
the LLM judge ("Correct"/"Incorrect") only when the rules cannot decide. Captioning is always judged:
the judge answers the video's first multi-choice question of that dimension from the caption alone.
Without a judge, undecided answers count as wrong (the official ``--disable_llm`` rating 0) and as
failures; so does a judge whose every reply fails the official verdict parsing (its ``get_eval_result``
gives 0 after its retries).

Rules as llyx97/TempCompass: eval_multi-choice.py (exact answer, a lone "A".."D", "A." / "A)" prefixes),
eval_yes_no.py (``extract_pred``), eval_caption_matching.py (``eval_rule``, with bare indices "A", "1",
"A.", "1."), eval_captioning.py (``parse_llm_output``), and the judge's verdict by utils/eval_utils.py's
``llm_output_to_rating`` (``extract.judge_correct``). ``detail["matched_by"]`` is "rule" where the
official ``match_success`` is true.

Tasks in the report are ``<type>/<dimension>``, then ``<type>`` and ``overall`` (micro averages).
"""

from __future__ import annotations

import posixpath

from ..extract import (
    caption_matching_options,
    tempcompass_caption_matching,
    tempcompass_multi_choice,
    tempcompass_yes_no,
)
from ..items import Item, ItemError, LoadedBenchmark, resolve_visual
from ..judge import Judge
from ..prompts import TEMPCOMPASS_ANSWER_PROMPT
from .base import Asker, Benchmark, Graded, Location, ScoreRow, accuracy_rows, cap_per_task
from .mvbench import json_files, read_json

TASK_TYPES = ("multi-choice", "yes_no", "caption_matching", "captioning")


class TempCompass(Benchmark):
    kind = "tempcompass"

    def load(self, data: Location, videos: Location | None, *, max_items: int) -> LoadedBenchmark:
        loaded = LoadedBenchmark()
        files = {posixpath.splitext(posixpath.basename(k))[0]: k for k in json_files(data)}
        questions: dict[str, dict] = {}
        for qtype in TASK_TYPES:
            if qtype not in files:
                continue
            try:
                content = read_json(data, files[qtype])
            except (ValueError, UnicodeDecodeError) as exc:
                loaded.errors.append(ItemError(qtype, files[qtype], f"not valid JSON: {exc}"))
                continue
            if not isinstance(content, dict):
                loaded.errors.append(
                    ItemError(qtype, files[qtype], "expected {video_id: {dimension: [...]}}")
                )
                continue
            questions[qtype] = content
            loaded.files.append(files[qtype])
        if not questions:
            return loaded
        root = posixpath.dirname(data.base) if data.base.endswith(".json") else data.base
        source = videos.source if videos else data.source
        bases = (
            [videos.base]
            if videos
            else [source.join(root, "videos"), source.join(source.parent(root), "videos"), root]
        )
        mc = questions.get("multi-choice", {})
        for qtype, content in questions.items():
            for video_id, dims in content.items():
                if not isinstance(dims, dict):
                    loaded.errors.append(
                        ItemError(qtype, f"{qtype}/{video_id}", "expected {dimension: [...]}")
                    )
                    continue
                visual = resolve_visual(source, [source.join(b, f"{video_id}.mp4") for b in bases])
                for dim, entries in dims.items():
                    for i, raw in enumerate(entries if isinstance(entries, list) else [entries]):
                        task, item_id = f"{qtype}/{dim}", f"{qtype}/{video_id}/{dim}/{i}"
                        try:
                            if visual is None:
                                raise ValueError(f"video {video_id}.mp4 not found")
                            fields = self._fields(qtype, raw, mc, video_id, dim)
                        except ValueError as exc:
                            loaded.errors.append(ItemError(task, item_id, str(exc)))
                            continue
                        loaded.items.append(Item(self.kind, task, item_id, visual, fields))
        loaded.items = cap_per_task(loaded.items, max_items)
        return loaded

    @staticmethod
    def _fields(qtype: str, raw: object, multi_choice: dict, video_id: str, dim: str) -> dict:
        if (
            not isinstance(raw, dict)
            or not isinstance(raw.get("question"), str)
            or not isinstance(raw.get("answer"), str)
        ):
            raise ValueError("item needs string question and answer")
        fields = {"qtype": qtype, "question": raw["question"], "answer": raw["answer"]}
        if qtype in ("multi-choice", "caption_matching") and not raw["answer"]:
            raise ValueError("empty answer")
        if qtype == "caption_matching":
            # eval_caption_matching.py splits every option line on ": " and checks the answer is one.
            options = caption_matching_options(raw["question"])
            if not options or any(": " not in opt for opt in options):
                raise ValueError('caption_matching options must be lines "<index>: <caption>"')
            if raw["answer"] not in options:
                raise ValueError("caption_matching answer is not one of the option lines")
        if qtype == "captioning":
            # TempCompass judges a caption by answering the first multi-choice question of the same
            # video and dimension from the caption alone.
            try:
                mc = multi_choice[video_id][dim][0]
                fields["mc_question"], fields["mc_answer"] = mc["question"], mc["answer"]
            except (KeyError, IndexError, TypeError):
                raise ValueError(
                    "captioning needs multi-choice.json's question for this video and dimension"
                ) from None
        return fields

    def answer(self, item: Item, asker: Asker) -> dict:
        prompt = item.data["question"] + TEMPCOMPASS_ANSWER_PROMPT[item.data["qtype"]]
        return {"prediction": asker.answer(prompt)}

    def grade(self, item: Item, answers: dict, judge: Judge | None) -> Graded:
        qtype, question, answer = item.data["qtype"], item.data["question"], item.data["answer"]
        pred = answers["prediction"]
        detail: dict = {"prediction": pred, "answer": answer}
        if qtype == "captioning":
            rating = None
            if judge is not None:
                verdict = judge.answer_from_caption(pred, item.data["mc_question"], item.data["mc_answer"])
                rating, detail["judge"] = verdict.value, verdict.to_json()
            detail["matched_by"] = "judge" if rating is not None else "none"
            return Graded(
                item.task, correct=rating == 1, failures=int(rating is None), judge_calls=1, detail=detail
            )
        if qtype == "multi-choice":
            rating = tempcompass_multi_choice(pred, answer)
        elif qtype == "yes_no":
            rating = tempcompass_yes_no(pred, answer)
        else:
            rating = tempcompass_caption_matching(pred, question, answer)
        detail["matched_by"] = "rule"
        judge_calls = 0
        if rating is None:
            detail["matched_by"] = "none"
            if judge is not None:
                verdict = judge.is_correct(qtype, question, answer, pred)
                judge_calls = 1
                detail["judge"] = verdict.to_json()
                if verdict.value is not None:
                    rating, detail["matched_by"] = int(verdict.value), "judge"
        return Graded(
            item.task,
            correct=rating == 1,
            failures=int(rating is None),
            judge_calls=judge_calls,
            detail=detail,
        )

    def summarize(self, graded: list[Graded]) -> list[ScoreRow]:
        rows = accuracy_rows(graded, overall=None)
        for qtype in TASK_TYPES:
            of_type = [g for g in graded if g.task.split("/", 1)[0] == qtype]
            if of_type:
                (row,) = accuracy_rows(
                    [Graded(qtype, g.correct, failures=g.failures) for g in of_type], overall=None
                )
                # utils/eval_utils.py's print_result: "Match Success Rate", the share the rules decided
                # (captioning never sets match_success, so 0 there too).
                matched = sum(1 for g in of_type if g.detail.get("matched_by") == "rule")
                row.extra["match_success_rate"] = round(100.0 * matched / len(of_type), 1)
                rows.append(row)
        if graded:
            rows += accuracy_rows(
                [Graded("overall", g.correct, failures=g.failures) for g in graded], overall=None
            )
        return rows
