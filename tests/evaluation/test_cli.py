"""`cutegpt eval` end to end on the tiny model: outputs, resume after an interruption, test-split submission."""

from __future__ import annotations

import json

import pytest

import cutegpt.evaluation.cli as evcli
from cutegpt.cli import main
from cutegpt.evaluation.cli import EvalConfig, run_eval


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CUTEGPT_CACHE", str(tmp_path / "cache"))


def _cfg(tiny_model_dir, data, out, **kw):
    return EvalConfig(benchmark="ceval", model=str(tiny_model_dir), template="cutegpt", data=str(data),
                      out=str(out), **kw)


def _lines(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_val_run_writes_results(tiny_model_dir, ceval_dir, tmp_path):
    out = tmp_path / "out"
    assert run_eval(_cfg(tiny_model_dir, ceval_dir, out, shots=5)) == 0
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert res["split"] == "val" and res["protocol"]["shots"] == 5 and res["protocol"]["method"] == "logits"
    assert set(res["protocol"]["letter_tokens"]) == {"A", "B", "C", "D"}
    assert len(res["data_hash"]) == 16 and res["versions"]["cutegpt"]
    preds = _lines(out / "predictions.jsonl")
    assert len(preds) == 5 and all(abs(sum(p["probs"].values()) - 1) < 1e-4 for p in preds)
    summary = res["summary"]
    assert summary["subjects"]["computer_network"]["correct"] == sum(p["correct"] for p in preds[:3])
    assert (out / "categories.png").stat().st_size > 1000


def test_resume_after_interruption_gives_same_results(tiny_model_dir, ceval_dir, tmp_path, monkeypatch):
    ref_out = tmp_path / "ref"
    run_eval(_cfg(tiny_model_dir, ceval_dir, ref_out, shots=5, resume=False))

    import cutegpt.evaluation.scoring as scoring

    real = scoring.score_items
    calls = {"n": 0}

    def interrupted(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(scoring, "score_items", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_eval(_cfg(tiny_model_dir, ceval_dir, out, shots=5))
    assert not out.exists()  # nothing half-written
    monkeypatch.setattr(scoring, "score_items", real)
    run_eval(_cfg(tiny_model_dir, ceval_dir, out, shots=5))
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert res["timing"]["subjects_resumed"] == 1 and res["timing"]["scored_questions"] == 2
    ref = json.loads((ref_out / "results.json").read_text(encoding="utf-8"))
    assert res["summary"] == ref["summary"]
    assert _lines(out / "predictions.jsonl") == _lines(ref_out / "predictions.jsonl")


def test_changed_setting_does_not_reuse_cache(tiny_model_dir, ceval_dir, tmp_path):
    run_eval(_cfg(tiny_model_dir, ceval_dir, tmp_path / "a", shots=5))
    run_eval(_cfg(tiny_model_dir, ceval_dir, tmp_path / "b", shots=0))
    res = json.loads((tmp_path / "b" / "results.json").read_text(encoding="utf-8"))
    assert res["timing"]["subjects_resumed"] == 0


def test_test_split_writes_official_submission(tiny_model_dir, ceval_dir, tmp_path):
    out = tmp_path / "sub"
    run_eval(_cfg(tiny_model_dir, ceval_dir, out, shots=0, split="test"))
    sub = json.loads((out / "submission.json").read_text(encoding="utf-8"))
    assert set(sub) == {"computer_network", "high_school_physics"}
    assert sub["computer_network"].keys() == {"0", "1", "2"}
    assert all(v in "ABCD" for s in sub.values() for v in s.values())
    assert "summary" not in json.loads((out / "results.json").read_text(encoding="utf-8"))


def test_cli_errors_exit_1(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CEVAL_DATA", raising=False)
    monkeypatch.delenv("CUTEGPT_DATA", raising=False)
    assert main(["eval", "ceval", "--model", str(tiny_model_dir)]) == 1
    assert "ceval-exam" in capsys.readouterr().err
    assert main(["eval", "ceval", "--data", str(tmp_path), "--split", "nope"]) == 1
    assert "no split 'nope'" in capsys.readouterr().err


def test_other_benchmarks_run(tiny_model_dir, cmmlu_dir, xiezhi_dir, tmp_path):
    cm = EvalConfig(benchmark="cmmlu", model=str(tiny_model_dir), data=str(cmmlu_dir), out=str(tmp_path / "cm"), shots=5)
    assert run_eval(cm) == 0
    xz = EvalConfig(benchmark="xiezhi", model=str(tiny_model_dir), data=str(xiezhi_dir), out=str(tmp_path / "xz"),
                    shots=0, method="loglikelihood")
    assert run_eval(xz) == 0
    res = json.loads((tmp_path / "xz" / "results.json").read_text(encoding="utf-8"))
    assert set(res["summary"]["subjects"]) == {"医学", "艺术学"} and 0 < res["summary"]["average"]["mrr"] <= 1


def test_new_flags_parse(capsys):
    from cutegpt.config import parse_config

    cfg = parse_config(EvalConfig, ["cmmlu", "--prompt", "lm-eval", "--target-delimiter", " ", "--out", "x", "--overwrite"], "eval")
    assert cfg.prompt == "lm-eval" and cfg.target_delimiter == " " and cfg.out == "x" and cfg.overwrite
    assert parse_config(EvalConfig, ["ceval", "--output", "y"], "eval").out == "y"
    assert main(["eval", "cmmlu", "--prompt", "helm"]) == 1
    assert "--prompt" in capsys.readouterr().err


def test_timing_line_of_a_run_faster_than_a_millisecond(capsys):
    """seconds_this_run is rounded to ms; a run that took less prints no rate instead of dividing by zero."""
    from cutegpt.evaluation.cli import _print_timing

    _print_timing({"scored_questions": 5, "seconds_this_run": 0.0, "subjects_resumed": 0, "questions_per_second": 0})
    assert capsys.readouterr().out == "5 questions in 0.0 s\n"
    _print_timing({"scored_questions": 5, "seconds_this_run": 2.0, "subjects_resumed": 1, "questions_per_second": 2.5})
    assert capsys.readouterr().out == "5 questions in 2.0 s (2.50 questions/s), 1 subjects from the cache\n"
