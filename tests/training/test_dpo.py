"""`train dpo` on a tiny random LLaMA: each loss against a brute-force computation with plain transformers, the
reference model (base, SFT adapter), learning on a separable set, and the refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cutegpt.cli import main
from cutegpt.templates import CUTEGPT_STOP, CUTEGPT_SYSTEM
from cutegpt.training.dpo import PrefConfig, run_dpo
from tests.training.conftest import read_summary

PAIRS = [("中国的首都是哪里？", "北京。", "上海。"), ("Say hello.", "Hello!", "Go away."),
         ("2 + 3 = ?", "5", "7"), ("Name a colour.", "Blue.", "The quick brown fox.")]


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture()
def pairs_file(tmp_path) -> Path:
    return _write(tmp_path / "pairs.jsonl", [{"instruction": q, "chosen": c, "rejected": r} for q, c, r in PAIRS])


def _cfg(model_dir, data, out, **kw) -> PrefConfig:
    base = dict(model=str(model_dir), data=[str(data)], out=str(out), micro_batch=4, grad_accum=1, lr=1e-2, warmup_steps=0,
                max_steps=1, save_steps=1, precision="fp32", seed=0, logging_steps=1, template="cutegpt", report_to="none")
    base.update(kw)
    return PrefConfig(**base)


# ---------------------------------------------------------------- brute force, independent of data/pairs.py

def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _prompt(tok, q: str) -> list[int]:
    """The cutegpt prompt, each segment tokenized alone (as training and `data convert` do)."""
    return _ids(tok, CUTEGPT_SYSTEM) + _ids(tok, f"问：{q}\n答：\n")


def _answer(tok, a: str) -> list[int]:
    return _ids(tok, a + CUTEGPT_STOP) + [tok.eos_token_id]


def _chatml_prompt(tok, q: str) -> list[int]:
    """The tokenizer's own (ChatML) template, `--template auto`: one prompt segment."""
    return _ids(tok, f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")


def _chatml_answer(tok, a: str) -> list[int]:
    # the model's own template ends an answer at its end-of-turn token, no EOS (the newline after it opens the next turn)
    return _ids(tok, a + "<|im_end|>")


@torch.no_grad()
def _token_logps(model, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """log p of each answer token given everything before it, one unpadded sequence."""
    ids = torch.tensor([prompt + answer])
    logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    return logp.gather(-1, ids[0, 1:, None])[len(prompt) - 1:, 0]


def _base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _with_adapter(model_dir, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(_base(model_dir), str(adapter)).eval()


def _dpo_loss(policy, ref, tok, beta: float, pairs=PAIRS, chatml: bool = False) -> tuple[float, float, float]:
    """(mean DPO loss, mean chosen reward, mean rejected reward) over the pairs."""
    prompt, answer = (_chatml_prompt, _chatml_answer) if chatml else (_prompt, _answer)
    losses, rc, rr = [], [], []
    for q, c, r in pairs:
        p = prompt(tok, q)
        lc = _token_logps(policy, p, answer(tok, c)).sum() - _token_logps(ref, p, answer(tok, c)).sum()
        lr = _token_logps(policy, p, answer(tok, r)).sum() - _token_logps(ref, p, answer(tok, r)).sum()
        losses.append(-F.logsigmoid(beta * (lc - lr)))
        rc.append(beta * lc)
        rr.append(beta * lr)
    return float(torch.stack(losses).mean()), float(torch.stack(rc).mean()), float(torch.stack(rr).mean())


def _logged(out: Path, step: int) -> dict:
    state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return next(h for h in state["log_history"] if h.get("step") == step and "loss" in h)


# ---------------------------------------------------------------- the losses

def test_dpo_loss_equals_brute_force_from_summed_log_probs(tiny_model_dir, tiny_tokenizer, pairs_file, tmp_path, monkeypatch):
    """Step 1: policy == reference, log 2. Step 2: the policy is checkpoint-1's adapter, the reference the plain base;
    the logged loss and rewards equal a per-pair computation with plain transformers (no padding, no trl).
    The batches went through the one-row-per-pair layout (logprobs.pair_rows), policy and reference."""
    from cutegpt.training import logprobs

    paired, pair_rows = [], logprobs.pair_rows
    monkeypatch.setattr(logprobs, "pair_rows", lambda *a, **k: paired.append(pair_rows(*a, **k)) or paired[-1])
    out = tmp_path / "run"
    assert run_dpo(_cfg(tiny_model_dir, pairs_file, out, max_steps=2)) == 0
    assert len(paired) == 4 and all(layout is not None for layout in paired)  # 2 steps x (policy, reference)
    assert _logged(out, 1)["loss"] == pytest.approx(math.log(2), abs=1e-6)
    base = _base(tiny_model_dir)
    policy = _with_adapter(tiny_model_dir, out / "checkpoint-1")
    loss, chosen, rejected = _dpo_loss(policy, base, tiny_tokenizer, 0.1)
    step2 = _logged(out, 2)
    assert abs(loss - math.log(2)) > 1e-3  # the first update moved the policy: the comparison below means something
    assert step2["loss"] == pytest.approx(loss, abs=1e-5)
    assert step2["rewards/chosen"] == pytest.approx(chosen, abs=1e-5)
    assert step2["rewards/rejected"] == pytest.approx(rejected, abs=1e-5)
    summary = read_summary(out)
    assert summary["reference"] == "the base model with the adapter disabled" and summary["loss"] == "dpo"
    assert (out / "rewards.png").stat().st_size > 0 and not (out / "final" / "ref").exists()


@pytest.fixture()
def sft_adapter(tiny_model_dir, tmp_path) -> Path:
    """An SFT-like adapter: LoRA q/v with random (non-zero) B, so base + adapter != base."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(_base(tiny_model_dir), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                             task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    out = tmp_path / "sft-adapter"
    model.save_pretrained(out)
    return out


def test_sft_adapter_is_the_reference(tiny_model_dir, tiny_tokenizer, pairs_file, sft_adapter, tmp_path):
    """On top of an SFT adapter the first loss is log 2 with zero rewards; with the base as reference it would not be."""
    out = tmp_path / "run"
    assert run_dpo(_cfg(tiny_model_dir, pairs_file, out, lora=str(sft_adapter))) == 0
    first = _logged(out, 1)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6) and first["rewards/rejected"] == pytest.approx(0, abs=1e-6)
    wrong, chosen, _ = _dpo_loss(_with_adapter(tiny_model_dir, sft_adapter), _base(tiny_model_dir), tiny_tokenizer, 0.1)
    assert abs(wrong - math.log(2)) > 1e-3 and abs(chosen) > 1e-3  # what a base reference would have logged
    assert "SFT adapter" in read_summary(out)["reference"]
    assert (out / "checkpoint-1" / "adapter_model.safetensors").is_file()
    assert not (out / "checkpoint-1" / "ref").exists() and not (out / "final" / "ref").exists()  # trl's frozen copy
    # the trained adapter started from the SFT adapter: one small step away from it, far from a fresh (zero) one
    from safetensors.torch import load_file

    sft = load_file(sft_adapter / "adapter_model.safetensors")
    final = load_file(out / "final" / "adapter_model.safetensors")
    assert sft.keys() == final.keys()
    assert max((sft[k] - final[k]).abs().max().item() for k in sft) < 0.05
    assert max(sft[k].abs().max().item() for k in sft if "lora_B" in k) > 0.3


def _seq_avg(model, tok, q, a) -> torch.Tensor:
    lp = _token_logps(model, _prompt(tok, q), _answer(tok, a))
    return lp.mean()


def test_simpo_loss_equals_its_formula(tiny_model_dir, tiny_tokenizer, pairs_file, tmp_path):
    """SimPO (reference-free): -log σ(β (avg log p(chosen) - avg log p(rejected)) - γ), β 2.0, γ 0.5 by default."""
    out = tmp_path / "run"
    assert run_dpo(_cfg(tiny_model_dir, pairs_file, out, loss="simpo")) == 0
    base = _base(tiny_model_dir)
    want = torch.stack([-F.logsigmoid(2.0 * (_seq_avg(base, tiny_tokenizer, q, c) - _seq_avg(base, tiny_tokenizer, q, r)) - 0.5)
                        for q, c, r in PAIRS]).mean()
    assert _logged(out, 1)["loss"] == pytest.approx(float(want), abs=1e-5)
    assert read_summary(out)["reference"].startswith("none")


def test_orpo_loss_equals_its_formula(tiny_model_dir, tiny_tokenizer, pairs_file, tmp_path):
    """ORPO: NLL of the chosen sequences - λ mean log σ(log odds(chosen) - log odds(rejected)), odds from mean token
    log-probs. trl's NLL term covers the prompt tokens too (the paper's covers the answer): we test trl's definition."""
    out = tmp_path / "run"
    assert run_dpo(_cfg(tiny_model_dir, pairs_file, out, loss="orpo", beta=0.25)) == 0
    base = _base(tiny_model_dir)
    nll_sum, nll_n, ratios = 0.0, 0, []
    for q, c, r in PAIRS:
        p, a = _prompt(tok := tiny_tokenizer, q), _answer(tiny_tokenizer, c)
        whole = _token_logps(base, p[:1], p[1:] + a)  # every token after the first, prompt included
        nll_sum, nll_n = nll_sum - float(whole.sum()), nll_n + len(whole)
        lc, lr = _seq_avg(base, tok, q, c), _seq_avg(base, tok, q, r)
        log_odds = (lc - lr) - (torch.log1p(-lc.exp()) - torch.log1p(-lr.exp()))
        ratios.append(F.logsigmoid(log_odds))
    want = nll_sum / nll_n - 0.25 * float(torch.stack(ratios).mean())
    assert _logged(out, 1)["loss"] == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_simpo_and_orpo_on_the_answer_head_equal_trls_full_logits(tiny_model_dir, pairs_file, tmp_path, monkeypatch, loss):
    """Two steps on the answer-only head with one row per pair (logprobs.py) log what trl's own full-logits path
    logs: loss, rewards and ORPO's NLL, at the first step and after an update."""
    from cutegpt.training import logprobs

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    paired, pair_rows = [], logprobs.pair_rows
    with monkeypatch.context() as m:
        m.setattr(logprobs, "pair_rows", lambda *a, **k: paired.append(pair_rows(*a, **k)) or paired[-1])
        assert run_dpo(_cfg(tiny_model_dir, pairs_file, ours, loss=loss, max_steps=2)) == 0
    assert len(paired) == 2 and all(layout is not None for layout in paired)
    assert read_summary(ours)["loss_path"].startswith("trl, answer-only")
    with monkeypatch.context() as m:
        m.setattr(logprobs, "install", lambda *a, **k: False)  # trl's path: logits of every position
        assert run_dpo(_cfg(tiny_model_dir, pairs_file, theirs, loss=loss, max_steps=2)) == 0
    assert read_summary(theirs)["loss_path"] == "trl"
    keys = ["loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"] + (["nll_loss"] if loss == "orpo" else [])
    for step in (1, 2):
        a, b = _logged(ours, step), _logged(theirs, step)
        for key in keys:
            assert a[key] == pytest.approx(b[key], abs=1e-5), (step, key)
    assert _logged(ours, 2)["loss"] != pytest.approx(_logged(ours, 1)["loss"], abs=1e-4)  # the update moved the policy


def test_kto_loss_equals_its_formula(tiny_model_dir, tiny_tokenizer, tmp_path):
    """KTO at step 2 (policy = checkpoint-1's adapter, reference = base): desirable 1 - σ(β(r - z)), undesirable
    1 - σ(β(z - r)), z = the batch's KL estimate from mismatched answers (each prompt with the previous row's answer)."""
    rows = [{"instruction": q, "completion": c if i % 2 else r, "label": bool(i % 2)} for i, (q, c, r) in enumerate(PAIRS)]
    data = _write(tmp_path / "kto.jsonl", rows)
    out = tmp_path / "run"
    assert run_dpo(_cfg(tiny_model_dir, data, out, loss="kto", max_steps=2)) == 0
    assert _logged(out, 1)["loss"] == pytest.approx(0.5, abs=1e-6)
    base, policy, tok = _base(tiny_model_dir), _with_adapter(tiny_model_dir, out / "checkpoint-1"), tiny_tokenizer
    prompts = [_prompt(tok, r["instruction"]) for r in rows]
    answers = [_answer(tok, r["completion"]) for r in rows]
    ratio = [float(_token_logps(policy, p, a).sum() - _token_logps(base, p, a).sum()) for p, a in zip(prompts, answers)]
    mismatched = [answers[i - 1] for i in range(len(rows))]  # trl rotates the answers by one within the batch
    z = max(0.0, sum(float(_token_logps(policy, p, a).sum() - _token_logps(base, p, a).sum())
                     for p, a in zip(prompts, mismatched)) / len(rows))
    beta = 0.1
    losses = [1 - torch.sigmoid(torch.tensor(beta * (x - z))) if r["label"] else 1 - torch.sigmoid(torch.tensor(beta * (z - x)))
              for x, r in zip(ratio, rows)]
    assert abs(ratio[0]) > 1e-3
    assert _logged(out, 2)["loss"] == pytest.approx(float(torch.stack(losses).mean()), abs=1e-5)


def test_reward_accuracy_rises_on_a_separable_set(tiny_model_dir, tmp_path):
    """Chosen answers all say 'Yes', rejected ones 'No': the reward accuracy goes from 0 (step 1) above 0.9."""
    records = [{"instruction": f"Question {i}?", "chosen": f"Yes {i}.", "rejected": f"No {i}!"} for i in range(16)]
    data = _write(tmp_path / "sep.jsonl", records)
    out = tmp_path / "run"
    assert run_dpo(_cfg(tiny_model_dir, data, out, micro_batch=16, max_steps=15, save_steps=100, lr=2e-2)) == 0
    curve = read_summary(out)["rewards_accuracies_curve"]
    assert curve[0][1] == 0.0 and curve[-1][1] > 0.9, curve


# ---------------------------------------------------------------- refusals: one sentence, exit 1, nothing written

def _refused(capsys, out: Path, argv: list[str], message: str) -> None:
    capsys.readouterr()  # the fixtures' own output
    assert main(argv) == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("cutegpt: ")]  # info lines
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("records,flags,message", [
    ([{"instruction": "Q", "chosen": "Same.", "rejected": "Same."}], [], "line 1: fields 'chosen' and 'rejected' are the same answer"),
    ([{"instruction": "Q", "chosen": "  ", "rejected": "No."}], [], "line 1: field 'chosen' is empty"),
    ([{"instruction": "long " * 80, "chosen": "Yes.", "rejected": "No."}], ["--max-length", "32"],
     "which leaves no room for an answer within --max-length 32"),
    ([{"instruction": "Q", "completion": "Yes.", "label": True}, {"instruction": "R", "completion": "Ok.", "label": True}],
     ["--loss", "kto"], "every KTO record is desirable (label true); KTO needs both kinds"),
    ([{"instruction": "Q", "chosen": "Yes.", "rejected": "No."}], ["--loss", "kto"], "--loss kto reads completion/label records"),
    ([{"instruction": "Q", "chosen": "Yes.", "rejected": "No."}], ["--simpo-gamma", "1"], "--simpo-gamma is a setting of --loss simpo, not of --loss dpo"),
    ([{"instruction": "Q", "chosen": "Yes.", "rejected": "No."}], ["--loss", "orpo", "--desirable-weight", "2"],
     "--desirable-weight is a setting of --loss kto"),
    ([{"instruction": "Q", "chosen": "Yes.", "rejected": "No."}], ["--loss", "simpo", "--precompute-ref"],
     "--precompute-ref: --loss simpo is reference-free"),
])
def test_bad_input_is_one_sentence_and_writes_nothing(tiny_model_dir, tmp_path, capsys, records, flags, message):
    data = _write(tmp_path / "data.jsonl", records)
    out = tmp_path / "run"
    _refused(capsys, out, ["train", "dpo", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out),
                           "--template", "cutegpt", "--report-to", "none", *flags], message)


