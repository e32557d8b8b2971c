"""Accuracy by subject and category, the README table, the bar chart and the C-Eval submission file.

Averages follow C-Eval's convention: a category's score is the mean of its
subjects' accuracies and "Average" is the mean over all subjects; the
question-weighted figures (lm-evaluation-harness's convention) are kept beside
them, labelled.

Every accuracy comes with its question count and a 95% Wilson score interval
(`wilson`), and `compare_accuracy` says whether two runs differ by more than
sampling noise (two-proportion z-test, or Fisher's exact test when a count is small).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from cutegpt.evaluation.data import Benchmark

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(correct: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion correct/n, in percent; (0, 100) when n == 0.

    `correct` may be fractional (a mean of subject accuracies times n): the interval is then
    that of a proportion with the same value over n questions, an approximation.
    """
    if n <= 0:
        return (0.0, 100.0)
    p = correct / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if correct <= 0 else 100.0 * max(0.0, center - half)
    hi = 100.0 if correct >= n else 100.0 * min(1.0, center + half)
    return (lo, hi)


def fmt_acc(acc: float | None, n: int) -> str:
    """'62.5% (n=8, 95% CI 30.6–86.3)'."""
    if acc is None or n == 0:
        return "-"
    lo, hi = wilson(acc / 100.0 * n, n)
    return f"{acc:.1f}% (n={n}, 95% CI {lo:.1f}–{hi:.1f})"


def _fisher_two_sided(a: int, n1: int, b: int, n2: int) -> float:
    """Fisher's exact test on [[a, n1-a], [b, n2-b]], two-sided (sum of tables no more likely)."""
    k = a + b
    total = math.comb(n1 + n2, k)

    def prob(x: int) -> float:
        return math.comb(n1, x) * math.comb(n2, k - x) / total

    p_obs = prob(a)
    lo, hi = max(0, k - n2), min(k, n1)
    return min(1.0, sum(prob(x) for x in range(lo, hi + 1) if prob(x) <= p_obs * (1 + 1e-9)))


def two_proportion_test(a_correct: int, a_n: int, b_correct: int, b_n: int) -> tuple[float, str]:
    """Two-sided p-value that the two accuracies are equal, and the test used.

    Pooled two-proportion z-test; Fisher's exact test when an expected cell count is below 5
    (the z-test's normal approximation is poor there).
    """
    pooled = (a_correct + b_correct) / (a_n + b_n)
    expected = [a_n * pooled, a_n * (1 - pooled), b_n * pooled, b_n * (1 - pooled)]
    if min(expected) < 5:
        return _fisher_two_sided(a_correct, a_n, b_correct, b_n), "Fisher's exact test"
    se = math.sqrt(pooled * (1 - pooled) * (1 / a_n + 1 / b_n))
    z = (a_correct / a_n - b_correct / b_n) / se if se > 0 else 0.0
    return math.erfc(abs(z) / math.sqrt(2)), "two-proportion z-test"


def compare_accuracy(a_correct: int, a_n: int, b_correct: int, b_n: int, *,
                     a_label: str = "A", b_label: str = "B", alpha: float = 0.05) -> str:
    """One line comparing two runs' accuracies: both with n and 95% Wilson intervals, the
    difference, the test's p-value, and whether it is distinguishable from noise at `alpha`.

    Counts, not percentages: `compare_accuracy(19, 120, 39, 120, a_label="tuned", b_label="base")`.
    """
    for name, c, n in ((a_label, a_correct, a_n), (b_label, b_correct, b_n)):
        if n <= 0 or not 0 <= c <= n:
            raise ValueError(f"{name}: {c} correct out of {n} questions is not a valid count")
    a_acc, b_acc = 100.0 * a_correct / a_n, 100.0 * b_correct / b_n
    p, test = two_proportion_test(a_correct, a_n, b_correct, b_n)
    verdict = ("distinguishable from noise" if p < alpha else "NOT distinguishable from noise")
    return (f"{a_label} {fmt_acc(a_acc, a_n)} vs {b_label} {fmt_acc(b_acc, b_n)}: "
            f"difference {a_acc - b_acc:+.1f} points, {test} p = {p:.3g}, {verdict} at the {100 * alpha:g}% level")


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _group(subjects: dict[str, dict[str, Any]], names: list[str]) -> dict[str, Any]:
    accs = [subjects[s]["accuracy"] for s in names if s in subjects]
    correct = sum(subjects[s]["correct"] for s in names if s in subjects)
    total = sum(subjects[s]["total"] for s in names if s in subjects)
    mean = _mean(accs)
    return {
        "mean_of_subjects": mean,
        "mean_of_subjects_ci95": list(wilson(mean / 100.0 * total, total)) if mean is not None else None,
        "question_weighted": 100.0 * correct / total if total else None,
        "question_weighted_ci95": list(wilson(correct, total)) if total else None,
        "subjects": len(accs),
        "questions": total,
        "correct": correct,
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
            "ci95": list(wilson(correct, len(recs))),
        }
        if bench.name == "xiezhi":  # XieZhi's published metric; not part of the other benchmarks' protocols
            subjects[name]["mrr"] = sum(1.0 / r["rank"] for r in recs) / len(recs)
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
    if bench.name == "xiezhi":
        out["average"]["mrr"] = sum(1.0 / r["rank"] for r in all_recs) / len(all_recs) if all_recs else None
    if bench.hard:
        hard = _group(subjects, bench.hard)
        if hard["subjects"]:
            out["hard"] = hard
    return out


