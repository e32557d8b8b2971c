"""--format gguf-lora: a PEFT LoRA adapter alone as a llama.cpp LoRA GGUF, run on top of the base's GGUF.

    export_gguf_lora(base_folder_or_None, Path("runs/sft/final"), Path("sft-lora.gguf"))
    cutegpt chat --model base.gguf --lora sft-lora.gguf        # llama.cpp applies it at load

The layout is the one llama.cpp's convert_lora_to_gguf.py writes and llama-adapter.cpp reads:
- `general.architecture` = the base's (llama.cpp refuses an adapter of another architecture),
  `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`;
- per adapted weight `W` (named by gguf's TensorNameMap, as in the model file) two tensors
  `<W>.lora_a` and `<W>.lora_b`, kept in PEFT's row-major shapes: A is (r, in), B is (out, r), i.e.
  ggml ne = [in, r] and [r, out], which llama.cpp checks against W's ne = [in, out];
- llama.cpp adds scale * B @ (A @ x) with scale = alpha / r (r read from B). PEFT's own scale is
  alpha / r too, except with rsLoRA (alpha / sqrt r): the ratio is folded into B, so the file needs
  nothing llama.cpp does not know;
- LLaMA/Mistral: llama.cpp's llama graph wants q/k rows in the interleaved rotary order (see
  export/gguf.py), and only B has those rows: B is permuted like the base weight, A is not.
"""

from __future__ import annotations

import errno
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cutegpt.errors import CuteGPTError
from cutegpt.io import check_output, clean_leftovers, describe_os_error, os_errors

LORA_QUANTS = ("f32", "f16", "bf16")  # what llama.cpp multiplies LoRA tensors in; an adapter is small anyway
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass
class LoraPair:
    name: str           # the base weight's GGUF name, e.g. blk.0.attn_q.weight
    a_key: str          # safetensors keys in the adapter file
    b_key: str
    permute_heads: int  # >0: B's rows take the base weight's rotary permutation
    scale_fix: float    # folded into B: PEFT's scale / llama.cpp's alpha / r


def _adapter_config(adapter: Path) -> dict[str, Any]:
    from cutegpt.io import read_json_object

    config = read_json_object(adapter / "adapter_config.json")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CuteGPTError(f"{adapter} is a {peft_type} adapter; --format gguf-lora converts LoRA adapters only.")
    if config.get("use_dora"):
        raise CuteGPTError(f"{adapter} is a DoRA adapter, which llama.cpp cannot apply; export the merged model "
                           f"with --format gguf --lora {adapter}.")
    if config.get("alpha_pattern"):
        raise CuteGPTError(f"{adapter / 'adapter_config.json'} sets alpha_pattern (one alpha per module), and a GGUF LoRA "
                           f"holds one alpha; export the merged model with --format gguf --lora {adapter}.")
    if not isinstance(config.get("lora_alpha"), (int, float)) or not config.get("r"):
        raise CuteGPTError(f"{adapter / 'adapter_config.json'} has no numeric lora_alpha and r.")
    return config


