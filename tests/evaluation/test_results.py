"""Category averages (mean of subjects, question-weighted), Hard, table and submission shape."""

from __future__ import annotations

import pytest

from cutegpt.evaluation.data import Benchmark, Subject
from cutegpt.evaluation.results import aggregate, compare_accuracy, fmt_acc, submission, table, two_proportion_test, wilson


def _bench() -> Benchmark:
    subs = {
        "college_physics": Subject("college_physics", "大学物理", "College Physics", ["STEM"]),
        "computer_network": Subject("computer_network", "计算机网络", "Computer Network", ["STEM"]),
        "law": Subject("law", "法学", "Law", ["Humanities"]),
    }
    return Benchmark("ceval", "val", None, ["STEM", "Social Science", "Humanities", "Other"], subs,  # type: ignore[arg-type]
                     ["college_physics", "high_school_physics"], [])


def _recs(subject: str, outcomes: str) -> list[dict]:
    return [{"subject": subject, "id": str(i), "correct": c == "1", "rank": 1 if c == "1" else 2, "pred": "A"}
            for i, c in enumerate(outcomes)]


def test_category_averages_by_hand():
    records = {
        "college_physics": _recs("college_physics", "1000"),  # 1/4 = 25 %
        "computer_network": _recs("computer_network", "11"),  # 2/2 = 100 %
        "law": _recs("law", "10"),  # 1/2 = 50 %
    }
    s = aggregate(_bench(), records)
    assert s["subjects"]["college_physics"]["accuracy"] == 25.0
    stem = s["categories"]["STEM"]
    assert stem["mean_of_subjects"] == pytest.approx((25 + 100) / 2)  # 62.5, C-Eval's convention
    assert stem["question_weighted"] == pytest.approx(100 * 3 / 6)  # 50.0
    assert s["categories"]["Humanities"]["mean_of_subjects"] == 50.0
    assert "Social Science" not in s["categories"]
    assert s["average"]["mean_of_subjects"] == pytest.approx((25 + 100 + 50) / 3)
    assert s["average"]["question_weighted"] == pytest.approx(100 * 4 / 8)
    assert s["hard"]["mean_of_subjects"] == 25.0 and s["hard"]["subjects"] == 1
    assert "mrr" not in s["average"] and "mrr" not in s["subjects"]["law"]  # XieZhi's metric only
    assert s["subjects"]["law"]["ci95"] == pytest.approx(list(wilson(1, 2)))
    t = table(_bench(), s, "zero-shot")
    assert t.splitlines()[0] == "| setting | STEM | Humanities | Average | Hard |"
    assert t.splitlines()[2] == "| zero-shot | 62.5 | 50.0 | 58.3 | 25.0 |"
    assert t.splitlines()[3] == "| questions | 6 | 2 | 8 | 4 |"
    assert t.splitlines()[4].startswith("| 95% CI | ")


def test_wilson_by_hand():
    # 8 of 10, z = 1.96: centre (0.8 + 1.96²/20) / (1 + 1.96²/10) = 0.71674,
    # half-width 1.96·sqrt(0.8·0.2/10 + 1.96²/400) / 1.38415 = 0.22656  ->  [49.02, 94.33] %
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(49.016, abs=0.01) and hi == pytest.approx(94.331, abs=0.01)
    # 0 of 12: [0, 1.96²/12 / (1 + 1.96²/12)] = [0, 24.25] %
    lo, hi = wilson(0, 12)
    assert lo == 0.0 and hi == pytest.approx(24.25, abs=0.01)
    assert fmt_acc(80.0, 10) == "80.0% (n=10, 95% CI 49.0–94.3)"


def test_compare_accuracy_says_whether_it_is_noise():
    # the recipe's case: 12 questions cannot tell 1 of 12 from 4 of 12 (Fisher exact p = 0.317)
    small = compare_accuracy(1, 12, 4, 12, a_label="tuned", b_label="base")
    assert "Fisher's exact test" in small and "NOT distinguishable from noise" in small
    assert "n=12" in small and "p = 0.317" in small
    # 19/120 vs 39/120: pooled p = 58/240, z = -3.016, p = 0.00256
    big = compare_accuracy(19, 120, 39, 120)
    assert "two-proportion z-test p = 0.00256" in big and ", distinguishable from noise" in big
    assert two_proportion_test(2, 12, 4, 12)[0] == pytest.approx(0.6404, abs=1e-4)  # scipy.stats.fisher_exact
    with pytest.raises(ValueError):
        compare_accuracy(5, 4, 1, 2)


def test_submission_shape():
    records = {"law": _recs("law", "10"), "college_physics": _recs("college_physics", "1")}
    assert submission(records) == {"college_physics": {"0": "A"}, "law": {"0": "A", "1": "A"}}