def _cells(summary: dict[str, Any], cols: list[str], key: str) -> list[dict[str, Any]]:
    groups = [summary["categories"][c] for c in cols] + [summary["average"]]
    if "hard" in summary:
        groups.append(summary["hard"])
    return groups


def table(bench: Benchmark, summary: dict[str, Any], setting: str, key: str = "mean_of_subjects") -> str:
    """The original README's table: categories | Average | Hard (C-Eval), with the question
    count and the 95% Wilson interval of every column under it."""
    cols = [c for c in bench.categories if c in summary["categories"]]
    head = ["setting"] + cols + ["Average"] + (["Hard"] if "hard" in summary else [])
    groups = _cells(summary, cols, key)
    cells = [setting] + [f"{g[key]:.1f}" if g[key] is not None else "-" for g in groups]
    counts = ["questions"] + [str(g["questions"]) for g in groups]
    cis = ["95% CI"]
    for g in groups:
        lo, hi = wilson(g[key] / 100.0 * g["questions"], g["questions"]) if g[key] is not None else (0.0, 100.0)
        cis.append(f"{lo:.1f}–{hi:.1f}")
    return "\n".join([
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
        "| " + " | ".join(cells) + " |",
        "| " + " | ".join(counts) + " |",
        "| " + " | ".join(cis) + " |",
    ])


def subject_table(summary: dict[str, Any]) -> str:
    lines = ["| subject | 科目 | questions | accuracy | 95% CI |", "|---|---|---|---|---|"]
    for name, s in sorted(summary["subjects"].items()):
        lo, hi = wilson(s["correct"], s["total"])
        lines.append(f"| {name} | {s['zh']} | {s['total']} | {s['accuracy']:.1f} | {lo:.1f}–{hi:.1f} |")
    return "\n".join(lines)


