"""The memory plan: from config.json alone, parts that add up, advice that fits; within 25% of the measured peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cutegpt.training.args import training_weight_dtype
from cutegpt.training.prepare import resolve_precision
from cutegpt.training.plan import GiB, PlanInput, estimate, format_plan, read_shape, suggestions
from cutegpt.training.sft import SFTConfig, run_sft

ROOT = Path(__file__).resolve().parents[2]


def llama13b(tmp_path: Path, vocab: int) -> Path:
    folder = tmp_path / f"llama-13b-{vocab}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824,
        "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": vocab,
        "tie_word_embeddings": False}))
    return folder


@pytest.mark.parametrize("vocab", [32000, 70000])
def test_13b_plan_from_config_alone(tmp_path, vocab, capsys):
    folder = llama13b(tmp_path, vocab)  # config.json only: no weights, no tokenizer
    shape = read_shape(folder)
    assert shape.total == pytest.approx(13.016e9 + 2 * (vocab - 32000) * 5120, rel=1e-3)
    run_sft(SFTConfig(model=str(folder), plan=True, max_length=2048, micro_batch=1, precision="bf16",
                      device_memory_gb=24, quantization="4bit", gradient_checkpointing=True))
    out = capsys.readouterr().out
    for part in ("weights", "gradients", "optimizer states", "activations", "LoRA/quantization overhead", "expected peak"):
        assert part in out, out
    lora16 = estimate(shape, PlanInput(method="lora", weight_dtype="bfloat16", seq_len=2048, micro_batch=1, device="cuda"))
    qlora = estimate(shape, PlanInput(method="lora", quantization="4bit", seq_len=2048, micro_batch=1,
                                      gradient_checkpointing=True, device="cuda"))
    full = estimate(shape, PlanInput(method="full", seq_len=2048, micro_batch=1, device="cuda"))  # fp32 master weights
    assert lora16.parts["weights"] == pytest.approx(2 * shape.total)  # the frozen base in bf16, as train loads it
    assert qlora.peak < 24 * GiB < lora16.peak < full.peak
    assert full.parts["optimizer states"] == pytest.approx(8 * shape.total)
    # the extended vocabulary costs its embedding and output rows (fp32 under QLoRA)
    (tmp_path / "ref").mkdir()
    ref = estimate(read_shape(llama13b(tmp_path / "ref", 32000)), qlora.inp)
    assert qlora.parts["weights"] - ref.parts["weights"] == pytest.approx(2 * (vocab - 32000) * 5120 * 4)


def test_advice_when_it_does_not_fit(tmp_path, capsys):
    shape = read_shape(llama13b(tmp_path, 32000))
    inp = PlanInput(method="lora", seq_len=2048, micro_batch=4, device="cuda")
    fix = suggestions(shape, inp, 24 * GiB)
    assert fix and all("--quantization 4bit" in f for f in fix)
    text = format_plan(estimate(shape, inp), 24 * GiB)
    assert "does not fit" in text and "--quantization 4bit" in text
    assert "with --gradient-checkpointing" in text


def test_plan_with_zero_uses_deepspeed_estimator(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    shape = read_shape(llama13b(tmp_path, 32000))
    plan = estimate(shape, PlanInput(method="full", seq_len=512, micro_batch=1, zero_stage=2, processes=4, device="cuda"))
    want = estimate_zero2_model_states_mem_needs(shape.total, num_gpus_per_node=4, cpu_offload=False)[1]
    assert plan.parts["model states (DeepSpeed estimator)"] == want


def test_bad_config_is_one_sentence(tmp_path):
    from cutegpt.errors import CuteGPTError

    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": "big"}))
    with pytest.raises(CuteGPTError, match=r"'hidden_size' must be a positive integer, not 'big'"):
        read_shape(tmp_path)


# ---------------------------------------------------------------- measured (slow)

GRID = [  # method, quantization, checkpointing, L
    ("lora", "none", False, 256),
    ("lora", "none", True, 512),
    ("lora", "4bit", False, 256),
    ("full", "none", True, 256),
]


def measure_peak(model_dir: Path, text: Path, out: Path, method: str, quant: str, ckpt: bool, L: int,
                 precision: str) -> float:
    """Peak RSS (GiB) of one `train pt` process: 2 steps, micro-batch 2 rows of L tokens, one thread."""
    rss = out.with_suffix(".rss")
    # VmHWM, not ru_maxrss: Linux carries the parent's high-water mark across fork+exec into ru_maxrss, so
    # under a pytest process that has grown to 4 GiB every child "peaked" at 4 GiB
    code = ("import re, runpy, sys\n"
            "res = sys.argv.pop(1); sys.argv = ['cutegpt'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('cutegpt', run_name='__main__', alter_sys=True)\n"
            "finally:\n    hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
            "    open(res, 'w').write(hwm)\n")
    cmd = [sys.executable, "-c", code, str(rss), "train", "pt", "--model", str(model_dir), "--data", str(text),
           "--out", str(out), "--max-length", str(L), "--micro-batch", "2", "--grad-accum", "1", "--max-steps", "2",
           "--save-steps", "1000", "--precision", precision, "--threads", "1", "--method", method, "--quantization", quant,
           "--report-to", "none", *(["--gradient-checkpointing"] if ckpt else [])]
    # one process, as a user runs it: an earlier in-process DeepSpeed test leaves RANK/WORLD_SIZE in this
    # process's environment, and with them the Trainer wraps the model (DDP) and skips the chunked loss
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                           "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(rss.read_text()) / 1024 ** 2


def corpus(path: Path) -> Path:
    from tests.tiny import CORPUS

    with open(path, "w", encoding="utf-8") as f:
        for i in range(400):
            f.write(json.dumps({"text": f"{i} " + CORPUS[i % len(CORPUS)] * 3}, ensure_ascii=False) + "\n")
    return path


@pytest.mark.slow
def test_plan_within_25_percent_of_measured_peak(embedded_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    text = corpus(tmp_path / "corpus.jsonl")
    shape = read_shape(embedded_dir)
    # the precision `train` picks here: bf16 where the CPU has it, else fp32 (emulated bf16 takes minutes per point)
    precision = resolve_precision("auto")
    rows = []
    for method, quant, ckpt, L in GRID:
        measured = measure_peak(embedded_dir, text, tmp_path / f"{method}-{quant}-{ckpt}-{L}", method, quant, ckpt, L,
                                precision)
        weights = training_weight_dtype(method, precision)  # as `train` loads them
        plan = estimate(shape, PlanInput(method=method, quantization=quant, gradient_checkpointing=ckpt, seq_len=L,
                                         micro_batch=2, precision=precision, weight_dtype=weights, device="cpu")).peak / GiB
        rows.append((method, quant, ckpt, L, plan, measured))
    print("\n".join(f"{r[0]} {r[1]} ckpt={r[2]} L={r[3]}: plan {r[4]:.2f} GiB, measured {r[5]:.2f} GiB" for r in rows))
    for method, quant, ckpt, L, plan, measured in rows:
        assert abs(plan - measured) <= 0.25 * measured, (method, quant, ckpt, L, plan, measured)


def test_plan_for_cuda_on_a_machine_without_gpu(tmp_path, capsys, monkeypatch):
    """--plan --device cuda plans for the GPU wherever it runs (it once gave this CPU's numbers), with no RAM as budget."""
    import shutil

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no nvidia-smi: a CPU machine
    folder = llama13b(tmp_path, 32000)
    kw = dict(model=str(folder), plan=True, max_length=2048, micro_batch=1, precision="bf16", quantization="4bit",
              gradient_checkpointing=True)
    run_sft(SFTConfig(**kw, device="cuda"))
    gpu = capsys.readouterr().out
    run_sft(SFTConfig(**kw, device="cpu"))
    cpu = capsys.readouterr().out
    want = estimate(read_shape(folder), PlanInput(method="lora", quantization="4bit", seq_len=2048, micro_batch=1,
                                                  gradient_checkpointing=True, weight_dtype="bfloat16", device="cuda"))
    assert gpu.strip() == format_plan(want, None).strip()
    assert gpu != cpu


LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_plan_for_two_nodes_of_eight_gpus(tmp_path, monkeypatch, capsys):
    """The layout comes from --plan-processes, or from srun's variables; ZeRO-2 states are DeepSpeed's own for 16 GPUs."""
    ds = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    folder = llama13b(tmp_path, 32000)
    for k in LAUNCHER_VARS:  # undone after the test even when the run sets them
        monkeypatch.setenv(k, "0")
        monkeypatch.delenv(k)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    # device cuda: GPUs, planned on this GPU-less machine
    flags = dict(model=str(folder), plan=True, device="cuda", method="full", deepspeed=str(ROOT / "configs" / "ds_zero2.json"),
                 max_length=2048, gradient_checkpointing=True, device_memory_gb=80)

    def states(out: str) -> float:
        line = next(ln for ln in out.splitlines() if "model states" in ln)
        return float(line.split()[-2])

    def plan_text(out: str) -> str:  # DeepSpeed's first import prints an accelerator warning before the plan
        return out[out.index("memory plan"):]

    run_sft(SFTConfig(**flags, plan_processes=16))
    flagged = plan_text(capsys.readouterr().out)
    assert "16 processes" in flagged
    _, gpu = ds.estimate_zero2_model_states_mem_needs(read_shape(folder).total, num_gpus_per_node=8, num_nodes=2, cpu_offload=False)
    assert states(flagged) == pytest.approx(gpu / GiB, abs=0.01)
    assert "autocast" not in flagged  # DeepSpeed's bf16 engine holds the 16-bit weights the estimator counts

    monkeypatch.setenv("SLURM_JOB_ID", "1")
    for k, v in dict(SLURM_PROCID="9", SLURM_LOCALID="1", SLURM_NODEID="1", SLURM_STEP_NUM_TASKS="16",
                     SLURM_STEP_TASKS_PER_NODE="8(x2)", SLURM_STEP_NODELIST="gpu[01-02]").items():
        monkeypatch.setenv(k, v)
    run_sft(SFTConfig(**flags))
    assert plan_text(capsys.readouterr().out) == flagged  # srun task 9 of 16 plans the same layout

    one = SFTConfig(**flags, plan_processes=1)
    for k in LAUNCHER_VARS + ("SLURM_STEP_NUM_TASKS",):
        monkeypatch.delenv(k, raising=False)
    run_sft(one)
    assert states(capsys.readouterr().out) > 4 * states(flagged)  # sharding over 16 GPUs is what makes 13B fit


def test_plan_processes_is_only_for_the_plan():
    from cutegpt.errors import CuteGPTError

    with pytest.raises(CuteGPTError, match="--plan-processes only sets the layout --plan assumes"):
        SFTConfig(model="m", data=["d"], plan_processes=16).check()


def test_plan_uses_the_row_length_of_a_converted_dataset(tmp_path, capsys):
    """A dataset folder keeps its own row length; --max-length (2048 by default) only limits on-the-fly conversion."""
    folder = llama13b(tmp_path, 32000)
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"max_length": 512}))
    common = dict(model=str(folder), plan=True, micro_batch=1, precision="bf16", quantization="4bit", device="cuda")
    run_sft(SFTConfig(data=[str(data)], **common))
    from_data = capsys.readouterr().out
    run_sft(SFTConfig(data=[str(tmp_path / "raw.jsonl")], **common))  # files to convert: rows of up to --max-length
    from_flag = capsys.readouterr().out
    assert "micro-batch 1 x 512 tokens" in from_data and "micro-batch 1 x 2048 tokens" in from_flag
    shape = read_shape(folder)
    want = [estimate(shape, PlanInput(method="lora", quantization="4bit", seq_len=L, micro_batch=1, device="cuda")).peak
            for L in (512, 2048)]
    peaks = [float(out.split("expected peak per device")[1].split("GiB")[0]) for out in (from_data, from_flag)]
    assert peaks == [pytest.approx(w / GiB, abs=0.01) for w in want] and want[0] < want[1]


