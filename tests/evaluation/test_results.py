"""Category averages (mean of subjects, question-weighted), Hard, table and submission shape."""

from __future__ import annotations

import pytest

from cutegpt.evaluation.data import Benchmark, Subject
from cutegpt.evaluation.results import aggregate, submission, table


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
    assert s["average"]["mrr"] == pytest.approx((4 * 1 + 4 * 0.5) / 8)
    t = table(_bench(), s, "zero-shot")
    assert t.splitlines()[0] == "| setting | STEM | Humanities | Average | Hard |"
    assert t.splitlines()[2] == "| zero-shot | 62.5 | 50.0 | 58.3 | 25.0 |"


def test_submission_shape():
    records = {"law": _recs("law", "10"), "college_physics": _recs("college_physics", "1")}
    assert submission(records) == {"college_physics": {"0": "A"}, "law": {"0": "A", "1": "A"}}