def bar_chart(bench: Benchmark, summary: dict[str, Any], title: str, path: Path) -> None:
    """Accuracy by category (mean of subjects) with 95% Wilson intervals, the question count
    under every bar, and the 25% chance line."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    names = [c for c in bench.categories if c in summary["categories"]] + ["Average"]
    groups = [summary["categories"][c] for c in names[:-1]] + [summary["average"]]
    if "hard" in summary:
        names.append("Hard")
        groups.append(summary["hard"])
    values = [g["mean_of_subjects"] for g in groups]
    counts = [g["questions"] for g in groups]
    labels = names
    if any(ord(ch) > 127 for n in names for ch in n):  # XieZhi disciplines: English labels unless a CJK font exists
        cjk = [f.name for f in font_manager.fontManager.ttflist if "CJK" in f.name or "Hei" in f.name]
        if cjk:
            plt.rcParams["font.family"] = cjk[0]
        else:
            labels = [bench.subjects[n].en if n in bench.subjects else n for n in names]
    # Wrapped names (one word a line) with the question count under each: no two labels can touch.
    labels = ["\n".join(textwrap.wrap(lab, 10) or [lab]) + f"\nn={n}" for lab, n in zip(labels, counts)]
    cis = [wilson(v / 100.0 * n, n) for v, n in zip(values, counts)]
    yerr = [[v - lo for v, (lo, _hi) in zip(values, cis)], [hi - v for v, (_lo, hi) in zip(values, cis)]]
    fig, ax = plt.subplots(figsize=(max(6.5, 1.25 * len(names) + 1.5), 4.8))
    colors = ["#4C72B0"] * (len(names) - (2 if "hard" in summary else 1)) + ["#DD8452"] + (["#C44E52"] if "hard" in summary else [])
    x = list(range(len(names)))
    ax.bar(x, values, color=colors, yerr=yerr, capsize=4, ecolor="#333333", error_kw={"linewidth": 1})
    ax.axhline(25.0, color="grey", linestyle="--", linewidth=1, label="chance (4 options)")
    for xi, v, (_lo, hi) in zip(x, values, cis):
        ax.text(xi, hi + 1.0, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("accuracy (%), bars: 95% Wilson interval")
    ax.set_ylim(0, 105 if max(hi for _lo, hi in cis) > 55 else 65)
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def submission(records: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, str]]:
    """The official C-Eval submission shape: {subject: {question id: letter}}."""
    return {subject: {str(r["id"]): r["pred"] for r in recs} for subject, recs in sorted(records.items())}


# --------------------------------------------------------------------------- several models


def models_table(bench: Benchmark, summaries: list[tuple[str, dict[str, Any]]],
                 key: str = "mean_of_subjects") -> tuple[str, list[dict[str, Any]]]:
    """One row per model (categories | Average | Hard, each with its 95% interval), the difference of its
    Average to the first model's, and `compare_accuracy` on the question-weighted counts.

    Returns the Markdown text (the table, then one comparison line per later model) and the rows as data.
    """
    first = summaries[0][1]
    cols = [c for c in bench.categories if c in first["categories"]]
    hard = all("hard" in s for _l, s in summaries)
    head = ["model"] + cols + ["Average"] + (["Hard"] if hard else []) + ["Δ Average", "questions"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    base_avg = first["average"]
    for label, s in summaries:
        groups = [s["categories"].get(c) for c in cols] + [s["average"]] + ([s["hard"]] if hard else [])
        cells = [label]
        for g in groups:
            if g is None or g[key] is None:
                cells.append("-")
                continue
            lo, hi = wilson(g[key] / 100.0 * g["questions"], g["questions"])
            cells.append(f"{g[key]:.1f} ({lo:.1f}–{hi:.1f})")
        avg = s["average"]
        row: dict[str, Any] = {"model": label, "average": avg[key], "ci95": list(wilson(avg[key] / 100.0 * avg["questions"], avg["questions"])),
                               "question_weighted": avg["question_weighted"], "correct": avg["correct"], "questions": avg["questions"]}
        if s is first:
            cells.append("(reference)")
        else:
            diff = avg[key] - base_avg[key]
            p, test = two_proportion_test(avg["correct"], avg["questions"], base_avg["correct"], base_avg["questions"])
            row.update(difference=diff, p_value=p, test=test)
            cells.append(f"{diff:+.1f}")
            notes.append(compare_accuracy(avg["correct"], avg["questions"], base_avg["correct"], base_avg["questions"],
                                          a_label=label, b_label=summaries[0][0]))
        cells.append(str(avg["questions"]))
        lines.append("| " + " | ".join(cells) + " |")
        rows.append(row)
    text = "\n".join(lines)
    text += ("\n\n(categories, Average, Hard: mean of subject accuracies with 95% Wilson intervals; the comparisons below "
             "use question-weighted counts)")
    if notes:
        text += "\n" + "\n".join("- " + n for n in notes)
    return text, rows


def agreement(a: dict[str, list[dict[str, Any]]], b: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """How often two runs over the same questions predict the same letter."""
    pairs = [(x["pred"], y["pred"]) for s in a if s in b for x, y in zip(a[s], b[s])]
    same = sum(1 for x, y in pairs if x == y)
    return {"same": same, "questions": len(pairs), "share": same / len(pairs) if pairs else None}


def models_chart(bench: Benchmark, summaries: list[tuple[str, dict[str, Any]]], title: str, path: Path) -> None:
    """Accuracy by category for several models side by side, 95% Wilson intervals, the chance line."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = summaries[0][1]
    names = [c for c in bench.categories if c in first["categories"]]
    labels = [bench.subjects[n].en if n in bench.subjects else n for n in names] + ["Average"]
    width = 0.8 / len(summaries)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.4 * len(labels) + 2), 5.0))
    for k, (label, s) in enumerate(summaries):
        groups = [s["categories"][c] for c in names] + [s["average"]]
        values = [g["mean_of_subjects"] for g in groups]
        cis = [wilson(v / 100.0 * g["questions"], g["questions"]) for v, g in zip(values, groups)]
        yerr = [[v - lo for v, (lo, _h) in zip(values, cis)], [hi - v for v, (_l, hi) in zip(values, cis)]]
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(labels))]
        ax.bar(xs, values, width, yerr=yerr, capsize=3, label=textwrap.shorten(label, 60), error_kw={"linewidth": 1})
    ax.axhline(25.0, color="grey", linestyle="--", linewidth=1, label="chance (4 options)")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(["\n".join(textwrap.wrap(lab, 12)) for lab in labels], fontsize=8)
    ax.set_ylabel("accuracy (%), bars: 95% Wilson interval")
    ax.set_ylim(0, 105)
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=9)
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
