"""Video-Bench (PKU-YuanGroup/Video-Bench), scored as its own scripts and its leaderboard score it.

Files: one per dataset, ``Eval_QA/<Dataset>_QA_new.json`` = ``{qid: {vid_path, video_id, question,
choices: {A..F}}}``; ``vid_path`` is relative to the Video-Bench root (``Eval_video/<Dataset>/<id>.mp4``).
Where the right answers are:

- the 2023 release (the repository before commit 42d542c "update json", 2023-11-30): in each item,
  ``answer`` (a letter; Step 1 copied it into ``correct``, which Step3_compute_scores.py compared);
- today: the public Eval_QA files carry none (that commit removed them). Step 3 is now
  Step3_merge_into_one_json.py (``{dataset: {qid: Step 2's item with output_chatgpt_choice}}``), uploaded
  to the leaderboard Space (Hugging Face, LanguageBind/Video-Bench), whose ``src/compute.py``
  (``chatgpt_json``) compares ``output_chatgpt_choice`` with ``ANSWER[dataset][qid]['answer']`` of its
  ``file/ANSWER.json``. So the answer file is ``{dataset: {qid: {"answer": letter, ...}}}``, ``dataset``
  being Step 1's name (the Eval_QA file's name without ``_QA_new.json``) and ``qid`` the Eval_QA key. That
  layout is read, and only it: a qid whose value has no ``"answer"`` (a bare letter, say) is an item error
  naming the file, where the Space's lookup would fail. It is looked for under the data prefix, then
  beside the Eval_QA folder and in its parent, as ``ANSWER.json``, ``file/ANSWER.json`` (the Space's
  path) or ``answer/ANSWER.json`` (where Hugging Face copies of the dataset keep it). Where both the
  file and an item have an answer, the file's (today's) is used.

A file with no answer from either place is an error naming the file (its items are not loaded); a run in
which no item can be scored is refused (``planning``). ``<Dataset>_QA.json`` next to
``<Dataset>_QA_new.json`` (the legacy MOT_QA.json) is skipped: Step 1 (README.md, ``dataset_qajson``)
reads only the ``_QA_new`` files. An item with one choice is asked and scored like the rest (Step 1 asks
the bare question: no branch for one choice).

Grading follows Step2_chatgpt_judge.py: every output, whatever it looks like ("B", "", a sentence), goes to
the judge, which maps it to a letter with Video-Bench's prompt and roles
(``prompts.videobench_choice_messages``); its reply is read as ``json.loads(reply)["maximum
probability"]`` in A-F (``judge.videobench_choice_reply``). A judge is therefore required
(``requires_judge``). With ``evaluator.lenient_letter_replies`` (off by default; ours, not Video-Bench's)
the "(lenient)" column also reads an output that is nothing but one of the item's letters, alone or as
"(B)", "B.", "B)", "B:", or followed by exactly that choice's text ("B. blue"), as that letter without
the judge (``rule_letter``; "A woman slips…" is text, not letter A); the official score still takes
the judge's letter.

Scores (Step3_compute_scores.py, 2023; the same weights in the Space's ``compute_scores``): accuracy per
dataset; each level is the weighted mean of its datasets (all weights 1 except MOT and Driving-exam,
0.5), re-normalised over the datasets present (theirs needs all 13); ``final`` is the plain mean of the
levels present. Datasets outside the levels are reported but in no level; ``overall`` is correct / total
over all items.
"""

from __future__ import annotations

import posixpath
import re
from typing import TYPE_CHECKING

from ..items import Item, ItemError, LoadedBenchmark, resolve_visual
from ..judge import Judge
from ..prompts import videobench_prompt
from .base import Asker, Benchmark, Graded, Location, ScoreRow, accuracy_rows, cap_per_task
from .mvbench import json_files, read_json

if TYPE_CHECKING:
    from ..settings import EvaluatorSettings

# Step3_compute_scores.py's dataset_weight.
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
ANSWER_NAME = "ANSWER.json"
# Where an answer file is looked for, relative to the data prefix, the Eval_QA folder and its parent: the
# leaderboard Space keeps it as file/ANSWER.json; Hugging Face copies of the dataset as answer/ANSWER.json.
ANSWER_PLACES = (ANSWER_NAME, f"file/{ANSWER_NAME}", f"answer/{ANSWER_NAME}")
LETTERS = "ABCDEF"


def dataset_name(key: str) -> str:
    stem = posixpath.splitext(posixpath.basename(key))[0]
    return re.sub(r"(_QA_new|_QA)$", "", stem)


