"""Accuracy by subject and category, the README table, the bar chart and the C-Eval submission file.

Averages follow C-Eval's convention: a category's score is the mean of its
subjects' accuracies and "Average" is the mean over all subjects; the
question-weighted figures (lm-evaluation-harness's convention) are kept beside
them, labelled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from cutegpt.evaluation.data import Benchmark


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _group(subjects: dict[str, dict[str, Any]], names: list[str]) -> dict[str, Any]:
    accs = [subjects[s]["accuracy"] for s in names if s in subjects]
    correct = sum(subjects[s]["correct"] for s in names if s in subjects)
    total = sum(subjects[s]["total"] for s in names if s in subjects)
    return {
        "mean_of_subjects": _mean(accs),
        "question_weighted": 100.0 * correct / total if total else None,
        "subjects": len(accs),
        "questions": total,
    }


def aggregate(bench: Benchmark, records: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """records: subject -> per-question records with `correct` (bool) and `rank`."""
    subjects: dict[str, dict[str, Any]] = {}
    for name, recs in records.items():
        if not recs:
            continue
        sub = bench.subjects[name]
        correct = sum(1 for r in recs if r["correct"])
        subjects[name] = {
            "zh": sub.zh,
            "en": sub.en,
            "categories": sub.categories,
            "correct": correct,
            "total": len(recs),
            "accuracy": 100.0 * correct / len(recs),
            "mrr": sum(1.0 / r["rank"] for r in recs) / len(recs),
        }
    categories = {
        cat: _group(subjects, [s for s, info in subjects.items() if cat in info["categories"]])
        for cat in bench.categories
    }
    out: dict[str, Any] = {
        "subjects": subjects,
        "categories": {c: v for c, v in categories.items() if v["subjects"]},
        "average": _group(subjects, list(subjects)),
    }
    all_recs = [r for recs in records.values() for r in recs]
    out["average"]["mrr"] = sum(1.0 / r["rank"] for r in all_recs) / len(all_recs) if all_recs else None
    if bench.hard:
        hard = _group(subjects, bench.hard)
        if hard["subjects"]:
            out["hard"] = hard
    return out


def table(bench: Benchmark, summary: dict[str, Any], setting: str, key: str = "mean_of_subjects") -> str:
    """The original README's table: categories | Average | Hard (C-Eval)."""
    cols = [c for c in bench.categories if c in summary["categories"]]
    head = ["setting"] + cols + ["Average"] + (["Hard"] if "hard" in summary else [])
    vals = [summary["categories"][c][key] for c in cols] + [summary["average"][key]]
    if "hard" in summary:
        vals.append(summary["hard"][key])
    cells = [setting] + [f"{v:.1f}" if v is not None else "-" for v in vals]
    return "\n".join([
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
        "| " + " | ".join(cells) + " |",
    ])


def subject_table(summary: dict[str, Any]) -> str:
    lines = ["| subject | 科目 | questions | accuracy |", "|---|---|---|---|"]
    for name, s in sorted(summary["subjects"].items()):
        lines.append(f"| {name} | {s['zh']} | {s['total']} | {s['accuracy']:.1f} |")
    return "\n".join(lines)


def bar_chart(bench: Benchmark, summary: dict[str, Any], title: str, path: Path) -> None:
    """Accuracy by category (mean of subjects), with the 25% chance line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    names = [c for c in bench.categories if c in summary["categories"]] + ["Average"]
    values = [summary["categories"][c]["mean_of_subjects"] for c in names[:-1]] + [summary["average"]["mean_of_subjects"]]
    if "hard" in summary:
        names.append("Hard")
        values.append(summary["hard"]["mean_of_subjects"])
    labels = names
    if any(ord(ch) > 127 for n in names for ch in n):  # XieZhi disciplines: English labels unless a CJK font exists
        cjk = [f.name for f in font_manager.fontManager.ttflist if "CJK" in f.name or "Hei" in f.name]
        if cjk:
            plt.rcParams["font.family"] = cjk[0]
        else:
            labels = [bench.subjects[n].en if n in bench.subjects else n for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(names) + 2), 4))
    bars = ax.bar(labels, values, color=["#4C72B0"] * (len(names) - (2 if "hard" in summary else 1)) +
                  ["#DD8452"] + (["#C44E52"] if "hard" in summary else []))
    ax.axhline(25.0, color="grey", linestyle="--", linewidth=1, label="chance (4 options)")
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, v + 0.5, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, max(100.0 if max(values) > 60 else 60.0, max(values) + 5))
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=30 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def submission(records: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, str]]:
    """The official C-Eval submission shape: {subject: {question id: letter}}."""
    return {subject: {str(r["id"]): r["pred"] for r in recs} for subject, recs in sorted(records.items())}