def test_sft_adapter_from_another_base_is_refused(tiny_model_dir, sft_adapter, pairs_file, tmp_path, capsys):
    from tests.tiny import build_tiny_llama, build_tokenizer

    other = tmp_path / "other-base"
    build_tiny_llama(other, vocab_size=len(build_tokenizer(other)), seed=7)
    out = tmp_path / "run"
    _refused(capsys, out, ["train", "dpo", "--model", str(other), "--lora", str(sft_adapter), "--data", str(pairs_file),
                           "--out", str(out), "--template", "cutegpt", "--report-to", "none"],
             f"--lora {sft_adapter} was trained on {tiny_model_dir}, not on {other}")


# ---------------------------------------------------------------- reference strategies, validation, resume

def test_full_tuning_frozen_copy_and_precomputed_reference_agree(tiny_model_dir, tiny_tokenizer, pairs_file, tmp_path):
    """Full tuning: the reference is a frozen copy of the model, or its log-probs computed once; same losses, and the
    step-2 loss equals the brute force with checkpoint-1's full weights against the base (the tokenizer's ChatML
    template: with `cutegpt` full tuning makes <end> a new token, which the plain base has no row for)."""
    from transformers import AutoModelForCausalLM

    runs = {}
    for name, extra in (("copy", {}), ("pre", {"precompute_ref": True})):
        out = tmp_path / name
        assert run_dpo(_cfg(tiny_model_dir, pairs_file, out, method="full", lr=1e-3, max_steps=2, template="auto", **extra)) == 0
        runs[name] = (_logged(out, 1), _logged(out, 2), read_summary(out)["reference"])
    assert runs["copy"][2] == "a frozen copy of the initial model"
    assert runs["pre"][2].startswith("log-probabilities of the initial model, computed once")
    for step in (0, 1):
        assert runs["copy"][step]["loss"] == pytest.approx(runs["pre"][step]["loss"], abs=1e-6)
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "copy" / "checkpoint-1", dtype=torch.float32).eval()
    loss, _, _ = _dpo_loss(policy, _base(tiny_model_dir), tiny_tokenizer, 0.1, chatml=True)
    assert abs(loss - math.log(2)) > 1e-3 and runs["copy"][1]["loss"] == pytest.approx(loss, abs=1e-5)


