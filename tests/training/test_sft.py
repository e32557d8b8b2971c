"""`train sft` on a tiny random LLaMA: learning, saving, loading, guards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cutegpt.errors import CuteGPTError
from cutegpt.model.loading import ModelArgs, load_model
from cutegpt.templates import add_stop_token
from cutegpt.training import checkpoints, engine, prepare
from cutegpt.training.sft import SFTConfig, prepare_sft, run_sft
from tests.training.conftest import encode_samples, read_summary, write_dataset


def _cfg(model_dir, data, out, **kw) -> SFTConfig:
    base = dict(model=str(model_dir), data=[str(data)], out=str(out), micro_batch=4, grad_accum=1, lr=1e-2,
                warmup_steps=0, max_steps=30, save_steps=1000, precision="fp32", seed=0, logging_steps=1)
    base.update(kw)
    return SFTConfig(**base)


def _probe(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer("问：中国的首都是哪里？\n答：\n北京。", add_special_tokens=False)["input_ids"]])


@pytest.mark.parametrize("method,lr", [("lora", 1e-2), ("full", 3e-3)])
def test_loss_falls(tiny_model_dir, sft_dataset, sft_dataset_end, tmp_path, method, lr):
    data = sft_dataset if method == "lora" else sft_dataset_end
    assert run_sft(_cfg(tiny_model_dir, data, tmp_path / "run", method=method, lr=lr)) == 0
    curve = [loss for _, loss in read_summary(tmp_path / "run")["loss_curve"]]
    assert len(curve) == 30
    first, last = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
    assert last < first - 1.0, (first, last)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0
    assert any((tmp_path / "run" / "runs").rglob("events.out.tfevents*"))


def test_adapter_round_trip_and_merged_export(tiny_model_dir, sft_dataset, tmp_path):
    """The saved adapter, loaded by chat's loader, gives the trained model's logits; so does the merged export."""
    cfg = _cfg(tiny_model_dir, sft_dataset, tmp_path / "run", max_steps=12, save_steps=6)
    kept = {}

    def prepare(check_rows):
        kept["prep"] = prepare_sft(cfg, check_rows)
        return kept["prep"]

    engine.train(cfg, prepare)
    trained = kept["prep"].model.eval()
    ids = _probe(kept["prep"].tokenizer)
    with torch.no_grad():
        want = trained(input_ids=ids).logits
    base = load_model(ModelArgs(model=str(tiny_model_dir)))
    with torch.no_grad():
        assert (base.model(input_ids=ids).logits - want).abs().max() > 1e-3  # training changed something

    for folder in (tmp_path / "run" / "final", tmp_path / "run" / "checkpoint-12"):
        lm = load_model(ModelArgs(model=str(tiny_model_dir), lora=str(folder)))
        assert lm.template.name == "cutegpt"  # from the model card: no --template needed
        with torch.no_grad():
            torch.testing.assert_close(lm.model(input_ids=ids).logits, want, atol=1e-5, rtol=0)

    from cutegpt.export.cli import ExportConfig, run_export

    merged = tmp_path / "merged"
    assert run_export(ExportConfig(model=str(tiny_model_dir), lora=str(tmp_path / "run" / "final"), out=str(merged), dtype="float32")) == 0
    lm = load_model(ModelArgs(model=str(merged)))
    assert lm.template.name == "cutegpt"
    assert not any("lora" in n for n, _ in lm.model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(lm.model(input_ids=ids).logits, want, atol=2e-4, rtol=0)
    with pytest.raises(CuteGPTError, match="already exists"):  # checked before anything loads (parse_config runs check())
        ExportConfig(model=str(tiny_model_dir), lora=str(tmp_path / "run" / "final"), out=str(merged)).check()


def test_checkpoints_are_atomic_and_rotated(tiny_model_dir, sft_dataset, tmp_path):
    out = tmp_path / "run"
    run_sft(_cfg(tiny_model_dir, sft_dataset, out, max_steps=8, save_steps=2, save_total_limit=2))
    names = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-6", "checkpoint-8"]
    assert not (out / ".staging").exists()
    for name in names:
        assert json.loads((out / name / "cutegpt.json").read_text())["template"] == "cutegpt"
    # a second run into the same folder must not overwrite it by accident
    with pytest.raises(CuteGPTError, match="--resume"):
        run_sft(_cfg(tiny_model_dir, sft_dataset, out, max_steps=8))


def test_full_tuning_adds_end_token(tiny_model_dir, tiny_tokenizer, tmp_path):
    """--method full with the cutegpt template: <end> is one special token, new rows ~ N(0, 1e-6), 16-bit save."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tok("<end>", add_special_tokens=False)["input_ids"]) > 1
    assert add_stop_token(tok)
    end_id = tok.convert_tokens_to_ids("<end>")
    data = write_dataset(tmp_path / "data", tok, encode_samples(tok), 128)

    cfg = _cfg(tiny_model_dir, data, tmp_path / "run", method="full", max_steps=1, lr=1e-12)
    prep = prepare_sft(cfg)
    emb = prep.model.get_input_embeddings().weight
    assert emb.shape[0] == len(tok) == end_id + 1
    assert emb[end_id].abs().max() < 1e-5 and emb[end_id].abs().max() > 0

    run_sft(cfg)
    final = tmp_path / "run" / "final"
    lm = load_model(ModelArgs(model=str(final)))
    assert lm.tokenizer("<end>", add_special_tokens=False)["input_ids"] == [end_id]
    assert lm.template.name == "cutegpt"
    from safetensors import safe_open

    with safe_open(str(next(final.glob("*.safetensors"))), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}

    # data tokenized with <end> as several tokens is refused for full tuning, with the reason
    with pytest.raises(CuteGPTError, match="<end> as several tokens"):
        prepare_sft(_cfg(tiny_model_dir, write_dataset(tmp_path / "plain", tiny_tokenizer, encode_samples(tiny_tokenizer), 128),
                         tmp_path / "run2", method="full"))


