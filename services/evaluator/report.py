"""The evaluation report: one JSON document (every score, error and count) and a Markdown rendering of
it, side by side for all models with each model's difference to the first one (the baseline); and
writing them with the per-item lines (``reports/<name>/report.json``, ``report.md``, ``items.jsonl``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from dreamframe.storage.base import ObjectRef, ObjectStore

from .benchmarks.base import LENIENT_SCORE, ScoreRow
from .items import ItemError

REPORT_FORMAT = "dreamframe-eval-report/1"
# The score a benchmark is usually quoted by (the paper's table).
HEADLINE = {
    "mvbench": "overall",
    "dreamframe_mc": "overall",
    "tempcompass": "overall",
    "video_bench": "final",
    "video_chatgpt": "mean",
    "style_consistency": "gap",
}
MAX_ERRORS_IN_MARKDOWN = 20
# The randomly initialised presets (dreamframe.models.video_llm.TINY, the tiny image encoder, a plot-llm
# "tiny" judge): what tests and `make run` use, whose scores say nothing about a method.
RANDOM_PRESETS = ("tiny",)
MAX_CONFIG_BYTES = 1 << 20


@dataclass
class ModelRun:
    name: str
    identity: str
    source: dict
    num_frames: int
    error: str | None = None
    model_calls: int = 0
    answers_cached: int = 0


@dataclass
class BenchmarkRun:
    name: str
    kind: str
    data_prefix: str
    video_prefix: str
    files: list[str] = field(default_factory=list)
    items: int = 0
    load_errors: list[ItemError] = field(default_factory=list)
    # model name → rows / per-item errors (style consistency: one entry under "")
    scores: dict[str, list[ScoreRow]] = field(default_factory=dict)
    item_errors: dict[str, list[ItemError]] = field(default_factory=dict)
    judge_calls: dict[str, int] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def headline(self) -> str:
        return HEADLINE.get(self.kind, "overall")


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    return f"{value:.4f}" if unit == "cosine" else f"{value:.2f}"


def fmt_delta(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    return f"{value:+.4f}" if unit == "cosine" else f"{value:+.2f}"


def comparison(bench: BenchmarkRun, models: list[str], *, lenient: bool = False) -> list[dict]:
    """One row per task: each model's score and its difference to the first model's (and, with
    ``lenient``, each model's lenient-reading score where the benchmark has one)."""
    tasks: list[str] = []
    units: dict[str, str] = {}
    by_model = {m: {r.task: r for r in bench.scores.get(m, [])} for m in models}
    for m in models:
        for r in bench.scores.get(m, []):
            if r.task not in units:
                tasks.append(r.task)
                units[r.task] = r.unit
    rows = []
    base = models[0] if models else None
    for task in tasks:
        scores = {m: (by_model[m][task].score if task in by_model[m] else None) for m in models}
        base_score = scores.get(base) if base else None
        deltas = {
            m: (scores[m] - base_score if scores[m] is not None and base_score is not None else None)
            for m in models[1:]
        }
        items = {m: (by_model[m][task].items if task in by_model[m] else 0) for m in models}
        failures = {m: (by_model[m][task].failures if task in by_model[m] else 0) for m in models}
        row = {
            "task": task,
            "unit": units[task],
            "scores": scores,
            "delta": deltas,
            "items": items,
            "failures": failures,
        }
        if lenient:
            row["lenient"] = {
                m: (by_model[m][task].extra.get(LENIENT_SCORE) if task in by_model[m] else None)
                for m in models
            }
        rows.append(row)
    return rows


def _random_checkpoint(config: object) -> bool:
    """A checkpoint whose config.json is the tiny preset's architecture (fine-tuning it keeps it tiny)."""
    from dreamframe.models.video_llm import TINY_IMAGE_SIZE, TINY_PATCH_SIZE

    if not isinstance(config, dict):
        return False
    vision = config.get("vision_config") or {}
    return (
        isinstance(vision, dict)
        and vision.get("image_size") == TINY_IMAGE_SIZE
        and vision.get("patch_size") == TINY_PATCH_SIZE
    )


def weights_notice(report: dict, store: ObjectStore | None = None) -> list[str]:
    """Lines for the top of the report naming what runs on random weights: a model from the tiny preset
    (or a checkpoint with the tiny preset's architecture, when ``store`` can show its config.json), a
    tiny judge, the tiny image encoder. Empty when nothing does."""
    random_models = []
    for m in report.get("models", []):
        source = m.get("source") or {}
        tiny = source.get("preset") in RANDOM_PRESETS or str(m.get("identity", "")).startswith(
            tuple(f"preset:{p}:" for p in RANDOM_PRESETS)
        )
        prefix = source.get("checkpoint_prefix")
        if not tiny and prefix and store is not None:
            key = prefix.rstrip("/") + "/config.json"
            try:
                # A model config is a few kB; anything far larger is not one (bounded cost).
                tiny = store.stat(key).size <= MAX_CONFIG_BYTES and _random_checkpoint(store.get_json(key))
            except Exception:  # noqa: BLE001 - no readable config: nothing to say about it
                tiny = False
        if tiny:
            random_models.append(m["name"])
    lines = []
    if random_models:
        names = ", ".join(f"**{n}**" for n in random_models)
        lines.append(
            f"Random weights: {names} {'is' if len(random_models) == 1 else 'are'} the tiny preset "
            "(randomly initialised, or fine-tuned from it): these scores mean nothing about the method, "
            "and equal scores of a base and a fine-tuned model are expected."
        )
    judge = report.get("judge") or {}
    if str(judge.get("model", "")) in RANDOM_PRESETS:
        lines.append(
            f"Random weights: the judge `{judge.get('identity')}` is a tiny preset; "
            "its verdicts mean nothing."
        )
    for b in report.get("benchmarks", []):
        encoder = (b.get("extra") or {}).get("image_encoder")
        if b.get("kind") == "style_consistency" and encoder in RANDOM_PRESETS:
            lines.append(
                f"Random weights: {b['name']} uses the tiny image encoder; its similarities mean nothing."
            )
    return lines


def build_report(
    *,
    report_name: str,
    job_id: str,
    created_at: str,
    duration_seconds: float,
    models: list[ModelRun],
    benchmarks: list[BenchmarkRun],
    judge: dict | None,
    cache: dict,
    options: dict[str, bool] | None = None,
) -> dict:
    """The report document. Scores are the benchmarks' official ones. ``options`` names the lenient
    readings asked for (``lenient_answer_matching``: MVBench-style multiple choice;
    ``lenient_judge_replies``: judge replies; ``lenient_letter_replies``: Video-Bench letter-only replies
    without the judge); with any of them on, each benchmark's lenient score is
    reported as its own column, never instead of the official score."""
    options = dict(options or {})
    lenient = any(options.values())
    names = [m.name for m in models]
    out_benchmarks = []
    flat = []
    for b in benchmarks:
        model_names = names if b.kind != "style_consistency" else [""]
        out_benchmarks.append(
            {
                "name": b.name,
                "kind": b.kind,
                "data_prefix": b.data_prefix,
                "video_prefix": b.video_prefix,
                "headline": b.headline,
                "files": b.files,
                "items": b.items,
                "load_errors": [e.to_json() for e in b.load_errors],
                "scores": {m: [_row_json(r, lenient) for r in rows] for m, rows in b.scores.items()},
                "item_errors": {m: [e.to_json() for e in errs] for m, errs in b.item_errors.items()},
                "judge_calls": b.judge_calls,
                "comparison": (
                    comparison(b, model_names, lenient=lenient) if b.kind != "style_consistency" else []
                ),
                **({"extra": b.extra} if b.extra else {}),
            }
        )
        for m, rows in b.scores.items():
            for r in rows:
                flat.append({"model": m, "benchmark": b.name, **_row_json(r, lenient)})
    report = {
        "format": REPORT_FORMAT,
        "report_name": report_name,
        "job_id": job_id,
        "created_at": created_at,
        "duration_seconds": round(duration_seconds, 3),
        "baseline": names[0] if names else None,
        "models": [m.__dict__ for m in models],
        "judge": judge,
        "cache": cache,
        "options": options,
        "benchmarks": out_benchmarks,
        "scores": flat,
    }
    report["notice"] = weights_notice(report)
    return report


def _row_json(row: ScoreRow, lenient: bool) -> dict:
    out = row.to_json()
    if not lenient and LENIENT_SCORE in out.get("extra", {}):
        # The option is off: the lenient reading is not reported at all.
        out["extra"] = {k: v for k, v in out["extra"].items() if k != LENIENT_SCORE}
    return out


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def render_markdown(report: dict) -> str:
    names = [m["name"] for m in report["models"]]
    out = [f"# Evaluation report: {report['report_name']}", ""]
    # First thing a reader sees: scores from random weights are no result.
    for line in report.get("notice", []):
        out += [f"> **{line}**", ""]
    lenient = any((report.get("options") or {}).values())
    if report.get("job_id"):
        out.append(f"Job `{report['job_id']}`, ")
    out.append(f"created {report['created_at']} in {report['duration_seconds']:.1f} s.")
    out.append("")
    if names:
        out += ["## Models", ""]
        out += _table(
            ["model", "source", "frames", "model calls", "cached answers", "status"],
            [
                [
                    m["name"],
                    f"`{m['identity']}`",
                    str(m["num_frames"]),
                    str(m["model_calls"]),
                    str(m["answers_cached"]),
                    m["error"] or "ok",
                ]
                for m in report["models"]
            ],
        )
        out.append("")
        if len(names) > 1:
            out.append(f"Differences (Δ) are against the baseline, **{names[0]}**.")
            out.append("")
    judge = report.get("judge")
    out.append(
        f"Judge: `{judge['identity']}` ({judge['calls']} calls)."
        if judge
        else "Judge: none (rule-based matching only)."
    )
    out.append("")
    summary = [
        [b["name"], b["kind"], b["headline"]]
        + [
            next(
                (fmt(r["score"], r["unit"]) for r in b["scores"].get(m, []) if r["task"] == b["headline"]),
                "–",
            )
            for m in names
        ]
        for b in report["benchmarks"]
        if b["kind"] != "style_consistency"
    ]
    if summary and names:
        out += ["## Summary", ""]
        out += _table(["benchmark", "format", "score"] + names, summary)
        out.append("")
    for b in report["benchmarks"]:
        out += [f"## {b['name']} ({b['kind']})", ""]
        if b["kind"] == "style_consistency":
            stories = b.get("extra", {}).get("stories", [])
            encoder = b.get("extra", {}).get("image_encoder", "")
            out.append(f"{b['items']} keyframes of {len(stories)} stories, image encoder `{encoder}`.")
        else:
            files, bad = len(b["files"]), len(b["load_errors"])
            out.append(f"{b['items']} items from {files} file(s); {bad} could not be loaded.")
        out.append("")
        if b["kind"] == "style_consistency":
            rows = b["scores"].get("", [])
            out += _table(
                ["measure", "mean cosine similarity", "frames"],
                [[r["task"], fmt(r["score"], r["unit"]), str(r["items"])] for r in rows],
            )
        else:
            show_lenient = lenient and any("lenient" in row for row in b["comparison"])
            header = (
                ["task"]
                + [f"{m}" for m in names]
                + [f"Δ {m}" for m in names[1:]]
                + ([f"{m} (lenient)" for m in names] if show_lenient else [])
                + ["items", "failures"]
            )
            rows = []
            for row in b["comparison"]:
                unit = row["unit"]
                rows.append(
                    [row["task"]]
                    + [fmt(row["scores"][m], unit) for m in names]
                    + [fmt_delta(row["delta"][m], unit) for m in names[1:]]
                    + ([fmt(row.get("lenient", {}).get(m), unit) for m in names] if show_lenient else [])
                    + [
                        " / ".join(str(row["items"][m]) for m in names),
                        " / ".join(str(row["failures"][m]) for m in names),
                    ]
                )
            out += _table(header, rows)
            out.append("")
            out.append(
                "Accuracy in %; judge scores 0–5. Failures: answers or judgments that could not be read "
                "(graded wrong / left out of the mean, never dropped silently)."
            )
            if show_lenient:
                out.append(
                    'Scores are the benchmark\'s official scoring; "(lenient)" columns read answers '
                    'more forgivingly (MVBench-style multiple choice: "Option B", "Best option: (B)", '
                    "an option's exact text; judge replies the official parser rejects; Video-Bench "
                    "replies that are only a letter, read without the judge), for comparison "
                    f"only ({', '.join(k for k, v in report['options'].items() if v)})."
                )
        errors = [(None, e) for e in b["load_errors"]] + [
            (m, e) for m, errs in b["item_errors"].items() for e in errs
        ]
        if errors:
            out += ["", f"Items not evaluated ({len(errors)}):", ""]
            for m, e in errors[:MAX_ERRORS_IN_MARKDOWN]:
                who = f" [{m}]" if m else ""
                out.append(f"- `{e['item_id']}`{who}: {e['reason']}")
            if len(errors) > MAX_ERRORS_IN_MARKDOWN:
                out.append(f"- … and {len(errors) - MAX_ERRORS_IN_MARKDOWN} more (see report.json)")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


@dataclass(frozen=True)
class ReportRefs:
    items_jsonl: ObjectRef
    report_json: ObjectRef
    report_markdown: ObjectRef


def write_report(store: ObjectStore, prefix: str, report: dict, item_lines: list[dict]) -> ReportRefs:
    """items.jsonl, report.json and report.md under ``prefix`` (in that order), each atomically. The
    random-weights notice is completed here, where checkpoints' configs can be read."""
    report["notice"] = weights_notice(report, store)
    items_ref = store.put_bytes(
        f"{prefix}items.jsonl",
        "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in item_lines).encode(),
        content_type="application/x-ndjson",
    )
    json_ref = store.put_json(f"{prefix}report.json", report)
    md_ref = store.put_bytes(
        f"{prefix}report.md", render_markdown(report).encode(), content_type="text/markdown"
    )
    return ReportRefs(items_ref, json_ref, md_ref)