def test_validation_loss_and_keep_best(tiny_model_dir, tiny_tokenizer, tmp_path):
    """--val-ratio holds out whole pairs; the validation loss at the last step equals the brute force on them with
    final/; --keep-best keeps the lowest; the result loads with chat's loader and its template."""
    from cutegpt.model.loading import ModelArgs, load_model
    from cutegpt.training.validation import choose

    records = [{"instruction": q, "chosen": c, "rejected": r} for q, c, r in PAIRS * 2]
    data = _write(tmp_path / "pairs.jsonl", records)
    out = tmp_path / "run"
    assert run_dpo(_cfg(tiny_model_dir, data, out, max_steps=3, val_ratio=0.25, eval_steps=1, keep_best=True,
                        save_steps=100, micro_batch=6)) == 0
    summary = read_summary(out)
    val = summary["val_loss_curve"]
    assert [s for s, _ in val] == [1, 2, 3] and len(summary["val_rewards_accuracies_curve"]) == 3
    held = sorted(choose(len(records), 0.25, 0))
    held_pairs = [(records[i]["instruction"], records[i]["chosen"], records[i]["rejected"]) for i in held]
    want, _, _ = _dpo_loss(_with_adapter(tiny_model_dir, out / "final"), _base(tiny_model_dir), tiny_tokenizer, 0.1, held_pairs)
    assert val[-1][1] == pytest.approx(want, abs=1e-5)
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["eval_loss"] == pytest.approx(min(v for _, v in val), abs=1e-9)
    loaded = load_model(ModelArgs(model=str(tiny_model_dir), lora=str(out / "final")))
    assert loaded.template.name == "cutegpt"


