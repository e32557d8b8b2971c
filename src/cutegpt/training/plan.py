"""A memory plan before anything loads: expected peak memory per device from config.json alone.

    cutegpt train sft --model llama-13b/ --quantization 4bit --max-length 2048 --plan

Peak per device = weights + gradients + optimizer states + activations + logits
+ LoRA/quantization overhead (+ the process's own runtime on a CPU). Each part:

    weights      fp32 master (4 B/param, what `train` loads with --dtype auto), bf16/fp16 (2 B),
                 int8 (1 B + a scale per row), NF4/FP4 (0.5 B + an fp32 scale per 64 weights,
                 0.127 bit with --double-quant); embeddings, norms and lm_head stay fp32 with
                 quantization (peft's k-bit preparation casts them).
    autocast     bf16/fp16 copies of trainable weights kept by autocast for the step (full tuning).
    gradients    4 B per trainable parameter; optimizer: AdamW m and v, 8 B per trainable parameter.
                 With a ZeRO stage these model states come from DeepSpeed's own estimators
                 (estimate_zero2/3_model_states_mem_needs), fed with the trainable parameter count.
    activations  per token and layer, bytes = A_H * hidden + A_I * intermediate (calibrated on the
                 embedded model, see docs/training.md) + the attention scores of the block-diagonal
                 mask (SDPA's math path on CPU holds heads x L x L per row); with gradient
                 checkpointing only each layer's input (4 * hidden) plus one layer recomputed;
                 with --checkpoint-every N the layers not recomputed keep their activations, with
                 --checkpoint-keep matmuls the recomputed ones also keep every linear's and attention's output.
    logits       our loss computes logits only on loss-bearing positions, in chunks of 256 tokens
                 (training/loss.py), so the vocabulary costs chunk x vocab x 12 B, not rows x L x vocab.

The numbers are estimates (within 25% of the measured peak RSS for the embedded model on CPU,
tests/training/test_plan.py); they say which part dominates and which setting fixes it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cutegpt.errors import CuteGPTError
from cutegpt.training.args import training_weight_dtype

GiB = 1024 ** 3
# Calibrated on SmolLM2-135M (CPU, fp32 and bf16 autocast, L 128-512): bytes per token and layer.
A_H = {"fp32": 44.0, "bf16": 34.0, "fp16": 34.0}
A_I = {"fp32": 16.0, "bf16": 10.0, "fp16": 10.0}
CPU_RUNTIME = 0.65 * GiB  # python + torch + transformers + peft + datasets imported, allocator slack
GPU_RUNTIME = 0.8 * GiB  # CUDA context and kernels
LOSS_CHUNK = 256  # training/loss.py's CHUNK


@dataclass
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    name: str = "model"
    head_size: int | None = None  # config's head_dim where it is not hidden / heads (Qwen3, Gemma 2)
    qkv_bias: bool = False
    qk_norm: bool = False
    norms_per_layer: int = 2

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden // self.heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear in one decoder layer."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, self.intermediate), "up_proj": (h, self.intermediate), "down_proj": (self.intermediate, h)}

    @property
    def layer_linear_params(self) -> int:
        return sum(i * o for i, o in self.linear_shapes().values())

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def other_params(self) -> int:  # norms and biases
        per_layer = self.norms_per_layer * self.hidden
        if self.qkv_bias:
            per_layer += (self.heads + 2 * self.kv_heads) * self.head_dim
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        return self.layers * per_layer + self.hidden

    @property
    def total(self) -> int:
        return self.layers * self.layer_linear_params + self.embed_params + self.head_params + self.other_params


def read_shape(config_path: str | Path) -> ModelShape:
    """The few numbers the plan needs, from a model folder's config.json (or the file itself)."""
    path = Path(config_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise CuteGPTError(f"{path} does not exist; the memory plan needs the model's config.json.")
    try:
        c = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CuteGPTError(f"{path}: not valid JSON.") from None
    if not isinstance(c, dict):
        raise CuteGPTError(f"{path}: a model config must be a JSON object.")
    c = c.get("text_config", c)

    def num(key: str, default: int | None = None) -> int:
        v = c.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise CuteGPTError(f"{path}: '{key}' must be a positive integer, not {v!r}.")
        return v

    from cutegpt.model.architectures import Family, family_of

    hidden = num("hidden_size")
    heads = num("num_attention_heads")
    family = family_of(c) or Family()
    return ModelShape(hidden=hidden, intermediate=num("intermediate_size", 4 * hidden), layers=num("num_hidden_layers"),
                      heads=heads, kv_heads=num("num_key_value_heads", heads), vocab=num("vocab_size"),
                      tied=bool(c.get("tie_word_embeddings", False)), name=path.parent.name or "model",
                      head_size=num("head_dim") if c.get("head_dim") is not None else None,
                      qkv_bias=family.qkv_bias or bool(c.get("attention_bias")), qk_norm=family.qk_norm,
                      norms_per_layer=family.norms_per_layer)


@dataclass
class PlanInput:
    method: str = "lora"
    precision: str = "bf16"  # resolved: bf16 / fp16 / fp32
    weight_dtype: str = "float32"  # master weights as loaded
    quantization: str = "none"
    seq_len: int = 2048
    micro_batch: int = 2
    gradient_checkpointing: bool = False
    checkpoint_every: int = 1  # with checkpointing, only layers 0, N, 2N, ... are recomputed
    checkpoint_keep: str = "inputs"  # matmuls: recomputed layers also keep their matrix products' and attention's outputs
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    modules_to_save: tuple[str, ...] = ()
    zero_stage: int = 0
    offload: bool = False
    processes: int = 1
    device: str = "cpu"
    double_quant: bool = True
    loss_fraction: float = 1.0  # share of positions that carry a loss (SFT: answers only)
    # preference tuning (train dpo: PrefConfig.plan_fields): rows per example (chosen + rejected), the reference
    # model (none | adapter-disabled | adapter-copy | frozen-copy | precomputed), logits chunk or full logits
    sequences: int = 1
    reference: str = "none"
    loss_chunk: int = LOSS_CHUNK
    full_logits: bool = False


@dataclass
class Plan:
    inp: PlanInput
    shape: ModelShape
    parts: dict[str, float] = field(default_factory=dict)  # bytes per device
    trainable: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return sum(self.parts.values())


def _bytes_per_dtype(name: str) -> int:
    return 4 if name in ("float32", "fp32") else 2


def lora_params(shape: ModelShape, inp: PlanInput) -> int:
    linear = shape.linear_shapes()
    targets = list(linear) if "all-linear" in inp.lora_targets else [t for t in inp.lora_targets if t in linear]
    return shape.layers * sum(inp.lora_r * (linear[t][0] + linear[t][1]) for t in targets)


def estimate(shape: ModelShape, inp: PlanInput) -> Plan:
    plan = Plan(inp, shape)
    P = shape.total
    linear_all = shape.layers * shape.layer_linear_params
    rest = P - linear_all  # embeddings, lm_head, norms
    full = inp.method == "full"
    N = max(1, inp.processes)

    # weights (what stays resident)
    if inp.quantization == "4bit":
        per = 0.5 + (4 / 64 if not inp.double_quant else (1 / 64 + 4 / (64 * 256)))
        weights = linear_all * per + rest * 4
        plan.notes.append(f"{inp.quantization}: linear layers at {per * 8:.2f} bits; embeddings/lm_head/norms fp32")
    elif inp.quantization == "8bit":
        weights = linear_all * 1 + shape.layers * sum(o for _, o in shape.linear_shapes().values()) * 4 + rest * 4
    else:
        weights = P * _bytes_per_dtype(inp.weight_dtype)
    if inp.zero_stage == 3:
        weights /= N

    # trainable parameters
    if full:
        trainable = P
    else:
        trainable = lora_params(shape, inp)
        saved = {"embed_tokens": shape.embed_params, "lm_head": shape.head_params or shape.embed_params}
        trainable += sum(saved.get(m, 0) for m in inp.modules_to_save)
    plan.trainable = trainable

    # gradients + optimizer states (+ autocast copies of trainable weights)
    deepspeed_states = inp.zero_stage in (1, 2, 3) and inp.device != "cpu"
    if deepspeed_states:
        states = _deepspeed_states(trainable, shape, inp)
        plan.parts["weights"] = weights if not full else 0
        plan.parts["model states (DeepSpeed estimator)"] = states
        plan.notes.append(f"ZeRO-{inp.zero_stage} model states from DeepSpeed's estimator for {trainable / 1e6:.1f}M trainable parameters")
    else:
        grads = trainable * 4
        optim = trainable * 8
        if inp.zero_stage >= 1:
            optim /= N
        if inp.zero_stage >= 2:
            grads /= N
        if inp.offload:
            optim = 0.0
        plan.parts["weights"] = weights
        plan.parts["gradients"] = grads
        plan.parts["optimizer states"] = optim
    # DeepSpeed's bf16/fp16 engine casts the module itself (the estimator counts those 16-bit weights): no autocast
    if full and inp.precision in ("bf16", "fp16") and _bytes_per_dtype(inp.weight_dtype) == 4 and not deepspeed_states:
        plan.parts["autocast weight copies"] = P * 2
    if not full:
        plan.parts["LoRA/quantization overhead"] = _lora_overhead(shape, inp)

    ref = _reference(shape, inp, trainable, weights)
    if ref:
        plan.parts["reference model"] = ref

    # activations (a preference row is a chosen and a rejected sequence, both in one forward)
    tokens = inp.micro_batch * inp.sequences * inp.seq_len
    ph = inp.precision if inp.precision in A_H else "fp32"
    per_layer = A_H[ph] * shape.hidden + A_I[ph] * shape.intermediate
    scores = inp.micro_batch * inp.sequences * shape.heads * inp.seq_len * inp.seq_len * (4 if ph == "fp32" else 2)
    if inp.gradient_checkpointing:
        recomputed = -(-shape.layers // inp.checkpoint_every)  # the layers --checkpoint-every N leaves to recompute
        kept = shape.layers - recomputed
        act = (tokens * recomputed * 4 * shape.hidden + tokens * per_layer + 2 * scores
               + kept * (tokens * per_layer + scores))
        if inp.checkpoint_keep == "matmuls":  # every linear's output and attention's (q-sized), at compute precision
            outputs = sum(o for _, o in shape.linear_shapes().values()) + shape.heads * shape.head_dim
            act += tokens * recomputed * outputs * (4 if ph == "fp32" else 2)
    else:
        act = tokens * shape.layers * per_layer + shape.layers * scores
    plan.parts["activations"] = act
    loss_tokens = max(1, int(tokens * inp.loss_fraction))
    if inp.full_logits and inp.device != "cpu":  # trl's CPO/ORPO on a GPU: fp32 logits of every position, log-softmax, gradient
        plan.parts["logits (full)"] = tokens * shape.vocab * 12
    else:
        chunk = min(inp.loss_chunk, loss_tokens)
        plan.parts["logits (chunked loss)"] = chunk * shape.vocab * 12 + tokens * shape.hidden * 8
    plan.parts["runtime"] = CPU_RUNTIME if inp.device == "cpu" else GPU_RUNTIME
    if inp.sequences > 1 or inp.reference != "none":
        plan.notes.append(f"{inp.sequences} sequences per row (chosen and rejected); {REFERENCES[inp.reference]}")
    return plan


REFERENCES = {
    "none": "reference-free loss: no reference model",
    "adapter-disabled": "reference: the base with the adapter disabled (no second copy; its forward runs without gradients)",
    "adapter-copy": "reference: trl's frozen copy of the starting adapter beside the trained one",
    "frozen-copy": "reference: a frozen copy of the model's weights (--precompute-ref avoids it)",
    "precomputed": "reference: log-probabilities computed once before training (no reference model)",
}


def _reference(shape: ModelShape, inp: PlanInput, trainable: int, weights: float) -> float:
    """What the reference model adds: a second copy of the weights for full tuning, of the adapter when an SFT
    adapter is continued, nothing when it is the base with the adapter disabled or precomputed."""
    if inp.sequences == 1 and inp.reference == "none":
        return 0.0  # SFT / PT: no note either
    if inp.reference not in REFERENCES:
        raise ValueError(f"unknown reference {inp.reference!r}")
    return {"frozen-copy": weights, "adapter-copy": lora_params(shape, inp) * 4.0}.get(inp.reference, 0.0)


def _lora_overhead(shape: ModelShape, inp: PlanInput) -> float:
    """The adapter's own weights and the quantized layers' transient dequantized copy."""
    extra = lora_params(shape, inp) * 4.0
    if inp.quantization != "none":
        # one layer's linears dequantized to the compute dtype during forward and again in backward
        extra += shape.layer_linear_params * 2 * 2
        if inp.device == "cpu":
            # on a CPU the 16-bit/fp32 weights are read into the same process to be quantized, and the allocator
            # keeps those pages: measured on the embedded model, the peak RSS of QLoRA is that of fp32 LoRA
            # (bounded by one checkpoint shard of a large model: transformers quantizes shard by shard)
            extra += min(shape.layers * shape.layer_linear_params * 4, 4 * GiB)
    return extra


def _deepspeed_states(trainable: int, shape: ModelShape, inp: PlanInput) -> float:
    try:
        if inp.zero_stage == 3:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

            largest = max(shape.layer_linear_params, shape.embed_params)
            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(trainable, largest, num_gpus_per_node=inp.processes,
                                                                cpu_offload=inp.offload, cpu_offload_params=inp.offload)
        else:
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

            cpu, gpu = estimate_zero2_model_states_mem_needs(trainable, num_gpus_per_node=inp.processes, cpu_offload=inp.offload)
        return float(gpu)
    except ImportError:
        return trainable * (2 + 18 / max(1, inp.processes))


def device_memory(device: str) -> float | None:
    """Bytes of memory a training process can use on this machine (GPU 0, else RAM)."""
    if device != "cpu":
        try:
            import torch

            if torch.cuda.is_available():
                return float(torch.cuda.get_device_properties(0).total_memory)
        except ImportError:
            pass
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def suggestions(shape: ModelShape, inp: PlanInput, budget: float) -> list[str]:
    """Settings that bring the peak under `budget`, cheapest first."""
    from dataclasses import replace

    tries: list[tuple[str, PlanInput]] = []
    if not inp.gradient_checkpointing:
        tries.append(("--gradient-checkpointing", replace(inp, gradient_checkpointing=True)))
    if inp.micro_batch > 1:
        tries.append((f"--micro-batch 1 (raise --grad-accum x{inp.micro_batch})", replace(inp, micro_batch=1)))
        tries.append(("--gradient-checkpointing --micro-batch 1", replace(inp, gradient_checkpointing=True, micro_batch=1)))
    if inp.method == "full":
        tries.append(("--method lora", replace(inp, method="lora")))
    if inp.method == "lora" and inp.quantization == "none" and _bytes_per_dtype(inp.weight_dtype) == 4:
        tries.append(("--dtype bfloat16 (a 16-bit frozen base)", replace(inp, weight_dtype="bfloat16")))
    if inp.method == "lora" and inp.quantization != "4bit":
        tries.append(("--quantization 8bit", replace(inp, quantization="8bit")))
        tries.append(("--quantization 4bit", replace(inp, quantization="4bit")))
        tries.append(("--quantization 4bit --gradient-checkpointing", replace(inp, quantization="4bit", gradient_checkpointing=True)))
        tries.append(("--quantization 4bit --gradient-checkpointing --micro-batch 1",
                      replace(inp, quantization="4bit", gradient_checkpointing=True, micro_batch=1)))
    if inp.method == "full" and inp.zero_stage < 3 and inp.device != "cpu":
        tries.append(("--deepspeed configs/ds_zero3.json with more GPUs", replace(inp, zero_stage=3, processes=max(2, inp.processes * 2))))
        tries.append(("--deepspeed configs/ds_full_zero1_offload.json", replace(inp, zero_stage=1, offload=True)))
    if inp.seq_len > 512:
        tries.append((f"--max-length {inp.seq_len // 2}", replace(inp, seq_len=inp.seq_len // 2)))
    return [name for name, t in tries if estimate(shape, t).peak <= budget][:3]


def gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


def format_plan(plan: Plan, budget: float | None, *, one_line: bool = False) -> str:
    inp = plan.inp
    what = (f"{inp.method}{' ' + inp.quantization if inp.quantization != 'none' else ''}, {inp.precision}, "
            f"micro-batch {inp.micro_batch} x {inp.seq_len} tokens, checkpointing {_checkpointing(inp)}"
            f"{f', ZeRO-{inp.zero_stage}' if inp.zero_stage else ''}{f', {inp.processes} processes' if inp.processes > 1 else ''}")
    fits = budget is None or plan.peak <= budget
    have = f" of {gib(budget)}" if budget else ""
    if one_line:
        parts = ", ".join(f"{k.split(' ')[0]} {v / GiB:.2f}" for k, v in plan.parts.items() if v >= 0.005 * GiB)
        return f"memory plan: ~{gib(plan.peak)} per device{have} ({parts} GiB; {what})"
    lines = [f"memory plan for {plan.shape.name} ({plan.shape.total / 1e9:.2f}B parameters, "
             f"{plan.trainable / 1e6:.2f}M trainable; {what}):"]
    for k, v in plan.parts.items():
        lines.append(f"  {k:<34} {gib(v):>12}")
    lines.append(f"  {'expected peak per device':<34} {gib(plan.peak):>12}" + (f"   (device: {gib(budget)})" if budget else ""))
    if not inp.gradient_checkpointing:
        from dataclasses import replace

        alt = estimate(plan.shape, replace(inp, gradient_checkpointing=True))
        lines.append(f"  with --gradient-checkpointing: activations {gib(alt.parts['activations'])}, peak {gib(alt.peak)}")
    for n in plan.notes:
        lines.append(f"  note: {n}")
    if not fits and budget:
        fix = suggestions(plan.shape, inp, budget)
        lines.append("  does not fit; " + (f"these would: {'; '.join(fix)}." if fix else "no single setting makes it fit: use more devices with ZeRO-3 or a smaller model."))
    return "\n".join(lines)


def _checkpointing(inp: PlanInput) -> str:
    if not inp.gradient_checkpointing:
        return "off"
    every = "on" if inp.checkpoint_every == 1 else f"every {inp.checkpoint_every} layers"
    return every + (", keeping matmuls" if inp.checkpoint_keep == "matmuls" else "")


def row_length(cfg: Any) -> int:
    """Tokens in the longest row the run will see: a converted dataset's own length (its manifest), else --max-length.

    A dataset folder keeps the length it was converted with (`--max-length` only limits on-the-fly conversion):
    planning 2048-token rows for 512-token data put 9.71 GiB on a run that peaked at 2.48.
    """
    data = getattr(cfg, "data", None) or []
    if len(data) == 1:
        manifest = Path(data[0]) / "manifest.json"
        with contextlib.suppress(OSError, ValueError):
            known = json.loads(manifest.read_text(encoding="utf-8")).get("max_length")
            if isinstance(known, int) and not isinstance(known, bool) and known > 0:
                return known
    return cfg.max_length


def plan_input_from_args(cfg: Any, *, precision: str, micro_batch: int, ds: dict[str, Any] | None, processes: int,
                         device: str) -> PlanInput:
    zero = ds.get("zero_optimization", {}) if ds else {}
    stage = int(zero.get("stage", 0) or 0)
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme")
    return PlanInput(method=cfg.method, precision=precision,
                     weight_dtype=training_weight_dtype(cfg.method, precision, cfg.dtype), quantization=cfg.quantization,
                     seq_len=row_length(cfg), micro_batch=micro_batch, gradient_checkpointing=cfg.gradient_checkpointing,
                     checkpoint_every=getattr(cfg, "checkpoint_every", 1), checkpoint_keep=getattr(cfg, "checkpoint_keep", "inputs"),
                     lora_r=cfg.lora_r, lora_targets=tuple(cfg.lora_targets), modules_to_save=tuple(cfg.modules_to_save or ()),
                     zero_stage=stage, offload=offload, processes=processes, device=device, double_quant=cfg.double_quant,
                     **(cfg.plan_fields() if hasattr(cfg, "plan_fields") else {}))


def disk_estimate(shape: ModelShape, inp: PlanInput, keep: int, keep_best: bool) -> float:
    """Bytes a run writes: `keep` checkpoints (+1 while rotating), final/ and best/."""
    if inp.method == "full":
        ckpt = shape.total * (4 + 8) + 16 * 2**20  # fp32 weights + AdamW states
        final = shape.total * 2
    else:
        t = lora_params(shape, inp) + sum({"embed_tokens": shape.embed_params, "lm_head": shape.head_params or shape.embed_params}.get(m, 0)
                                           for m in inp.modules_to_save)
        ckpt = t * (4 + 8) + 16 * 2**20
        final = t * 4
    return ckpt * (keep + 1) + final * (2 if keep_best else 1)


def math_ceil_gib(x: float) -> float:
    return math.ceil(x / GiB * 10) / 10


def run_plan(cfg: Any) -> Plan | None:
    """`--plan`: the full table from config.json, without importing torch or reading any weights."""
    import shutil

    from cutegpt.training.args import METHOD_DEFAULTS

    if cfg.model is None:
        from cutegpt.model.embedded import embedded_model_dir

        path = embedded_model_dir()
    else:
        path = Path(cfg.model).expanduser()
    if path.suffix == ".gguf":
        raise CuteGPTError(f"--plan reads a model folder's config.json; {path} is a GGUF file.")
    gpu_here = bool(os.environ.get("CUDA_VISIBLE_DEVICES")) or shutil.which("nvidia-smi") is not None
    on_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpu_here)  # --device cuda plans for a GPU from any machine
    settings = {"micro_batch": cfg.micro_batch, "grad_accum": cfg.grad_accum, "lr": cfg.lr, "warmup_steps": cfg.warmup_steps,
                "adam_eps": cfg.adam_eps, "weight_decay": cfg.weight_decay, "max_grad_norm": cfg.max_grad_norm,
                "precision": cfg.precision, "adam_betas": list(cfg.adam_betas)}
    ds = None
    if cfg.deepspeed:
        from cutegpt.training.ds_config import read_ds_config, reconcile

        ds, settings = reconcile(read_ds_config(cfg.deepspeed), settings, on_cpu=not on_gpu, source=cfg.deepspeed)
    micro = settings["micro_batch"] or METHOD_DEFAULTS[cfg.method]["micro_batch"]
    precision = settings["precision"]
    if precision == "auto":  # what `train` will pick: bf16 on a GPU (most have it), on a CPU only where it is native
        from cutegpt.training.prepare import resolve_precision

        precision = "bf16" if on_gpu else resolve_precision("auto")
    shape = read_shape(path)
    from cutegpt.training.launch import world_layout

    processes = cfg.plan_processes or world_layout()[0]
    inp = plan_input_from_args(cfg, precision=precision, micro_batch=micro, ds=ds,
                               processes=processes, device="cuda" if on_gpu else "cpu")
    plan = estimate(shape, inp)
    # a GPU this machine does not have has no known size (--device-memory-gb gives it); never this machine's RAM
    budget = cfg.device_memory_gb * GiB if cfg.device_memory_gb else (device_memory(inp.device) if gpu_here or not on_gpu else None)
    print(format_plan(plan, budget))
    return plan
