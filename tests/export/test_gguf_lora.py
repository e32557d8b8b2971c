"""--format gguf-lora: base GGUF + LoRA GGUF in llama.cpp predicts what the merged export predicts.

Reference: the merged model exported whole (`export --format gguf --lora`), itself checked against
transformers by the export's verification. The adapters touch every linear layer, q and k included
(the rotary permutation LLaMA needs on B), with alpha != r, and once with rsLoRA (alpha / sqrt r).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cutegpt.cli import main
from cutegpt.errors import CuteGPTError

gguf = pytest.importorskip("gguf")
pytest.importorskip("xllamacpp")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = [5, 17, 42, 99, 3, 250, 7, 8, 61, 12, 300, 77, 140, 9, 33, 201, 88, 64, 150, 11, 260, 45]


def _adapter(base: Path, out: Path, **lora_kw) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    config = LoraConfig(**{"r": 4, "lora_alpha": 12, "target_modules": ALL_LINEAR, "init_lora_weights": False, **lora_kw})
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    with torch.no_grad():  # large enough to move the logits far more than float32 noise
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(out)
    return out


def _predictions(path: Path, lora: Path | None = None) -> tuple[list[list[tuple[int, float]]], list[int]]:
    from cutegpt.runtime.llamacpp import LlamaCpp

    with LlamaCpp(path, n_ctx=128, lora=lora) as lm:
        tops = [lm.next_logprobs(PROMPT[:n], k=5) for n in range(3, len(PROMPT) + 1)]
        return tops, lm.greedy(PROMPT, 12)


def _export(tmp_path: Path, base: Path, adapter: Path, quant: str = "f32") -> tuple[Path, Path, Path]:
    from cutegpt.export.gguf import export_gguf
    from cutegpt.export.gguf_lora import export_gguf_lora

    kw = dict(quant="f32", verify=False, progress=False)
    base_file = export_gguf(str(base), tmp_path / "base.gguf", **kw)
    merged = export_gguf(str(base), tmp_path / "merged.gguf", lora=str(adapter), **kw)
    lora_file = export_gguf_lora(None, adapter, tmp_path / "lora.gguf", quant=quant)
    return base_file, merged, lora_file


@pytest.mark.parametrize("variant,lora_kw", [("llama", {}), ("llama", {"use_rslora": True}), ("qwen2", {})])
def test_base_plus_lora_gguf_predicts_as_the_merged_export(variant, lora_kw, bpe_dir, arch_dirs, tmp_path):
    base = bpe_dir if variant == "llama" else arch_dirs["qwen2-bpe-tied"]
    adapter = _adapter(base, tmp_path / "adapter", **lora_kw)
    base_file, merged, lora_file = _export(tmp_path, base, adapter)
    want_tops, want_greedy = _predictions(merged)
    got_tops, got_greedy = _predictions(base_file, lora_file)
    plain_tops, _ = _predictions(base_file)
    assert got_greedy == want_greedy
    # llama.cpp reports no probabilities where the top token is half a UTF-8 character: those positions are skipped
    compared = [(w, g, p) for w, g, p in zip(want_tops, got_tops, plain_tops) if None not in (w, g, p)]
    assert len(compared) >= 5
    for want, got, _ in compared:
        assert [t for t, _ in got] == [t for t, _ in want]
        assert max(abs(a - b) for (_, a), (_, b) in zip(got, want)) < 1e-3
    # the adapter matters: without it llama.cpp predicts something else
    assert any(abs(p[0][1] - w[0][1]) > 0.05 or p[0][0] != w[0][0] for w, _, p in compared)


def test_file_layout_is_llama_cpps(bpe_dir, tmp_path):
    """What convert_lora_to_gguf.py writes: adapter type and alpha, <weight>.lora_a (r x in) and .lora_b (out x r)."""
    from cutegpt.export.gguf_lora import export_gguf_lora

    adapter = _adapter(bpe_dir, tmp_path / "runs" / "sft" / "final")
    out = tmp_path / "lora.gguf"
    assert main(["export", "--format", "gguf-lora", "--lora", str(adapter), "--out", str(out), "--quiet"]) == 0
    reader = gguf.GGUFReader(str(out))

    def value(key):
        f = reader.fields[key]
        return f.contents()

    assert value("general.architecture") == "llama" and value("general.type") == "adapter"
    assert value("adapter.type") == "lora" and value("adapter.lora.alpha") == 12.0 and value("general.name") == "sft"
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * len(ALL_LINEAR) * 2  # two layers
    a, b = tensors["blk.0.attn_q.weight.lora_a"], tensors["blk.0.attn_q.weight.lora_b"]
    assert list(a.shape) == [32, 4] and list(b.shape) == [4, 32]  # ggml ne: [in, r] and [r, out]
    assert a.tensor_type == gguf.GGMLQuantizationType.F16  # --quant default
    assert list(tensors["blk.1.ffn_down.weight.lora_a"].shape) == [64, 4]
    with pytest.raises(CuteGPTError, match="already exists"):
        export_gguf_lora(None, adapter, out)


def test_what_a_gguf_lora_cannot_hold_is_refused(bpe_dir, tmp_path, capsys):
    from cutegpt.export.gguf_lora import export_gguf_lora

    saved = _adapter(bpe_dir, tmp_path / "mts", modules_to_save=["lm_head"])
    with pytest.raises(CuteGPTError, match="lm_head.*cannot carry; export the merged model"):
        export_gguf_lora(None, saved, tmp_path / "a.gguf")
    dora = _adapter(bpe_dir, tmp_path / "dora", use_dora=True)
    with pytest.raises(CuteGPTError, match="DoRA"):
        export_gguf_lora(None, dora, tmp_path / "b.gguf")
    plain = _adapter(bpe_dir, tmp_path / "plain")
    assert main(["export", "--format", "gguf-lora", "--lora", str(plain), "--out", str(tmp_path / "c.gguf"), "--quant", "q4_0"]) == 1
    assert "--quant q4_0 is for whole models" in capsys.readouterr().err
    assert main(["export", "--format", "gguf-lora", "--out", str(tmp_path / "d.gguf")]) == 1
    assert "--lora is required" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))


@pytest.mark.slow  # three exports and two generate runs; the equality itself is the fast test above
def test_generate_and_chat_run_base_gguf_plus_lora_gguf_as_the_merged_file(bpe_dir, tmp_path, capsys):
    import json

    adapter = _adapter(bpe_dir, tmp_path / "adapter")
    base_file, merged, lora_file = _export(tmp_path, bpe_dir, adapter, quant="f32")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"instruction": "The quick brown fox"}\n{"instruction": "Language models"}\n', encoding="utf-8")
    answers = {}
    for name, extra in (("merged", ["--model", str(merged)]), ("lora", ["--model", str(base_file), "--lora", str(lora_file)])):
        out = tmp_path / f"{name}.jsonl"
        assert main(["generate", str(prompts), *extra, "--out", str(out), "--greedy", "--max-new-tokens", "12",
                     "--template", "raw", "--threads", "1"]) == 0
        answers[name] = [json.loads(line)["answer"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert answers["lora"] == answers["merged"] and any(answers["merged"])
    capsys.readouterr()
    assert main(["chat", "--model", str(bpe_dir), "--lora", str(lora_file), "--input", str(prompts)]) == 1
    assert "is a LoRA GGUF: give the base model's GGUF file as --model" in capsys.readouterr().err
    assert main(["chat", "--model", str(base_file), "--lora", str(lora_file), "--backend", "torch", "--input", str(prompts)]) == 1
    assert "which only llama.cpp runs" in capsys.readouterr().err