def test_tokenizer_mismatch_refused_before_loading(tiny_model_dir, tmp_path, monkeypatch):
    from tests.tiny import build_tokenizer

    other = build_tokenizer(tmp_path / "other-tok", chat_template=False)
    other.add_tokens(["额外"])
    data = write_dataset(tmp_path / "data", other, encode_samples(other), 128)
    monkeypatch.setattr(prepare, "load_for_training", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(CuteGPTError, match="tokenized with .*convert the data again"):
        run_sft(_cfg(tiny_model_dir, data, tmp_path / "run"))


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tiny_model_dir, sft_dataset, tmp_path, monkeypatch):
    from cutegpt.training import loss as loss_mod

    real = loss_mod.causal_lm_loss
    calls = {"n": 0}

    def poisoned(*a, **kw):
        calls["n"] += 1
        loss, n = real(*a, **kw)
        return (loss * float("nan") if calls["n"] == 5 else loss), n

    monkeypatch.setattr(loss_mod, "causal_lm_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(CuteGPTError, match=r"loss became nan at step 5.*checkpoint-4"):
        run_sft(_cfg(tiny_model_dir, sft_dataset, out, max_steps=10, save_steps=2))
    assert [p.name for p in checkpoints.complete_checkpoints(out)] == ["checkpoint-3", "checkpoint-4"]  # 3 = epoch end; two kept by default
    assert not (out / "final").exists()


def test_deepspeed_file_values_become_settings():
    from cutegpt.training.ds_config import read_ds_config, reconcile

    root = Path(__file__).resolve().parents[2] / "configs"
    ds, s = reconcile(read_ds_config(root / "ds_lora_zero1.json"),
                      {"micro_batch": None, "grad_accum": 4, "lr": None, "warmup_steps": None, "adam_betas": None,
                       "adam_eps": None, "weight_decay": None, "max_grad_norm": None, "precision": "auto"},
                      on_cpu=True, source="test")
    assert s["micro_batch"] == 2 and s["grad_accum"] == 4  # the flag wins over the file
    assert s["lr"] == 3e-4 and s["warmup_steps"] == 300 and s["adam_betas"] == [0.98, 0.999] and s["adam_eps"] == 1e-9
    assert s["precision"] == "bf16"
    assert "optimizer" not in ds and ds["scheduler"]["params"]["warmup_min_lr"] == 1e-4
    assert ds["train_micro_batch_size_per_gpu"] == "auto" and ds["scheduler"]["params"]["warmup_max_lr"] == "auto"
    ds, _ = reconcile(read_ds_config(root / "ds_full_zero1_offload.json"), s, on_cpu=True, source="test")
    assert "offload_optimizer" not in ds["zero_optimization"]
    ds, _ = reconcile(read_ds_config(root / "ds_full_zero1_offload.json"), s, on_cpu=False, source="test")
    assert ds["optimizer"]["params"]["lr"] == "auto" and "offload_optimizer" in ds["zero_optimization"]


def test_yaml_run_configs_parse_and_flags_win():
    from cutegpt.config import parse_config
    from cutegpt.training.pt import PTConfig

    root = Path(__file__).resolve().parents[2] / "configs"
    cfg = parse_config(SFTConfig, ["--config", str(root / "sft_lora.yaml"), "--data", "d", "--lr", "1e-4"], prog="t")
    assert (cfg.method, cfg.lora_r, cfg.lora_targets, cfg.lr, cfg.data) == ("lora", 8, ["q_proj", "v_proj"], 1e-4, ["d"])
    assert parse_config(SFTConfig, ["--config", str(root / "sft_full.yaml")], prog="t").method == "full"
    assert parse_config(PTConfig, ["--config", str(root / "pt_lora_vocab.yaml")], prog="t").modules_to_save == ["embed_tokens", "lm_head"]


def test_full_tuning_on_data_converted_with_add_stop_token(tiny_model_dir, tmp_path):
    """`data convert --add-stop-token` makes exactly the tokenizer `--method full` trains with."""
    import pickle

    from cutegpt.data.convert import ConvertConfig, convert
    from cutegpt.data.manifest import load_dataset

    src = tmp_path / "ift.pkl"
    src.write_bytes(pickle.dumps([[{"instruction": "中国的首都是哪里？", "input": "", "output": "北京。"}],
                                  [{"instruction": "1+1=?", "input": "", "output": "2"}]]))
    data = convert(ConvertConfig(input=str(src), out=str(tmp_path / "ds"), model=str(tiny_model_dir),
                                 max_length=128, add_stop_token=True))
    prep = prepare_sft(_cfg(tiny_model_dir, data, tmp_path / "run", method="full", max_steps=1))
    end_id = prep.tokenizer.convert_tokens_to_ids("<end>")
    ds, _ = load_dataset(data)
    trained = [t for row in ds for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    assert trained.count(end_id) == 2  # one <end> token closes each answer


@pytest.mark.parametrize("method", ["lora", "full"])
def test_chunked_loss_trains_like_full_logits(tiny_model_dir, sft_dataset, sft_dataset_end, tmp_path, monkeypatch, method):
    """The loss inside the model's forward (so DDP/DeepSpeed use it too) gives transformers' loss curve."""
    from tests.training.conftest import read_summary

    data = sft_dataset_end if method == "full" else sft_dataset  # full training makes <end> one token
    run_sft(_cfg(tiny_model_dir, data, tmp_path / "chunked", method=method, max_steps=4, lr=3e-3))
    monkeypatch.setenv("CUTEGPT_FULL_LOGITS", "1")
    run_sft(_cfg(tiny_model_dir, data, tmp_path / "full", method=method, max_steps=4, lr=3e-3))
    ours, ref = read_summary(tmp_path / "chunked"), read_summary(tmp_path / "full")
    assert ours["loss_path"] == "chunked" and ref["loss_path"] == "full logits"
    assert [s for s, _ in ours["loss_curve"]] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(ours["loss_curve"], ref["loss_curve"]):
        assert a == pytest.approx(b, abs=1e-4)


def test_bf16_lora_computes_in_bf16(tiny_model_dir, sft_dataset, tmp_path, monkeypatch):
    """--precision bf16 LoRA: the frozen base is loaded in bf16 (no fp32 copy), the adapter stays fp32, and the loss
    sees bf16 hidden states (the loss runs inside the autocast the Trainer puts around the model's forward)."""
    from cutegpt.training import loss as loss_mod

    seen = []
    real = loss_mod._LinearCrossEntropy.apply
    monkeypatch.setattr(loss_mod._LinearCrossEntropy, "apply", lambda h, *a: seen.append(h.dtype) or real(h, *a))
    kept = {}

    def prepare(check_rows):
        kept["prep"] = prepare_sft(cfg, check_rows)
        return kept["prep"]

    cfg = _cfg(tiny_model_dir, sft_dataset, tmp_path / "run", precision="bf16", max_steps=2)
    engine.train(cfg, prepare)
    model = kept["prep"].model
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    assert seen and set(seen) == {torch.bfloat16}


def test_sentencepiece_data_from_before_the_rule_fix_is_refused(tmp_path, monkeypatch):
    """A manifest without the ids fingerprint, from a SentencePiece model: converted with transformers 5's drifted rule."""
    from cutegpt.data.manifest import MANIFEST
    from cutegpt.model.tokenizer import load_tokenizer
    from tests.tiny import build_sp_layout, build_tiny_llama

    model_dir = build_sp_layout(tmp_path / "sp-llama", "llama1", end=False)
    tok = load_tokenizer(model_dir)
    build_tiny_llama(model_dir, vocab_size=len(tok))
    data = write_dataset(tmp_path / "data", tok, encode_samples(tok), 128)
    monkeypatch.setattr(prepare, "load_for_training", lambda *a, **k: pytest.fail("the model was loaded"))
    run = lambda: prepare_sft(_cfg(model_dir, data, tmp_path / "run"))  # noqa: E731
    manifest = json.loads((data / MANIFEST).read_text())
    manifest["tokenizer"]["ids_hash"] = "0" * 16  # another rule than this tokenizer's
    (data / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CuteGPTError, match="tokenized by another rule .*convert the data again"):
        run()
    del manifest["tokenizer"]["ids_hash"]  # a dataset converted before the fix
    (data / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CuteGPTError, match="converted before cutegpt tokenized SentencePiece vocabularies as SentencePiece itself does"
                                           ".*convert the data again"):
        run()


def test_byte_level_data_from_before_the_fingerprint_still_trains(tiny_model_dir, tiny_tokenizer, tmp_path):
    from cutegpt.data.manifest import MANIFEST, check_tokenizer

    data = write_dataset(tmp_path / "data", tiny_tokenizer, encode_samples(tiny_tokenizer), 128)
    manifest = json.loads((data / MANIFEST).read_text())
    del manifest["tokenizer"]["ids_hash"]
    check_tokenizer(manifest, tiny_tokenizer, data)  # nothing changed for byte-level BPE: accepted


def test_partial_checkpointing_recomputes_only_what_it_says_and_keeps_the_loss_curve(tiny_model_dir, sft_dataset, tmp_path, monkeypatch):
    """--checkpoint-every 2 recomputes layer 0 of 2 in the backward pass, --checkpoint-keep matmuls reruns the layers
    without their matrix products, and every loss equals the run without checkpointing (dropout 0.05 is replayed)."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    calls: dict[int, int] = {}
    real = LlamaAttention.forward  # the attention, not the layer: the layer's forward is the checkpointing wrapper

    def counted(self, *a, **kw):
        calls[self.layer_idx] = calls.get(self.layer_idx, 0) + 1
        return real(self, *a, **kw)

    monkeypatch.setattr(LlamaAttention, "forward", counted)
    curves, runs = {}, {"plain": {}, "every layer": dict(gradient_checkpointing=True),
                        "every 2": dict(gradient_checkpointing=True, checkpoint_every=2),
                        "matmuls kept": dict(gradient_checkpointing=True, checkpoint_keep="matmuls")}
    for name, kw in runs.items():
        calls.clear()
        run_sft(_cfg(tiny_model_dir, sft_dataset, tmp_path / name.replace(" ", "-"), max_steps=4, lr=3e-3, lora_dropout=0.05, **kw))
        curves[name] = [loss for _, loss in read_summary(tmp_path / name.replace(" ", "-"))["loss_curve"]]
        runs[name] = dict(calls)
    micro_batches = runs["plain"][0]
    assert runs["plain"] == {0: micro_batches, 1: micro_batches}
    assert runs["every layer"] == {0: 2 * micro_batches, 1: 2 * micro_batches}
    assert runs["every 2"] == {0: 2 * micro_batches, 1: micro_batches}
    assert runs["matmuls kept"] == runs["every layer"]  # the layers run again, their matrix products do not (below)
    assert len(curves["plain"]) == 4
    for name in ("every layer", "every 2", "matmuls kept"):
        assert curves[name] == pytest.approx(curves["plain"], abs=1e-4)


def test_partial_checkpointing_needs_checkpointing(tiny_model_dir, sft_dataset, tmp_path):
    with pytest.raises(CuteGPTError, match="--checkpoint-every 2 .* add --gradient-checkpointing"):
        _cfg(tiny_model_dir, sft_dataset, tmp_path / "run", checkpoint_every=2).check()
    with pytest.raises(CuteGPTError, match="--checkpoint-keep matmuls .* add --gradient-checkpointing"):
        _cfg(tiny_model_dir, sft_dataset, tmp_path / "run", checkpoint_keep="matmuls").check()


def test_keeping_matmuls_recomputes_no_matrix_product():
    """Under --checkpoint-keep matmuls the backward pass of a checkpointed MLP runs no forward matmul again: the
    matrix products counted in forward + backward equal those without checkpointing, and the gradients are equal."""
    from torch.utils.checkpoint import checkpoint
    from torch.utils.flop_counter import FlopCounterMode

    from cutegpt.training.checkpointing import matmuls_context

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.SiLU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16))
    x = torch.randn(8, 16, requires_grad=True)

    def run(**kw):
        torch.manual_seed(1)
        mlp.zero_grad()
        x.grad = None
        with FlopCounterMode(display=False) as flops:
            out = checkpoint(mlp, x, **kw) if kw else mlp(x)
            out.square().sum().backward()
        return flops.get_total_flops(), x.grad.clone(), mlp[0].weight.grad.clone()

    plain, everything, kept = run(), run(use_reentrant=False), run(use_reentrant=False, context_fn=matmuls_context)
    assert everything[0] > plain[0]  # full checkpointing runs both matmuls again
    assert kept[0] == plain[0]
    for a, b in zip(plain[1:], kept[1:]):
        torch.testing.assert_close(a, b)
