"""The evaluation report: one JSON document (every score, error and count) and a Markdown rendering of
it, side by side for all models with each model's difference to the first one (the baseline); and
writing them with the per-item lines (``reports/<name>/report.json``, ``report.md``, ``items.jsonl``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from dreamframe.storage.base import ObjectRef, ObjectStore

from .benchmarks.base import ScoreRow
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


def comparison(bench: BenchmarkRun, models: list[str]) -> list[dict]:
    """One row per task: each model's score and its difference to the first model's."""
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
        rows.append(
            {
                "task": task,
                "unit": units[task],
                "scores": scores,
                "delta": deltas,
                "items": items,
                "failures": failures,
            }
        )
    return rows


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
) -> dict:
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
                "scores": {m: [r.to_json() for r in rows] for m, rows in b.scores.items()},
                "item_errors": {m: [e.to_json() for e in errs] for m, errs in b.item_errors.items()},
                "judge_calls": b.judge_calls,
                "comparison": comparison(b, model_names) if b.kind != "style_consistency" else [],
                **({"extra": b.extra} if b.extra else {}),
            }
        )
        for m, rows in b.scores.items():
            for r in rows:
                flat.append({"model": m, "benchmark": b.name, **r.to_json()})
    return {
        "format": REPORT_FORMAT,
        "report_name": report_name,
        "job_id": job_id,
        "created_at": created_at,
        "duration_seconds": round(duration_seconds, 3),
        "baseline": names[0] if names else None,
        "models": [m.__dict__ for m in models],
        "judge": judge,
        "cache": cache,
        "benchmarks": out_benchmarks,
        "scores": flat,
    }


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def render_markdown(report: dict) -> str:
    names = [m["name"] for m in report["models"]]
    out = [f"# Evaluation report: {report['report_name']}", ""]
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
            header = (
                ["task"] + [f"{m}" for m in names] + [f"Δ {m}" for m in names[1:]] + ["items", "failures"]
            )
            rows = []
            for row in b["comparison"]:
                unit = row["unit"]
                rows.append(
                    [row["task"]]
                    + [fmt(row["scores"][m], unit) for m in names]
                    + [fmt_delta(row["delta"][m], unit) for m in names[1:]]
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
    """items.jsonl, report.json and report.md under ``prefix`` (in that order), each atomically."""
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
