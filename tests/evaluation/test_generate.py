"""--method generate: answers as chat turns, letters extracted, failures counted, answer texts kept."""

from __future__ import annotations

import json

import pytest

import cutegpt.evaluation.generate as gen
from cutegpt.evaluation.cli import EvalConfig, run_eval


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CUTEGPT_CACHE", str(tmp_path / "cache"))


def _preds(out):
    return [json.loads(x) for x in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]


def test_letters_are_extracted_and_failures_counted(tiny_model_dir, ceval_dir, tmp_path, monkeypatch):
    """Fixed answers in place of the model's: the accuracy and the failure count follow from them exactly."""
    seen = []
    canned = iter(["答案是B", "我不知道", "The answer is C.", "(B)", "瓦特"])

    def fake(lm, ids, max_new_tokens, text=""):
        seen.append(lm.tokenizer.decode(ids))
        return next(canned)

    monkeypatch.setattr(gen, "answer_text", fake)
    out = tmp_path / "out"
    assert run_eval(EvalConfig(benchmark="ceval", model=str(tiny_model_dir), data=str(ceval_dir), out=str(out),
                               method="generate", shots=1, template="cutegpt")) == 0
    preds = _preds(out)
    # gold: B A C | B D (fixture); answers: B, none, C | B, 瓦特 is not among that question's options
    assert [p["pred"] for p in preds] == ["B", None, "C", "B", None]
    assert [p["answer"] for p in preds][:2] == ["答案是B", "我不知道"]
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert res["extraction_failures"] == 2 and res["summary"]["average"]["correct"] == 3
    assert res["protocol"]["generation"]["instruction"] == "请直接给出正确答案的选项。"
    # the question goes to the model as a chat turn ending with the instruction, not with the answer cue
    assert all("请直接给出正确答案的选项。" in t and t.rstrip().endswith("答：") for t in seen)


def test_llamacpp_and_torch_give_the_same_answers(tiny_model_dir, ceval_dir, tmp_path):
    pytest.importorskip("xllamacpp")
    from cutegpt.export.gguf import export_gguf

    gguf = export_gguf(str(tiny_model_dir), tmp_path / "t.gguf", quant="f32", verify=False, progress=False, template="cutegpt")
    runs = {}
    for name, model in (("torch", tiny_model_dir), ("gguf", gguf)):
        out = tmp_path / name
        assert run_eval(EvalConfig(benchmark="ceval", model=str(model), data=str(ceval_dir), out=str(out), method="generate",
                                   shots=0, template="cutegpt", max_new_tokens=6, threads=1)) == 0
        runs[name] = _preds(out)
    assert [p["answer"] for p in runs["torch"]] == [p["answer"] for p in runs["gguf"]]
    assert all(p["answer"] for p in runs["torch"])