def test_preference_plan_counts_both_sequences_and_the_reference(tmp_path, capsys, tiny_model_dir):
    """train dpo --plan: twice SFT's activations (chosen + rejected), the reference by strategy: nothing for the
    disabled adapter or --precompute-ref, a second copy of the weights for full tuning, of the adapter when an SFT
    adapter is continued; full logits for ORPO/SimPO on a GPU (trl's)."""
    from cutegpt.training.dpo import PrefConfig, run_dpo
    from cutegpt.training.plan import lora_params

    folder = llama13b(tmp_path, 32000)
    shape = read_shape(folder)
    common = dict(model=str(folder), max_length=1024, micro_batch=1, precision="bf16")

    def plan(device="cpu", **kw):
        cfg = PrefConfig(**common, **kw)
        fields = cfg.plan_fields()
        return estimate(shape, PlanInput(method=cfg.method, weight_dtype=training_weight_dtype(cfg.method, "bf16", "auto"),
                                         seq_len=1024, micro_batch=1, precision="bf16", device=device, **fields))

    sft = estimate(shape, PlanInput(method="lora", weight_dtype="bfloat16", seq_len=1024, micro_batch=1, precision="bf16"))
    lora = plan()
    assert lora.parts["activations"] == 2 * sft.parts["activations"]  # linear in tokens and in rows (scores: per row)
    assert "reference model" not in lora.parts and any("adapter disabled" in n for n in lora.notes)
    assert "reference model" not in plan(precompute_ref=True).parts
    sft_dir = tmp_path / "sft"
    sft_dir.mkdir()
    continued = plan(lora=str(sft_dir))
    assert continued.parts["reference model"] == lora_params(shape, continued.inp) * 4
    full = plan(method="full")
    assert full.parts["reference model"] == full.parts["weights"] == shape.total * 4
    assert "reference model" not in plan(method="full", precompute_ref=True).parts
    simpo = plan(loss="simpo", device="cuda")  # trl's full logits on a GPU; the answer-only head on a CPU
    assert "reference model" not in simpo.parts and simpo.parts["logits (full)"] == 2 * 1024 * shape.vocab * 12
    assert "logits (full)" not in plan(loss="orpo").parts and "logits (chunked loss)" in plan(loss="orpo").parts
    assert run_dpo(PrefConfig(**common, method="full", plan=True)) == 0
    out = capsys.readouterr().out
    assert "reference model" in out and "a frozen copy of the model's weights" in out and "2 sequences per row" in out