def plan_lora(adapter: Path, base: Path) -> tuple[Any, float, list[LoraPair]]:
    """The base's architecture entry, the file's alpha, and every A/B pair, checked before anything is written."""
    import gguf
    from safetensors import safe_open

    from cutegpt.export.gguf import _read_json, architecture

    config = _adapter_config(adapter)
    weights = adapter / ADAPTER_WEIGHTS
    if not weights.is_file():
        bin_file = adapter / "adapter_model.bin"
        raise CuteGPTError(f"{adapter} has no {ADAPTER_WEIGHTS}" + (
            " (only a pickled adapter_model.bin; re-save it with a current peft)" if bin_file.is_file() else "") + ".")
    base_config = _read_json(base / "config.json")
    arch = architecture(base, base_config)
    n_layer = int(base_config["num_hidden_layers"])
    n_head = int(base_config["num_attention_heads"])
    n_kv = int(base_config.get("num_key_value_heads") or n_head)
    tmap = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.gguf_arch), n_layer)
    alpha = float(config["lora_alpha"])
    try:
        with safe_open(str(weights), framework="pt") as st:
            shapes = {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
    except Exception as e:
        raise CuteGPTError(f"{weights}: the weights file is corrupt or truncated ({str(e).splitlines()[0][:200]}).") from None

    pairs: list[LoraPair] = []
    for key in sorted(shapes):
        if ".lora_A." not in key:
            if ".lora_B." in key and key.endswith(".weight"):
                continue  # taken with its A
            raise CuteGPTError(f"{weights} holds {key} (modules_to_save, embedding LoRA or LoRA biases), which a "
                               f"GGUF LoRA cannot carry; export the merged model with --format gguf --lora {adapter}.")
        b_key = key.replace(".lora_A.", ".lora_B.")
        if b_key not in shapes:
            raise CuteGPTError(f"{weights} has {key} but no {b_key}.")
        module = key.removeprefix(PEFT_PREFIX).split(".lora_A.")[0]
        name = tmap.get_name(module + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise CuteGPTError(f"{weights}: {module} has no place in a {arch.name} GGUF file; is {base} this adapter's base?")
        (r, _), (_, r_b) = shapes[key], shapes[b_key]
        if r != r_b:
            raise CuteGPTError(f"{weights}: {key} has rank {r} and {b_key} rank {r_b}.")
        peft_scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        permute = (n_head if ".attn_q." in name else n_kv if ".attn_k." in name else 0) if arch.permute_qk else 0
        pairs.append(LoraPair(name, key, b_key, permute, peft_scale / (alpha / r)))
    if not pairs:
        raise CuteGPTError(f"{weights} holds no LoRA weights.")
    return arch, alpha, pairs


def export_gguf_lora(model: str | Path | None, lora: str | Path, out: Path, *, quant: str = "f16",
                     overwrite: bool = False, name: str | None = None) -> Path:
    """Write the adapter `lora` (on `model`, an HF folder; None: the base it records) to the LoRA GGUF `out`."""
    import gguf
    import torch
    from safetensors import safe_open

    from cutegpt.export.gguf import _unlink, _unpermute, _umask

    out = Path(out).expanduser()
    if quant not in LORA_QUANTS:
        raise CuteGPTError(f"--format gguf-lora writes {', '.join(LORA_QUANTS)} tensors; --quant {quant} is for whole models.")
    if out.suffix.lower() != ".gguf":
        raise CuteGPTError(f"--out {out} must be a file name ending in .gguf.")
    adapter = Path(lora).expanduser()
    if not (adapter / "adapter_config.json").is_file():
        raise CuteGPTError(f"--lora {adapter} is not a LoRA adapter folder: it has no adapter_config.json.")
    base = base_for(model, adapter)
    check_output(out, kind="file", inputs=(str(base), str(adapter)), overwrite=overwrite)
    arch, alpha, pairs = plan_lora(adapter, base)
    with os_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out.parent)

    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16}[quant]
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(str(tmp), arch.name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        from cutegpt.io import run_name

        writer.add_name(name or run_name(adapter))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        with safe_open(str(adapter / ADAPTER_WEIGHTS), framework="pt") as st:
            for p in pairs:
                a = st.get_tensor(p.a_key).to(torch.float32)
                b = st.get_tensor(p.b_key).to(torch.float32) * p.scale_fix
                if p.permute_heads:
                    b = _unpermute(b, p.permute_heads)
                for suffix, t in ((".lora_a", a), (".lora_b", b)):
                    writer.add_tensor(p.name + suffix, _as(t, quant), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except OSError as e:
        _unlink(tmp)
        if e.errno == errno.ENOSPC:
            raise CuteGPTError(f"the disk is full while writing {out}; nothing was left behind.") from None
        raise CuteGPTError(describe_os_error(e, out)) from None
    except BaseException:
        _unlink(tmp)
        raise
    return out


def _as(t: Any, quant: str) -> np.ndarray:
    import torch

    if quant == "f16":
        return t.to(torch.float16).contiguous().numpy()
    if quant == "bf16":
        import gguf

        return gguf.quants.quantize(t.contiguous().numpy(), gguf.GGMLQuantizationType.BF16)
    return t.contiguous().numpy()


def base_for(model: str | Path | None, adapter: Path) -> Path:
    """The base's HF folder, whose config decides the architecture and the q/k permutation."""
    if model is not None:
        folder = Path(model).expanduser()
        if folder.suffix == ".gguf":
            raise CuteGPTError(f"--model {folder} is a GGUF file; --format gguf-lora reads the base's config.json: give its "
                               f"HF folder, or no --model for the base {adapter} records.")
        if not (folder / "config.json").is_file():
            raise CuteGPTError(f"--model {folder} is not a model folder: it has no config.json.")
        return folder
    from cutegpt.model.adapter_base import find_base

    return find_base(adapter)  # the embedded model's HF folder when the adapter was trained on it


def lora_metadata(path: Path) -> dict[str, Any]:
    """The adapter keys of a GGUF header (general.type, adapter.*)."""
    from cutegpt.model.gguf_header import read_metadata

    return read_metadata(path, lambda k: k.startswith("adapter.") or k in ("general.type", "general.architecture"))


def is_lora_gguf(path: Path) -> bool:
    try:
        return lora_metadata(path).get("general.type") == "adapter"
    except (OSError, CuteGPTError):
        return False

