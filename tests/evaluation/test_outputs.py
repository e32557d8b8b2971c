"""Issue 12: every run keeps its own results, records what it did, and never destroys a user's files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cutegpt.model.loading as loading
from cutegpt.errors import CuteGPTError
from cutegpt.evaluation.cli import EvalConfig, evaluate, run_eval
from cutegpt.evaluation.data import load_benchmark


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CUTEGPT_CACHE", str(tmp_path / "cache"))


def _make_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, cfg).save_pretrained(out)
    return out


def _res(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text(encoding="utf-8"))


def _cfg(model, data, **kw):
    return EvalConfig(benchmark="ceval", model=str(model), template="cutegpt", data=str(data), **kw)


def test_two_adapters_keep_both_results(tiny_model_dir, ceval_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = _make_adapter(tiny_model_dir, tmp_path / "adapter-a", 1)
    b = _make_adapter(tiny_model_dir, tmp_path / "adapter-b", 2)
    run_eval(_cfg(tiny_model_dir, ceval_dir, shots=0, lora=str(a)))
    run_eval(_cfg(tiny_model_dir, ceval_dir, shots=0, lora=str(b)))
    run_eval(_cfg(tiny_model_dir, ceval_dir, shots=0))  # the base model
    run_eval(_cfg(tiny_model_dir, ceval_dir, shots=0, subjects=["computer_network"], limit=1))
    folders = sorted(p for p in (tmp_path / "eval-results").iterdir() if not p.is_symlink())
    assert len(folders) == 4, folders
    adapters = sorted(str(_res(f)["adapter"]) for f in folders)
    assert adapters == sorted([str(a), str(b), "None", "None"])
    names = [f.name for f in folders]
    assert any("+adapter-a-" in n for n in names) and any("+adapter-b-" in n for n in names)
    quick = next(f for f in folders if _res(f)["settings"]["limit"] == 1)
    assert _res(quick)["settings"]["subjects"] == ["computer_network"] and _res(quick)["questions"] == 1
    latest = tmp_path / "eval-results" / "latest"
    assert latest.is_symlink() and latest.resolve() == quick.resolve()


def test_same_settings_twice_keeps_both(tiny_model_dir, ceval_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_eval(_cfg(tiny_model_dir, ceval_dir, shots=0))
    run_eval(_cfg(tiny_model_dir, ceval_dir, shots=0))
    folders = [p for p in (tmp_path / "eval-results").iterdir() if not p.is_symlink()]
    assert len(folders) == 2


def test_existing_out_refused_before_the_model_loads(tiny_model_dir, ceval_dir, tmp_path, monkeypatch):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes", encoding="utf-8")

    def no_load(*a, **kw):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(loading, "load_model", no_load)
    with pytest.raises(CuteGPTError, match=r"--out .*mine already exists; pass --overwrite"):
        run_eval(_cfg(tiny_model_dir, ceval_dir, shots=0, out=str(out)))
    with pytest.raises(CuteGPTError, match=r"holds files cutegpt eval did not write \(notes\.txt\)"):
        run_eval(_cfg(tiny_model_dir, ceval_dir, shots=0, out=str(out), overwrite=True))
    assert (out / "notes.txt").read_text(encoding="utf-8") == "my notes"


def test_overwrite_replaces_a_results_folder(tiny_model_dir, ceval_dir, tmp_path):
    out = tmp_path / "res"
    run_eval(_cfg(tiny_model_dir, ceval_dir, shots=0, out=str(out)))
    run_eval(_cfg(tiny_model_dir, ceval_dir, shots=5, out=str(out), overwrite=True))
    assert _res(out)["protocol"]["shots"] == 5


def test_cached_rerun_keeps_timing(tiny_model_dir, ceval_dir, tmp_path):
    run_eval(_cfg(tiny_model_dir, ceval_dir, shots=5, out=str(tmp_path / "first")))
    run_eval(_cfg(tiny_model_dir, ceval_dir, shots=5, out=str(tmp_path / "again")))
    first, again = _res(tmp_path / "first")["timing"], _res(tmp_path / "again")["timing"]
    assert first["scored_questions"] == 5 and first["seconds"] > 0
    assert again["scored_questions"] == 0 and again["subjects_resumed"] == 2
    assert again["questions_timed"] == 5
    assert again["seconds"] == pytest.approx(first["seconds"], abs=0.002)
    assert again["questions_per_second"] == pytest.approx(first["questions_per_second"], rel=1e-6)


def test_loglikelihood_with_space_delimiter_by_hand(tiny_lm, ceval_dir):
    bench = load_benchmark("ceval", ceval_dir, "val", ["high_school_physics"])
    cfg = EvalConfig(benchmark="ceval", method="loglikelihood", target_delimiter=" ", shots=1, prompt="lm-eval")
    rec = evaluate(tiny_lm, bench, cfg, None, show_progress=False)["records"]["high_school_physics"][0]
    text = ("以下是中国关于高中物理的单项选择题，请选出其中的正确答案。\n\n"
            "力的单位是___\nA. 牛顿\nB. 焦耳\nC. 瓦特\nD. 伏特\n答案： A\n\n"
            "1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案：")
    tok = tiny_lm.tokenizer
    for j, letter in enumerate("ABCD"):
        ctx = tok(text)["input_ids"]
        whole = tok(text + " " + letter)["input_ids"]
        assert whole[: len(ctx)] == ctx
        cont = whole[len(ctx):]
        with torch.no_grad():
            logp = torch.log_softmax(tiny_lm.model(torch.tensor([whole])).logits[0].float(), -1)
        by_hand = sum(float(logp[len(ctx) - 1 + t, tid]) for t, tid in enumerate(cont))
        assert rec["scores"][j] == pytest.approx(by_hand, abs=2e-4)
    plain = evaluate(tiny_lm, bench, EvalConfig(benchmark="ceval", method="loglikelihood", shots=1, prompt="lm-eval"),
                     None, show_progress=False)["records"]["high_school_physics"][0]
    assert plain["scores"] != rec["scores"]  # the delimiter really changes what is scored


def test_results_record_settings_and_drop_unexplained_fields(tiny_model_dir, cmmlu_dir, tmp_path):
    out = tmp_path / "cm"
    run_eval(EvalConfig(benchmark="cmmlu", model=str(tiny_model_dir), data=str(cmmlu_dir), out=str(out), shots=0,
                        subjects=["agronomy"], limit=1))
    res = _res(out)
    assert "int8" not in res and res["weights"] == "float32"
    assert res["settings"]["subjects"] == ["agronomy"] and res["settings"]["limit"] == 1
    assert res["protocol"]["prompt"] == "official" and res["protocol"]["answer_cue"] == "答案是："
    assert res["protocol"]["question_prefix"] == "题目：" and "mp_utils.py" in res["protocol"]["prompt_source"]
    assert "mrr" not in res["summary"]["average"]
    assert res["summary"]["average"]["question_weighted_ci95"][0] == 0.0 or res["summary"]["average"]["question_weighted_ci95"][1] == 100.0


def test_dev_split_run_records_leave_out(tiny_model_dir, ceval_dir, tmp_path):
    out = tmp_path / "dev"
    run_eval(_cfg(tiny_model_dir, ceval_dir, shots=4, split="dev", out=str(out)))
    proto = _res(out)["protocol"]
    assert proto["fewshot_leaves_out_self"] is True and "left out of its own shots" in proto["fewshot_note"]


def test_chart_labels_do_not_overlap_and_show_counts(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cutegpt.evaluation.data import Benchmark, Subject
    from cutegpt.evaluation.results import aggregate, bar_chart

    subs = {n: Subject(n, n, n, [c]) for n, c in [("a", "STEM"), ("b", "Social Science"), ("c", "Humanities"),
                                                  ("d", "Other"), ("college_physics", "STEM")]}
    bench = Benchmark("ceval", "val", tmp_path, ["STEM", "Social Science", "Humanities", "Other"], subs,
                      ["college_physics"], [])
    recs = {n: [{"correct": i % 2 == 0, "rank": 1} for i in range(2 if n == "b" else 5)] for n in subs}
    saved = {}
    real_savefig = plt.Figure.savefig

    def keep(fig, path, **kw):
        fig.canvas.draw()
        saved["labels"] = [(t.get_text(), t.get_window_extent()) for t in fig.axes[0].get_xticklabels()]
        saved["title"] = fig.axes[0].get_title()
        return real_savefig(fig, path, **kw)

    monkeypatch.setattr(plt.Figure, "savefig", keep)
    bar_chart(bench, aggregate(bench, recs), "ceval val, zero-shot: subjects: a, b; first 5 questions per subject", tmp_path / "c.png")
    labels = saved["labels"]
    assert any("Social" in t and "n=2" in t for t, _ in labels)  # "Social Science = 2 questions" is visible
    for (t1, b1), (t2, b2) in zip(labels, labels[1:]):
        assert b1.x1 < b2.x0, f"labels {t1!r} and {t2!r} overlap"
    assert "first 5 questions" in saved["title"]
    assert (tmp_path / "c.png").stat().st_size > 1000