def test_precomputed_reference_with_lora_matches_the_disabled_adapter(tiny_model_dir, pairs_file, tmp_path):
    got = {}
    for name, extra in (("live", {}), ("pre", {"precompute_ref": True})):
        assert run_dpo(_cfg(tiny_model_dir, pairs_file, tmp_path / name, max_steps=2, **extra)) == 0
        got[name] = [loss for _, loss in read_summary(tmp_path / name)["loss_curve"]]
    assert got["live"] == pytest.approx(got["pre"], abs=1e-6)


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_curve(tiny_model_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from cutegpt.training import checkpoints

    records = [{"instruction": f"Question {i}?", "chosen": f"Yes {i}.", "rejected": f"No {i}!"} for i in range(8)]
    data = _write(tmp_path / "pairs.jsonl", records)
    flags = ["--model", str(tiny_model_dir), "--data", str(data), "--micro-batch", "2", "--grad-accum", "1", "--lr", "5e-3",
             "--warmup-steps", "2", "--lr-scheduler", "linear", "--max-steps", "16", "--save-steps", "3", "--precision", "fp32",
             "--seed", "3", "--threads", "1", "--template", "cutegpt", "--report-to", "none"]
    ref = tmp_path / "ref"
    assert main(["train", "dpo", *flags, "--out", str(ref)]) == 0
    want = dict(read_summary(ref)["loss_curve"])
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "cutegpt", "train", "dpo", *flags, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 300
    while not checkpoints.complete_checkpoints(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    k = int(checkpoints.complete_checkpoints(out)[-1].name.split("-")[1])
    assert k < 14
    assert main(["train", "dpo", *flags, "--out", str(out), "--resume"]) == 0
    got = dict(read_summary(out)["loss_curve"])
    assert sorted(got) == sorted(want)
    for step in range(k + 1, 17):
        assert got[step] == pytest.approx(want[step], abs=1e-6), step


@pytest.mark.slow
@pytest.mark.parametrize("deepspeed", [None, "ds_zero1_cpu.json"])
def test_two_processes_match_one(tiny_model_dir, tmp_path, deepspeed):
    """torchrun with 2 processes x micro-batch 2 (DDP, or DeepSpeed ZeRO-1 on gloo) = 1 process x micro-batch 4."""
    import os
    import subprocess
    import sys

    from cutegpt.training.ds_config import free_port

    root = Path(__file__).resolve().parents[2]
    records = [{"instruction": f"Question {i}?", "chosen": f"Yes {i}.", "rejected": f"No {i}!"} for i in range(8)]
    data = _write(tmp_path / "pairs.jsonl", records)
    flags = ["--model", str(tiny_model_dir), "--data", str(data), "--grad-accum", "1", "--lr", "5e-3", "--warmup-steps", "0",
             "--max-steps", "4", "--save-steps", "2", "--precision", "fp32", "--seed", "0", "--threads", "1",
             "--template", "cutegpt", "--report-to", "none", *(["--deepspeed", str(root / "configs" / deepspeed)] if deepspeed else [])]
    assert main(["train", "dpo", *flags, "--micro-batch", "4", "--out", str(tmp_path / "one")]) == 0
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "-m", "cutegpt", "train", "dpo", *flags, "--micro-batch", "2", "--out", str(tmp_path / "two")]
    env = dict(os.environ, PYTHONPATH=str(root / "src"), OMP_NUM_THREADS="1")
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = read_summary(tmp_path / "one"), read_summary(tmp_path / "two")
    assert two["processes"] == 2
    assert [s for s, _ in two["loss_curve"]] == [s for s, _ in one["loss_curve"]] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(two["loss_curve"], one["loss_curve"]):
        assert a == pytest.approx(b, abs=1e-5)
    for (_, a), (_, b) in zip(two["rewards_margins_curve"], one["rewards_margins_curve"]):
        assert a == pytest.approx(b, abs=1e-5)


def test_dpo_adapter_is_portable(tiny_model_dir, pairs_file, tmp_path):
    """The adapter trl creates records its base like an SFT adapter (name + fingerprint): copied elsewhere, --lora
    alone loads it with the same logits; a base of the same shape with other weights is refused."""
    import shutil

    from cutegpt.errors import CuteGPTError
    from cutegpt.model.loading import ModelArgs, load_model
    from tests.tiny import build_tiny_llama

    out = tmp_path / "run"
    assert run_dpo(_cfg(tiny_model_dir, pairs_file, out, max_steps=2, save_steps=100)) == 0
    record = json.loads((out / "final" / "cutegpt_training.json").read_text())
    assert record["base_model"] == str(tiny_model_dir) and record["base_fingerprint"]["structure"]
    assert json.loads((out / "final" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    moved = tmp_path / "elsewhere" / "dpo-adapter"
    shutil.copytree(out / "final", moved)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])
    with torch.no_grad():
        want = load_model(ModelArgs(model=str(tiny_model_dir), lora=str(out / "final"))).model(input_ids=ids).logits
        after = load_model(ModelArgs(lora=str(moved)))
        assert after.model_path == tiny_model_dir
        torch.testing.assert_close(after.model(input_ids=ids).logits, want, atol=0, rtol=0)
        assert (_base(tiny_model_dir)(input_ids=ids).logits - want).abs().max() > 1e-5  # the adapter is on
    other = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other)
    build_tiny_llama(other, vocab_size=json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"], seed=7)
    with pytest.raises(CuteGPTError, match="same shape but other weights"):
        load_model(ModelArgs(model=str(other), lora=str(moved)))


def test_tokenized_pairs_are_cached_with_a_manifest(tiny_model_dir, tiny_tokenizer, pairs_file, tmp_path, monkeypatch):
    """Tokenized once: the second run reuses the rows (the encoder is not called) and reports the same cuts; other
    lengths, another template or other file bytes make a new cache; a broken cache is made again."""
    import logging

    from cutegpt.data import pairs
    from cutegpt.training.dpo import pref_rows

    class Lines(logging.Handler):  # the run's logger may not propagate to pytest's (setup_logging)
        lines: list[str] = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    handler = Lines(logging.INFO)
    logger = logging.getLogger("cutegpt.training")
    monkeypatch.setattr(logger, "level", logging.INFO)
    monkeypatch.setattr(logger, "handlers", [*logger.handlers, handler])  # both restored by monkeypatch
    monkeypatch.setenv("CUTEGPT_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path / "run", max_length=24, max_prompt_length=20)
    first = pref_rows(cfg, cfg.data, tiny_tokenizer, "cutegpt", "training")
    made = "\n".join(handler.lines)
    assert "truncated prompts" in made and "reused" not in made
    [folder] = (tmp_path / "cache" / "datasets").iterdir()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["template"] == "cutegpt" and manifest["max_length"] == 24 and manifest["max_prompt_length"] == 20
    assert manifest["tokenizer"]["vocab_hash"] and manifest["counts"]["rows"] == len(PAIRS)
    assert manifest["counts"]["truncated_prompts"] == len(PAIRS)  # the system line alone is longer than 20 tokens
    assert manifest["lengths"]["prompt"]["max"] == 20

    def never(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(pairs.PrefEncoder, "encode", never)
    handler.lines.clear()
    assert pref_rows(cfg, cfg.data, tiny_tokenizer, "cutegpt", "training") == first
    again = "\n".join(handler.lines)
    assert "reused" in again and f"{len(PAIRS)} truncated prompts" in again
    for changed, template in ((_cfg(tiny_model_dir, pairs_file, tmp_path / "run", max_length=30, max_prompt_length=20), "cutegpt"),
                              (cfg, "auto")):
        with pytest.raises(AssertionError, match="tokenized again"):
            pref_rows(changed, changed.data, tiny_tokenizer, template, "training")
    pairs_file.write_text(pairs_file.read_text() + json.dumps({"instruction": "x", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(AssertionError, match="tokenized again"):
        pref_rows(cfg, cfg.data, tiny_tokenizer, "cutegpt", "training")
    monkeypatch.undo()
    monkeypatch.setenv("CUTEGPT_CACHE", str(tmp_path / "cache2"))
    pref_rows(cfg, cfg.data, tiny_tokenizer, "cutegpt", "training")
    [folder] = (tmp_path / "cache2" / "datasets").iterdir()
    (folder / "manifest.json").write_text("{broken")
    assert len(pref_rows(cfg, cfg.data, tiny_tokenizer, "cutegpt", "training")) == len(PAIRS) + 1
    assert json.loads((folder / "manifest.json").read_text())["counts"]["rows"] == len(PAIRS) + 1