def rule_letter(output: str, choices: dict[str, str]) -> str | None:
    """The letter of an output that can only mean that letter, for the lenient column
    (``evaluator.lenient_letter_replies``; ours: Step 2 sends every output to the judge); None: none."""
    text = output.strip()
    match = re.fullmatch(r"\(?([A-F])\)?[.):]?(?:\s+(.*))?", text, flags=re.DOTALL)
    if not match or match.group(1) not in choices:
        return None
    rest = match.group(2)
    if rest is None:
        return match.group(1)
    # "B. blue": the rest must be exactly that choice's text.
    return match.group(1) if rest.strip() == choices[match.group(1)].strip() else None


def _has_answers(content: dict, shipped: dict) -> bool:
    """Whether any item of a file has its answer, in the item (2023) or in ANSWER.json (today)."""
    inline = any(
        isinstance(raw, dict) and (raw.get("answer") or raw.get("correct")) for raw in content.values()
    )
    return inline or any(str(qid) in shipped for qid in content)


class VideoBench(Benchmark):
    kind = "video_bench"
    # Step 2 maps every output to a letter with the judge: without one nothing can be scored.
    requires_judge = True

    def __init__(self, *, lenient_letters: bool = False) -> None:
        # evaluator.lenient_letter_replies: the rule_letter reading in the "(lenient)" column.
        self.lenient_letters = lenient_letters

    def for_settings(self, settings: EvaluatorSettings) -> VideoBench:
        if settings.lenient_letter_replies == self.lenient_letters:
            return self
        return VideoBench(lenient_letters=settings.lenient_letter_replies)

    def load(self, data: Location, videos: Location | None, *, max_items: int) -> LoadedBenchmark:
        loaded = LoadedBenchmark()
        qa_dir = posixpath.dirname(data.base) if data.base.endswith(".json") else data.base
        source = videos.source if videos else data.source
        bases = [videos.base] if videos else [source.parent(qa_dir), qa_dir]
        keys = json_files(data)
        answers, answer_file = self._answer_file(data, qa_dir, keys, loaded)
        qa_keys = [k for k in keys if posixpath.basename(k) != ANSWER_NAME]
        stems = {posixpath.basename(k) for k in qa_keys}
        for key in qa_keys:
            name = dataset_name(key)
            base = posixpath.basename(key)
            if base.endswith("_QA.json") and base[: -len("_QA.json")] + "_QA_new.json" in stems:
                loaded.errors.append(
                    ItemError(name, key, f"skipped: legacy file; Video-Bench reads {name}_QA_new.json")
                )
                continue
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
            file_answers = answers.get(name, {})
            if content and not _has_answers(content, file_answers):
                loaded.errors.append(
                    ItemError(
                        name,
                        key,
                        f"{base} has no answers: today's public Eval_QA files carry none; put the "
                        f"leaderboard's {ANSWER_NAME} ({{dataset: {{qid: {{'answer': letter}}}}}}) under the "
                        f"data prefix or beside Eval_QA, as {', '.join(ANSWER_PLACES)}, or use the 2023 "
                        "release's files (with 'answer')"
                        + (f"; {answer_file} has no {name!r} entry for them" if answer_file else ""),
                    )
                )
                continue
            loaded.files.append(key)
            for qid, raw in content.items():
                item_id = f"{name}/{qid}"
                try:
                    fields, vid_path = self._fields(raw, file_answers.get(str(qid)), answer_file)
                except ValueError as exc:
                    loaded.errors.append(ItemError(name, item_id, str(exc)))
                    continue
                visual = resolve_visual(source, [source.join(b, vid_path) for b in bases])
                if visual is None:
                    loaded.errors.append(ItemError(name, item_id, f"video {vid_path[:200]!r} not found"))
                    continue
                loaded.items.append(Item(self.kind, name, item_id, visual, fields))
        loaded.items = cap_per_task(loaded.items, max_items)
        return loaded

    @staticmethod
    def _answer_file(
        data: Location, qa_dir: str, keys: list[str], loaded: LoadedBenchmark
    ) -> tuple[dict[str, dict], str | None]:
        """Today's answers (the leaderboard's ``{dataset: {qid: {"answer": letter}}}``) and the file they
        came from: the first of an ``ANSWER.json`` under the data prefix, then ``ANSWER_PLACES`` beside
        the Eval_QA folder and in its parent. A dataset whose entry is not a ``{qid: ...}`` object is an
        error naming the file (its items then have no answer from it)."""
        source = data.source
        listed = sorted(k for k in keys if posixpath.basename(k) == ANSWER_NAME)
        beside = [source.join(d, rel) for d in (qa_dir, source.parent(qa_dir)) for rel in ANSWER_PLACES]
        for key in dict.fromkeys(listed + beside):
            if not source.exists(key):
                continue
            try:
                content = read_json(data, key)
            except (ValueError, UnicodeDecodeError) as exc:
                loaded.errors.append(ItemError("answers", key, f"not valid JSON: {exc}"))
                return {}, key
            if not isinstance(content, dict):
                loaded.errors.append(
                    ItemError("answers", key, "expected {dataset: {qid: {'answer': letter}}}")
                )
                return {}, key
            answers = {}
            for dataset, entries in content.items():
                if isinstance(entries, dict):
                    answers[str(dataset)] = {str(qid): value for qid, value in entries.items()}
                else:
                    loaded.errors.append(
                        ItemError(str(dataset), key, f"{dataset!r} is not {{qid: {{'answer': letter}}}}")
                    )
            return answers, key
        return {}, None

    @staticmethod
    def _fields(raw: object, shipped: object, answer_file: str | None) -> tuple[dict, str]:
        if not isinstance(raw, dict):
            raise ValueError("item is not an object")
        choices, question, vid_path = raw.get("choices"), raw.get("question"), raw.get("vid_path")
        if not isinstance(choices, dict) or not choices:
            raise ValueError("empty candidate list")
        choices = {str(k).strip(): str(v) for k, v in choices.items()}
        # Step 1 reads item['choices']['A'] ... in order; other keys raise there and the item is dropped.
        if sorted(choices) != list(LETTERS[: len(choices)]):
            raise ValueError(f"choice keys must be A.., got {sorted(choices)[:6]}")
        if not isinstance(question, str) or not question.strip():
            raise ValueError("missing question")
        if not isinstance(vid_path, str) or not vid_path:
            raise ValueError("missing vid_path")
        if shipped is not None:
            # The Space reads ANSWER[dataset][qid]['answer']: anything else there fails its lookup.
            if not isinstance(shipped, dict) or shipped.get("answer") is None:
                raise ValueError(
                    f"{answer_file}: expected {{'answer': letter}} for this qid, got {str(shipped)[:60]!r}"
                )
            answer = shipped["answer"]
        else:
            answer = raw.get("answer") or raw.get("correct")
        if answer is None:
            raise ValueError("missing answer")
        answer = str(answer).strip()
        if answer not in choices:
            by_text = {v.strip(): k for k, v in choices.items()}
            if answer not in by_text:
                raise ValueError(f"answer {answer[:40]!r} is neither a choice letter nor a choice's text")
            answer = by_text[answer]
        return {"question": question, "choices": choices, "answer": answer}, vid_path

    def answer(self, item: Item, asker: Asker) -> dict:
        return {"output": asker.answer(videobench_prompt(item.data["question"], item.data["choices"]))}

    def grade(self, item: Item, answers: dict, judge: Judge | None) -> Graded:
        choices, output, gt = item.data["choices"], answers["output"], item.data["answer"]
        detail: dict = {"output": output, "gt": gt, "matched_by": "none"}
        letter = forgiven = None
        judge_calls = 0
        if judge is not None:  # always, through Evaluate (requires_judge); direct callers may pass none
            # Step 2: every output, as it is; the judge sees the question exactly as the model was asked
            # it (Step 2's 'question').
            verdict = judge.map_choice(
                videobench_prompt(item.data["question"], choices), output, list(choices)
            )
            judge_calls = 1
            detail["judge"] = verdict.to_json()
            if verdict.value is not None:
                letter, detail["matched_by"] = verdict.value, "judge"
            forgiven = verdict.lenient_value
        detail["pred"] = letter
        # The separate "(lenient)" column, when a lenient reading is asked for: the letter rule_letter
        # reads (lenient_letter_replies), else the official letter, else what the forgiving reading of the
        # judge's reply found (lenient_judge_replies).
        lenient = None
        if self.lenient_letters or (judge is not None and judge.lenient):
            rule = rule_letter(output, choices) if self.lenient_letters else None
            reading = rule or letter or forgiven
            detail["lenient_pred"] = reading
            if rule:
                detail["lenient_matched_by"] = "rule"
            lenient = reading == gt
        return Graded(
            item.task,
            correct=letter == gt,
            failures=int(letter is None),
            judge_calls=judge_calls,
            detail=detail,
            lenient=lenient,
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
                [Graded("overall", g.correct, failures=g.failures, lenient=g.lenient) for g in graded],
                overall=None,
            )
        return rows
