"""`train pt` on raw text, and `train sft` straight from a conversation file (converted on the fly, cached)."""

from __future__ import annotations

import json

from cutegpt.training.pt import PTConfig, run_pt
from cutegpt.training.sft import SFTConfig, run_sft
from tests.tiny import CORPUS
from tests.training.conftest import QA, read_summary


def test_pretraining_on_text_and_jsonl(tiny_model_dir, tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(CORPUS[:4]), encoding="utf-8")
    with open(tmp_path / "b.jsonl", "w", encoding="utf-8") as f:
        for line in CORPUS[4:]:
            f.write(json.dumps({"text": line}, ensure_ascii=False) + "\n")
    out = tmp_path / "run"
    run_pt(PTConfig(model=str(tiny_model_dir), data=[str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], out=str(out),
                    max_length=32, micro_batch=4, grad_accum=1, lr=1e-2, warmup_steps=0, max_steps=20, precision="fp32",
                    lora_targets=["all-linear"], modules_to_save=["embed_tokens", "lm_head"], threads=1))
    curve = [loss for _, loss in read_summary(out)["loss_curve"]]
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 1.0
    cfg = json.loads((out / "final" / "adapter_config.json").read_text())
    assert set(cfg["modules_to_save"]) == {"embed_tokens", "lm_head"}


def test_sft_converts_conversation_files_on_the_fly(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CUTEGPT_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "convs.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for q, a in QA:
            f.write(json.dumps([{"instruction": q, "input": "", "output": a}], ensure_ascii=False) + "\n")
    flags = dict(model=str(tiny_model_dir), data=[str(data)], max_length=128, micro_batch=2, grad_accum=1,
                 max_steps=2, precision="fp32", threads=1)
    run_sft(SFTConfig(**flags, out=str(tmp_path / "r1")))
    cached = list((tmp_path / "cache" / "datasets").iterdir())
    assert len(cached) == 1 and (cached[0] / "manifest.json").is_file()
    run_sft(SFTConfig(**flags, out=str(tmp_path / "r2")))  # the second run reuses the cache
    assert list((tmp_path / "cache" / "datasets").iterdir()) == cached