def test_checkpoint_every_counts_the_layers_that_keep_their_activations(tmp_path):
    """40 layers, --checkpoint-every 3: 14 layers recomputed (0, 3, ..., 39) hold their input, 26 hold everything."""
    shape = read_shape(llama13b(tmp_path, 32000))
    common = dict(seq_len=1024, micro_batch=1, precision="bf16", weight_dtype="bfloat16")
    none = estimate(shape, PlanInput(**common)).parts["activations"]
    full = estimate(shape, PlanInput(**common, gradient_checkpointing=True)).parts["activations"]
    third = estimate(shape, PlanInput(**common, gradient_checkpointing=True, checkpoint_every=3)).parts["activations"]
    per_layer_kept = (none - 0) / 40  # everything a layer holds without checkpointing (activations and scores)
    per_layer_input = 1024 * 4 * 5120
    assert third == pytest.approx(full + 26 * (per_layer_kept - per_layer_input))
    assert full < third < none
    assert "checkpointing every 3 layers" in format_plan(estimate(shape, PlanInput(**common, gradient_checkpointing=True,
                                                                                  checkpoint_every=3)), None)


def test_keeping_matmuls_counts_every_linear_output_of_the_recomputed_layers(tmp_path):
    """LLaMA-13B, bf16: q k v o 4 x 5120, gate up 2 x 13824, down 5120, attention 5120 = 58,368 values per token."""
    shape = read_shape(llama13b(tmp_path, 32000))
    common = dict(seq_len=1024, micro_batch=1, precision="bf16", weight_dtype="bfloat16", gradient_checkpointing=True)
    full = estimate(shape, PlanInput(**common)).parts["activations"]
    kept = estimate(shape, PlanInput(**common, checkpoint_keep="matmuls")).parts["activations"]
    assert kept - full == 1024 * 40 * 58368 * 2
    plan = estimate(shape, PlanInput(**common, checkpoint_keep="matmuls", checkpoint_every=2))
    assert "checkpointing every 2 layers, keeping matmuls" in format_plan(plan, None)
