"""Several models in one run (issue 22): one folder, one table, differences to the first model with their test."""

from __future__ import annotations

import json

import pytest

from cutegpt.errors import CuteGPTError
from cutegpt.evaluation.cli import EvalConfig, model_configs, run_eval
from cutegpt.evaluation.results import two_proportion_test
from tests.tiny import build_tiny_llama, build_tokenizer


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CUTEGPT_CACHE", str(tmp_path / "cache"))


def test_model_and_lora_flags_repeat_and_pair_up():
    from cutegpt.config import parse_config

    cfg = parse_config(EvalConfig, ["ceval", "--model", "a", "--model", "b.gguf", "c"], prog="cutegpt eval")
    assert cfg.model == ["a", "b.gguf", "c"]
    pairs = [(c.model, c.lora) for c in model_configs(cfg)]
    assert pairs == [("a", None), ("b.gguf", None), ("c", None)]
    one_base = EvalConfig(benchmark="ceval", model=["base"], lora=["none", "x", "y"])
    assert [(c.model, c.lora) for c in model_configs(one_base)] == [("base", None), ("base", "x"), ("base", "y")]
    paired = EvalConfig(benchmark="ceval", model=["a", "b"], lora=["x", "none"])
    assert [(c.model, c.lora) for c in model_configs(paired)] == [("a", "x"), ("b", None)]
    assert [(c.model, c.lora) for c in model_configs(EvalConfig(benchmark="ceval", model="a"))] == [("a", None)]
    with pytest.raises(CuteGPTError, match="2 adapters for 3 models"):
        model_configs(EvalConfig(benchmark="ceval", model=["a", "b", "c"], lora=["x", "y"]))
    with pytest.raises(CuteGPTError, match="the same model twice"):
        model_configs(EvalConfig(benchmark="ceval", model=["a", "a"]))


def test_several_models_write_one_table_with_the_right_differences(tiny_model_dir, ceval_dir, tmp_path):
    pytest.importorskip("xllamacpp")
    from cutegpt.export.gguf import export_gguf

    other = tmp_path / "other"
    tok = build_tokenizer(other)
    build_tiny_llama(other, vocab_size=len(tok), seed=7)
    gguf = export_gguf(str(tiny_model_dir), tmp_path / "tiny-f32.gguf", quant="f32", verify=False, progress=False)
    out = tmp_path / "out"
    cfg = EvalConfig(benchmark="ceval", model=[str(tiny_model_dir), str(gguf), str(other)], data=str(ceval_dir),
                     out=str(out), shots=2, threads=1, parallel=2)
    assert run_eval(cfg) == 0
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    models, rows = res["models"], res["comparison"]
    assert [m["backend"] for m in models] == ["torch", "llamacpp", "torch"]
    assert [m["label"] for m in models] == [f"{tiny_model_dir.name} (torch, float32)", "tiny-f32.gguf (llamacpp, gguf F32)",
                                            "other (torch, float32)"]
    assert [r["model"] for r in rows] == [m["label"] for m in models]
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(preds) == 3 * 5
    by_model = {m["label"]: [p for p in preds if p["model"] == m["label"]] for m in models}
    first = models[0]["summary"]["average"]
    for m, row in zip(models[1:], rows[1:]):
        avg = m["summary"]["average"]
        assert avg["correct"] == sum(p["correct"] for p in by_model[m["label"]])
        assert row["difference"] == pytest.approx(avg["mean_of_subjects"] - first["mean_of_subjects"])
        assert row["p_value"] == pytest.approx(two_proportion_test(avg["correct"], avg["questions"], first["correct"], first["questions"])[0])
        same = sum(a["pred"] == b["pred"] for a, b in zip(by_model[models[0]["label"]], by_model[m["label"]]))
        assert row["same_letter_as_first"] == {"same": same, "questions": 5, "share": same / 5}
    # the llama.cpp run of the same weights answers like torch
    assert rows[1]["same_letter_as_first"]["same"] == 5
    table = (out / "table.md").read_text(encoding="utf-8")
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + 3 and "(reference)" in table and table.count(" vs ") == 2
    assert (out / "categories.png").stat().st_size > 1000


def test_the_embedded_model_is_named_by_its_name_not_its_cache_folder(tmp_path):
    """Loaded, the embedded model lives in a cache folder `smollm2-135m-instruct-<hash>`; tables name the model."""
    from types import SimpleNamespace

    from cutegpt.evaluation.cli import model_label, model_name

    lm = SimpleNamespace(model_path=tmp_path / "smollm2-135m-instruct-e81ea9205682", name="served-id")
    assert model_name(EvalConfig(benchmark="ceval"), lm, "torch") == "SmolLM2-135M-Instruct"
    assert model_name(EvalConfig(benchmark="ceval", endpoint="http://x"), lm, "endpoint") == "served-id"
    assert model_name(EvalConfig(benchmark="ceval", model=str(tmp_path / "q4.gguf")), lm, "llamacpp") == "q4.gguf"
    results = {"model": str(lm.model_path), "name": "SmolLM2-135M-Instruct", "adapter": str(tmp_path / "lora"),
               "backend": "torch", "weights": "float32"}
    assert model_label(results) == "SmolLM2-135M-Instruct + lora (torch, float32)"
