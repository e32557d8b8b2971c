"""Model preparation for training: the tokenizer, the base model (16-bit, or 4-/8-bit with bitsandbytes), and the
LoRA adapter or full training on top; what a command hands the engine (`Prepared`).

    cfg ──> training_tokenizer (+ <end> for full tuning) ──> load_for_training ──> load_quantized | load_model
                                                                               └──> attach_lora | all weights trainable
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cutegpt.errors import CuteGPTError
from cutegpt.model.adapter_base import fingerprint, record_base
from cutegpt.templates import CUTEGPT_STOP, add_stop_token
from cutegpt.training import segments
from cutegpt.training.args import TrainArgs, training_weight_dtype
from cutegpt.training.checkpoints import check_torch_file

log = logging.getLogger("cutegpt.training")



@dataclass
class Prepared:
    """What a command hands the engine: the model, tokenizer, rows, validation rows and the template name."""

    model: Any
    tokenizer: Any
    dataset: Any
    template_name: str
    val_dataset: Any = None



def base_model_path(cfg: TrainArgs) -> Path:
    if cfg.model is None:
        from cutegpt.model.embedded import embedded_model_dir

        return embedded_model_dir()
    return Path(cfg.model).expanduser()



def training_tokenizer(cfg: TrainArgs, template_name: str | None) -> Any:
    """The tokenizer the run trains with (the adapter's when continuing one; `<end>` added for full tuning)."""
    from cutegpt.model.loading import _has_tokenizer, load_tokenizer

    path = base_model_path(cfg)
    if path.suffix == ".gguf":
        raise CuteGPTError(f"{path}: training needs a model folder, not a GGUF file; convert it first (load it once with `cutegpt chat --model` and save).")
    if cfg.resume_lora and _has_tokenizer(Path(cfg.resume_lora)):
        path = Path(cfg.resume_lora)
    if not path.exists():
        raise CuteGPTError(f"model path {path} does not exist.")
    tokenizer = load_tokenizer(path, cfg.trust_remote_code)
    if cfg.method == "full" and template_name == "cutegpt":
        add_stop_token(tokenizer)
    return tokenizer



def resize_for_tokenizer(model: Any, tokenizer: Any, std: float = 1e-6) -> int:
    """Grow the embeddings to the tokenizer; new rows (input and output) drawn from N(0, std) like the original."""
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= old:
        return 0
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[old:].normal_(0.0, std)
        out = model.get_output_embeddings()
        if out is not None and out.weight is not model.get_input_embeddings().weight:
            out.weight[old:].normal_(0.0, std)
    return len(tokenizer) - old



def load_for_training(cfg: TrainArgs, tokenizer: Any, template_name: str, attach: bool = True) -> Any:
    """Base model through the project's loader, then the adapter (or full training) set up; with attach=False a new
    LoRA adapter is left to the caller (trl's trainers create it themselves, keeping the base as the reference)."""
    from cutegpt.model.loading import ModelArgs, load_model

    if cfg.lora and cfg.method == "lora" and not cfg.merge_lora:
        raise CuteGPTError(f"--lora {cfg.lora}: to continue training that adapter pass it as --resume-lora; "
                           "to train a new adapter on top of it add --merge-lora.")
    args = ModelArgs(model=cfg.model, lora=cfg.lora, template=template_name,
                     dtype=training_weight_dtype(cfg.method, resolve_precision(cfg.precision), cfg.dtype),
                     device="cpu",  # the Trainer places the model (no device_map: it breaks DDP/DeepSpeed)
                     trust_remote_code=cfg.trust_remote_code, merge_lora=cfg.merge_lora, force=cfg.force)
    base_print = None
    if cfg.quantization != "none":
        model = load_quantized(cfg)  # no fingerprint: its 4-/8-bit weights are not the 16-bit base an adapter loads on
    else:
        model = load_model(args).model
        base_print = fingerprint(model)  # before the embeddings grow: the base as `--lora` will load it
    model.config.use_cache = False  # restarting position ids separate samples only without a cache (tests/training/test_data.py)
    attn = pick_attention(cfg.attn_implementation)
    if attn in ("sdpa", segments.NAME) and cfg.attn_implementation == "auto" and not getattr(model, "_supports_sdpa", True):
        attn = "eager"  # transformers has no sdpa path for some architectures (Gemma 2's soft-capped attention)
    if attn and getattr(model.config, "_attn_implementation", None) != attn:
        model.set_attn_implementation(attn)
    added = resize_for_tokenizer(model, tokenizer)
    if added:
        log.info("added %d token(s) to the embeddings (%s)", added, CUTEGPT_STOP)
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if not attach and not cfg.resume_lora:  # trl attaches the adapter itself (train dpo), then calls portable()
        check_module_names(model, cfg)
        model.cutegpt_base_fingerprint = base_print
        return model
    return portable(attach_lora(model, cfg), cfg, base_print)


def portable(model: Any, cfg: TrainArgs, base_print: dict[str, Any] | None) -> Any:
    """The adapter records its base by name, never a cache path (peft would write the folder it was loaded from),
    and keeps the base's fingerprint for final/'s cutegpt_training.json (outputs.training_record)."""
    for config in model.peft_config.values():
        config.base_model_name_or_path = record_base(cfg.model)
    model.cutegpt_base_fingerprint = base_print
    return model



def load_quantized(cfg: TrainArgs) -> Any:
    """The frozen base in 4 bits (NF4/FP4) or 8 bits with bitsandbytes, prepared for k-bit training by peft."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from cutegpt.model.loading import _check_model_folder

    path = base_model_path(cfg)
    if path.suffix == ".gguf":
        raise CuteGPTError(f"--quantization {cfg.quantization} needs a model folder, not a GGUF file; convert it first.")
    if cfg.lora:
        raise CuteGPTError(f"--quantization {cfg.quantization} trains on the 16-bit base: merge --lora {cfg.lora} into a model folder first (cutegpt export).")
    _check_model_folder(path)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise CuteGPTError(f"--quantization {cfg.quantization} needs bitsandbytes: pip install 'bitsandbytes>=0.45'.") from None
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # a cast note on every matmul on CPU
    compute = torch.bfloat16 if resolve_precision(cfg.precision) == "bf16" else torch.float32
    if cfg.quantization == "4bit":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.bnb_4bit_type,
                               bnb_4bit_use_double_quant=cfg.double_quant, bnb_4bit_compute_dtype=compute,
                               bnb_4bit_quant_storage=torch.uint8)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    on_gpu = torch.cuda.is_available() and cfg.device != "cpu"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=q, dtype=torch.float32,
                                                     device_map={"": local if on_gpu else "cpu"},
                                                     trust_remote_code=cfg.trust_remote_code)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise CuteGPTError(f"{path}: cannot load the model in {cfg.quantization} ({str(e).splitlines()[0][:300]}).") from None
    from peft import prepare_model_for_kbit_training

    with quiet_deprecations():
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    return model



@contextlib.contextmanager
def quiet_deprecations():
    """peft reads `model.is_gradient_checkpointing`, deprecated in transformers 5 (not ours to fix; not the user's to see)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield



def pick_attention(name: str) -> str | None:
    """transformers' attention implementation for --attn-implementation; auto: flash-attention's variable-length
    kernel on a GPU that has it, SDPA on other GPUs, and on CPU SDPA sample by sample over packed rows
    (training/segments.py: the CPU kernel would compute every masked block of a row)."""
    if name == "segments":
        return segments.register()
    if name != "auto":
        if name == "flash_attention_2" and not _has_flash_attn():
            raise CuteGPTError("--attn-implementation flash_attention_2 needs the flash-attn package and a CUDA GPU.")
        return name
    if torch.cuda.is_available():
        return "flash_attention_2" if _has_flash_attn() else "sdpa"
    return segments.register()



def _has_flash_attn() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None



def attach_lora(model: Any, cfg: TrainArgs) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model

    if cfg.resume_lora:
        from cutegpt.model.loading import _check_adapter_folder

        folder = Path(cfg.resume_lora)
        _check_adapter_folder(folder)
        for f in folder.glob("*.bin"):
            check_torch_file(f, "--resume-lora")
        try:
            with quiet_deprecations():
                return trainable_in_fp32(PeftModel.from_pretrained(model, cfg.resume_lora, is_trainable=True))
        except pickle.UnpicklingError:
            raise CuteGPTError(f"--resume-lora {cfg.resume_lora}: the adapter weights are not a plain tensor file (refused unread).") from None
        except (RuntimeError, ValueError, KeyError, OSError) as e:
            raise CuteGPTError(f"--resume-lora {cfg.resume_lora}: cannot load the adapter on this base model ({str(e).splitlines()[0][:300]}).") from None
    check_module_names(model, cfg)
    targets: Any = "all-linear" if cfg.lora_targets == ["all-linear"] else list(cfg.lora_targets)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=targets, modules_to_save=cfg.modules_to_save or None, task_type="CAUSAL_LM")
    try:
        with quiet_deprecations():
            return trainable_in_fp32(get_peft_model(model, lora))
    except ValueError as e:
        raise CuteGPTError(f"--lora-targets {' '.join(cfg.lora_targets)}: {str(e).splitlines()[0][:300]}") from None



def trainable_in_fp32(model: Any) -> Any:
    """Trained weights in float32 over a 16-bit frozen base: AdamW updates of 16-bit weights lose small steps, and
    fp16's gradient scaler refuses fp16 gradients. peft upcasts the adapter itself, not `--modules-to-save` copies."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model



def check_module_names(model: Any, cfg: TrainArgs) -> None:
    """A misspelled --lora-targets / --modules-to-save name is one sentence listing the model's names."""
    linear: set[str] = set()
    top: set[str] = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if not leaf or leaf.isdigit():
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear8bitLt", "Linear4bit"):
            linear.add(leaf)
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) or type(module).__name__ in ("Linear8bitLt", "Linear4bit"):
            top.add(leaf)
    if cfg.lora_targets != ["all-linear"]:
        bad = [t for t in cfg.lora_targets if t not in linear]
        if bad:
            raise CuteGPTError(f"--lora-targets {' '.join(bad)}: no such linear layer in this model; valid names: "
                               f"{' '.join(sorted(linear))} (or all-linear).")
    bad = [m for m in (cfg.modules_to_save or []) if m not in top]
    if bad:
        raise CuteGPTError(f"--modules-to-save {' '.join(bad)}: no such module in this model; valid names: {' '.join(sorted(top))}.")



def resolve_precision(name: str) -> str:
    if name != "auto":
        if name == "fp16" and not torch.cuda.is_available():
            raise CuteGPTError("--precision fp16 needs a GPU; on a CPU use bf16 or fp32.")
        return name
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    try:
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    except (AttributeError, RuntimeError):
        return "fp32"
