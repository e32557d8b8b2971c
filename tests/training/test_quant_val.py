"""QLoRA / 8-bit LoRA, validation during training, the chunked loss (tiny LLaMA: fast)."""

from __future__ import annotations

import json

import pytest
import torch

from cutegpt.errors import CuteGPTError
from cutegpt.model.loading import ModelArgs, load_model
from cutegpt.training import engine, trainer
from cutegpt.training.sft import SFTConfig, prepare_sft, run_sft
from tests.training.conftest import QA, encode_samples, read_summary, write_dataset


def _cfg(model_dir, data, out, **kw) -> SFTConfig:
    base = dict(model=str(model_dir), data=[str(data)], out=str(out), micro_batch=4, grad_accum=1, lr=1e-2,
                warmup_steps=0, max_steps=20, save_steps=1000, precision="fp32", seed=0, logging_steps=1, threads=1)
    base.update(kw)
    return SFTConfig(**base)


def _probe(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer("问：中国的首都是哪里？\n答：\n北京。", add_special_tokens=False)["input_ids"]])


# ---------------------------------------------------------------- quantized LoRA

@pytest.fixture(scope="module")
def tiny64_dir(tmp_path_factory, tiny_model_dir):
    """The tiny LLaMA at hidden 64: bitsandbytes' CPU 4-bit kernels need rows of at least one 64-weight block."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny64")
    for f in tiny_model_dir.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    cfg = LlamaConfig.from_pretrained(tiny_model_dir)
    cfg.hidden_size, cfg.intermediate_size = 64, 128
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_quantized_lora_learns_and_reloads_on_16bit_base(tiny64_dir, sft_dataset, tmp_path, quant):
    pytest.importorskip("bitsandbytes")
    tiny_model_dir = tiny64_dir
    cfg = _cfg(tiny_model_dir, sft_dataset, tmp_path / "run", quantization=quant, max_steps=25, lora_dropout=0.0)
    kept = {}

    def prepare(check_rows):
        kept["prep"] = prepare_sft(cfg, check_rows)
        return kept["prep"]

    summary = engine.train(cfg, prepare)
    curve = [loss for _, loss in summary["loss_curve"]]
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.5, curve
    model = kept["prep"].model
    kind = "Linear4bit" if quant == "4bit" else "Linear8bitLt"
    assert any(type(m).__name__ == kind for m in model.modules())  # it really trained on a quantized base

    final = tmp_path / "run" / "final"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_model_dir)  # the 16-bit folder, not a quantized copy
    rec = json.loads((final / "cutegpt_training.json").read_text())
    assert rec["quantization"] == quant and rec["base_model"] == str(tiny_model_dir)
    assert summary["quantization"] == quant

    ids = _probe(kept["prep"].tokenizer)
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()  # train mode: eval mode would repack 4-bit weights for inference
        lm = load_model(ModelArgs(model=str(tiny_model_dir), lora=str(final)))
        got = lm.model(input_ids=ids).logits.float()
        base = load_model(ModelArgs(model=str(tiny_model_dir))).model(input_ids=ids).logits.float()
    with torch.no_grad(), model.disable_adapter():
        qbase = model(input_ids=ids).logits.float()
    # the 16-bit base + adapter differs from the trained quantized model by the base's own quantization error and
    # no more (NF4 on this tiny model: 0.45 mean logit error on an AMD EPYC, near what training moved), and the
    # adapter changes both bases the same way; an adapter that did not load fails both
    err, quant_err = (got - want).abs().mean(), (qbase - base).abs().mean()
    assert err < 1.25 * quant_err + 0.02, (float(err), float(quant_err))
    delta = torch.corrcoef(torch.stack([(got - base).flatten(), (want - qbase).flatten()]))[0, 1]
    assert delta > 0.75, float(delta)
    assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.85


def test_quantization_with_full_is_refused_in_one_sentence():
    from cutegpt.config import parse_config

    with pytest.raises(CuteGPTError, match=r"^--quantization 4bit trains a LoRA adapter.*--method lora\.$"):
        parse_config(SFTConfig, ["--data", "d", "--method", "full", "--quantization", "4bit"], prog="t")


# ---------------------------------------------------------------- validation

def test_split_is_by_conversation_and_seeded(tiny_tokenizer):
    from datasets import Dataset

    from cutegpt.training.validation import split_packed, unpack

    samples = encode_samples(tiny_tokenizer)
    rows = {"input_ids": [], "labels": [], "seq_lens": []}
    for i in range(0, len(samples), 3):  # rows of three conversations each
        group = samples[i:i + 3]
        rows["input_ids"].append([t for s in group for t in s[0]])
        rows["labels"].append([t for s in group for t in s[1]])
        rows["seq_lens"].append([len(s[0]) for s in group])
    ds = Dataset.from_dict(rows)
    tr, va = split_packed(ds, 0.25, seed=7, max_length=96)
    tr2, va2 = split_packed(ds, 0.25, seed=7, max_length=96)
    _, va3 = split_packed(ds, 0.25, seed=8, max_length=96)
    key = lambda d: sorted(tuple(s[0]) for s in unpack(d))  # noqa: E731
    assert key(va) == key(va2) and key(tr) == key(tr2)  # seeded
    assert key(va) != key(va3)
    whole = sorted(tuple(s[0]) for s in samples)
    assert len(key(va)) == 3 and sorted(key(va) + key(tr)) == whole  # whole conversations, none lost or cut
    assert not set(key(va)) & set(key(tr))


def test_validation_loss_equals_each_heldout_conversation_alone(tiny_model_dir, sft_dataset, tiny_tokenizer, tmp_path):
    cfg = _cfg(tiny_model_dir, sft_dataset, tmp_path / "run", val_ratio=0.25, eval_steps=5, max_steps=10, lora_dropout=0.0)
    kept = {}

    def prepare(check_rows):
        kept["prep"] = prepare_sft(cfg, check_rows)
        return kept["prep"]

    summary = engine.train(cfg, prepare)
    prep = kept["prep"]
    assert [s for s, _ in summary["val_loss_curve"]] == [5, 10]
    assert [s for s, _ in summary["loss_curve"]] == list(range(1, 11))  # evaluating drops no training-loss point
    from cutegpt.training.validation import unpack

    held = unpack(prep.val_dataset)
    assert len(held) == 3 and all(len(r["seq_lens"]) >= 1 for r in prep.val_dataset)
    model = prep.model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in held:  # brute force: each conversation alone, no packing, no collator
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            t = torch.tensor(labels[1:])
            m = t != -100
            total += float(torch.nn.functional.cross_entropy(logits[m], t[m], reduction="sum"))
            count += int(m.sum())
    assert summary["final_val_loss"] == pytest.approx(total / count, abs=1e-4)
    events = list((tmp_path / "run" / "runs").rglob("events.out.tfevents*"))
    assert events and any(b"eval/loss" in e.read_bytes() for e in events)


def test_keep_best_keeps_the_lowest(tiny_model_dir, sft_dataset, tmp_path):
    # a learning rate that first helps, then diverges: the best step is not the last
    cfg = _cfg(tiny_model_dir, sft_dataset, tmp_path / "run", val_ratio=0.25, eval_steps=2, max_steps=16, lr=0.3,
               keep_best=True, lora_dropout=0.0)
    summary = run_sft(cfg) == 0 and read_summary(tmp_path / "run")
    curve = summary["val_loss_curve"]
    low = min(curve, key=lambda c: c[1])
    best = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    assert best["step"] == low[0] and best["eval_loss"] == pytest.approx(low[1])
    assert (tmp_path / "run" / "best" / "adapter_config.json").is_file()
    assert summary["best_step"] == low[0]


def test_keep_best_needs_validation_data():
    from cutegpt.config import parse_config

    with pytest.raises(CuteGPTError, match="--keep-best needs validation data"):
        parse_config(SFTConfig, ["--data", "d", "--keep-best"], prog="t")


def test_report_to_missing_package_is_one_sentence(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(CuteGPTError, match=r"^--report-to wandb needs the wandb package: pip install wandb"):
        trainer.check_report_to("wandb")
    assert trainer.check_report_to("none") == []


def test_loss_png_has_both_curves_and_a_title(tiny_model_dir, sft_dataset, tmp_path):
    run_sft(_cfg(tiny_model_dir, sft_dataset, tmp_path / "myrun", val_ratio=0.25, eval_steps=3, max_steps=9))
    png = tmp_path / "myrun" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


# ---------------------------------------------------------------- the chunked loss

@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_matches_transformers(tmp_path, tied):
    """Loss and every gradient equal transformers' full-logits path; chunks smaller than the rows too."""
    from tests.tiny import build_tiny_llama
    from transformers import AutoModelForCausalLM

    from cutegpt.training.loss import causal_lm_loss

    build_tiny_llama(tmp_path / "m", vocab_size=300, tie=tied)
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (2, 40))
    labels = ids.clone()
    labels[:, :10] = -100
    labels[1, 30:] = -100
    pos = torch.cat([torch.arange(25), torch.arange(15)]).repeat(2, 1)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    out = ref(input_ids=ids, labels=labels, position_ids=pos, use_cache=False, num_items_in_batch=torch.tensor(70))
    out.loss.backward()
    loss, n = causal_lm_loss(ours, {"input_ids": ids, "labels": labels, "position_ids": pos}, torch.tensor(70), chunk=7)
    loss.backward()
    assert n == 2 * 39 - 9 - 9 - 10
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=1e-5)
    for (name, a), (_, b) in zip(ref.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------- the embedded model (slow)

@pytest.mark.slow
@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_quantized_lora_on_the_embedded_model(embedded_dir, tmp_path, quant):
    """SmolLM2-135M: 6 steps of QLoRA / 8-bit LoRA on one repeated sentence lower the loss; the adapter on the 16-bit base
    gives logits close to the quantized training model's."""
    pytest.importorskip("bitsandbytes")
    from cutegpt.training.pt import PTConfig, prepare_pt

    text = tmp_path / "t.jsonl"
    text.write_text("\n".join(json.dumps({"text": "The capital of France is Paris. " * 6}) for _ in range(8)) + "\n")
    cfg = PTConfig(model=str(embedded_dir), data=[str(text)], out=str(tmp_path / "run"), quantization=quant, max_length=64,
                   micro_batch=2, grad_accum=1, lr=2e-3, warmup_steps=0, max_steps=6, save_steps=1000, precision="bf16",
                   lora_dropout=0.0, threads=1, report_to="none")
    kept = {}

    def prepare(check_rows):
        kept["prep"] = prepare_pt(cfg, check_rows)
        return kept["prep"]

    curve = [loss for _, loss in engine.train(cfg, prepare)["loss_curve"]]
    assert curve[-1] < curve[0] - 0.2, curve
    ids = torch.tensor([kept["prep"].tokenizer("The capital of France is Paris.")["input_ids"]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = kept["prep"].model(input_ids=ids).logits.float()
    lm = load_model(ModelArgs(model=str(embedded_dir), lora=str(tmp_path / "run" / "final")))
    with torch.no_grad():
        got = lm.model(input_ids=ids).logits.float()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.8


def test_bnb_4bit_type_without_4bit_quantization_is_refused():
    with pytest.raises(CuteGPTError, match=r"--bnb-4bit-type fp4 applies only with --quantization 4bit"):
        SFTConfig(model="m", data=["d"], out="o", bnb_4bit_type="fp4").check()
    with pytest.raises(CuteGPTError, match=r"--bnb-4bit-type fp4 applies only with --quantization 4bit"):
        SFTConfig(model="m", data=["d"], out="o", bnb_4bit_type="fp4", quantization="8bit").check()
    SFTConfig(model="m", data=["d"], out="o", bnb_4bit_type="fp4", quantization="4bit").check()


def test_validation_shows_progress_on_stderr(tiny_model_dir, sft_dataset, tmp_path, capfd):
    run_sft(_cfg(tiny_model_dir, sft_dataset, tmp_path / "run", val_ratio=0.25, eval_steps=2, max_steps=2))
    err = capfd.readouterr().err
    assert "validation:" in err and "/3 [" in err  # a bar over the 3 held-out rows
