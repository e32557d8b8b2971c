"""HF folder (or base + LoRA, or the embedded model) -> one GGUF file for llama.cpp.

    export_gguf(None, Path("smollm2.gguf"), quant="q8_0")

The writer needs no llama.cpp checkout: it uses the `gguf` package (llama.cpp's
own Python library). Tensors are streamed one at a time from the safetensors
files, so memory stays near the size of the largest tensor (the embedding),
not of the model. The output appears under its name only once it is complete
and (unless verify=False) llama.cpp has loaded it and agreed with transformers:
see `cutegpt.export.verify`.

Each HF architecture is one `Arch` entry in ARCHITECTURES, as each is one small class
in llama.cpp's convert_hf_to_gguf.py: the gguf architecture (whose TensorNameMap
names the tensors), the config keys it needs and the tensor transforms:
- LLaMA/Mistral: HF stores q_proj/k_proj rows permuted for its rotate-half rotary
  layout; llama.cpp's llama graph wants the original interleaved layout, so the rows
  are permuted back per head (n_head for q, n_kv_head for k). Qwen and Gemma are
  written in HF's layout (llama.cpp runs them with NEOX-style rope).
- Gemma: RMSNorm computes x * (1 + w), llama.cpp x * w, so every norm gets +1.
- 1-D tensors (norms, biases) stay F32; 2-D tensors take the asked type, falling
  back to F16 when a row is not a whole number of quantization blocks. For the
  4/5-bit types the embedding and output head are Q8_0, as llama.cpp's own
  quantizer keeps them at higher precision.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cutegpt.errors import CuteGPTError
from cutegpt.io import check_output, clean_leftovers, describe_os_error, os_errors

QUANTS = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "q6_k", "q5_k_m", "q4_k_m")  # K-quants: export/kquants.py
CHUNK_ROWS = 4096  # rows converted at a time, so a 70k x 5120 embedding never exists in float32 at once


def _qtype(quant: str) -> Any:
    import gguf

    return {
        "f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "q5_1": gguf.GGMLQuantizationType.Q5_1, "q5_0": gguf.GGMLQuantizationType.Q5_0,
        "q4_1": gguf.GGMLQuantizationType.Q4_1, "q4_0": gguf.GGMLQuantizationType.Q4_0,
    }[quant]


def _file_type(quant: str) -> Any:
    import gguf

    from cutegpt.export.kquants import K_QUANTS, file_type

    if quant in K_QUANTS:
        return file_type(quant)
    return {
        "f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1, "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
        "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[quant]


# ----------------------------------------------------------------------------------------------- architectures

COMMON_KEYS = ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size")


@dataclass(frozen=True)
class Arch:
    """How one HF architecture becomes GGUF (the counterpart of a model class in convert_hf_to_gguf.py)."""

    gguf_arch: str                                  # gguf.MODEL_ARCH member; its TensorNameMap names the tensors
    permute_qk: bool = False                        # undo HF's rotate-half q/k row order (llama.cpp's llama graph)
    norm_offset: float = 0.0                        # added to every *norm.weight (Gemma stores w for x * (1 + w))
    required: tuple[str, ...] = ()                  # config keys beyond COMMON_KEYS
    extra_kv: tuple[tuple[str, str], ...] = ()      # (GGUFWriter method, config key) only this architecture has
    sliding_window_kv: bool = False                 # llama.cpp runs its sliding-window layers (else the context is capped)
    rope_dim_kv: bool = False                       # write rope.dimension_count (llama.cpp's converter does for LLaMA)
    check: Any = None                               # config -> reason llama.cpp would compute something else, or None

    @property
    def name(self) -> str:
        import gguf

        return gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, self.gguf_arch)]


def _gemma2_check(config: dict[str, Any]) -> str | None:
    # llama.cpp hard-codes Gemma 2's attention scale (1/sqrt(head_dim); hidden/heads for the 46-layer 27B) and
    # its layer pattern (sliding, full, sliding, ...); a config that says otherwise would give other logits
    n_layer, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
    want = int(config["hidden_size"]) // heads if n_layer == 46 else int(config["head_dim"])
    if config.get("query_pre_attn_scalar") != want:
        return f"query_pre_attn_scalar is {config.get('query_pre_attn_scalar')}, and llama.cpp's gemma2 scales attention by {want}"
    types = config.get("layer_types")
    if types is not None and list(types) != ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layer)]:
        return "layer_types is not Gemma 2's alternation of sliding and full attention, which llama.cpp assumes"
    return None


ARCHITECTURES: dict[str, Arch] = {
    "LlamaForCausalLM": Arch("LLAMA", permute_qk=True, rope_dim_kv=True),
    "MistralForCausalLM": Arch("LLAMA", permute_qk=True, rope_dim_kv=True),  # llama.cpp's converter writes Mistral as llama too
    "Qwen2ForCausalLM": Arch("QWEN2"),
    "Qwen3ForCausalLM": Arch("QWEN3", required=("head_dim",)),
    "Gemma2ForCausalLM": Arch(
        "GEMMA2", norm_offset=1.0, sliding_window_kv=True,
        required=("head_dim", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "sliding_window"),
        extra_kv=(("add_attn_logit_softcapping", "attn_logit_softcapping"),
                  ("add_final_logit_softcapping", "final_logit_softcapping"),
                  ("add_sliding_window", "sliding_window")),
        check=_gemma2_check),
}


def architecture(folder: Path, config: dict[str, Any]) -> Arch:
    """The table entry for the model in `folder`, its config checked: one sentence for anything GGUF cannot hold."""
    from cutegpt.model.architectures import architecture_name

    arch_name = architecture_name(config)  # a config.json without `architectures` is named by its model_type
    arch = ARCHITECTURES.get(arch_name)
    if arch is None:
        raise CuteGPTError(
            f"{folder} is a {arch_name or config.get('model_type') or 'model of unknown architecture'}, and GGUF export "
            f"supports {', '.join(ARCHITECTURES)}.")
    for key in COMMON_KEYS + arch.required:
        if config.get(key) is None:
            raise CuteGPTError(f"{folder / 'config.json'} has no '{key}', which a {arch_name} needs.")
    reason = arch.check(config) if arch.check else None
    if reason:
        raise CuteGPTError(f"{folder / 'config.json'}: {reason}; GGUF export would not reproduce this {arch_name}.")
    return arch


def sliding_window(config: dict[str, Any]) -> int | None:
    """The attention window of the config's sliding layers, or None when every layer attends to the whole context."""
    window = config.get("sliding_window")
    if not window:
        return None
    types = config.get("layer_types")
    if types is not None:
        return int(window) if "sliding_attention" in types else None
    if "use_sliding_window" in config:  # Qwen2/3 keep a window size in the config but switch it off here
        return int(window) if config["use_sliding_window"] else None
    return int(window)


# ----------------------------------------------------------------------------------------------- public


def export_gguf(model: str | Path | None, out: Path, *, lora: str | Path | None = None, quant: str = "f16",
                template: str | None = None, verify: bool = True, overwrite: bool = False,
                progress: bool = True, threads: int = 1, name: str | None = None) -> Path:
    """Write `model` (HF folder; None = the embedded model), with `lora` merged in, to the GGUF file `out`.

    `template`: the prompt template whose Jinja the file carries (None = what the
    model folder records, as every command resolves it). `name`: the file's
    `general.name` (None = the run's name: the adapter's run, else the model folder's). Raises CuteGPTError with one
    sentence for every user mistake; nothing is left under `out` on failure.
    Returns `out`; the verification report (if any) is in `last_report`.
    """
    global last_report
    out = Path(out).expanduser()
    if quant not in QUANTS:
        raise CuteGPTError(f"unknown --quant '{quant}'; choose one of: {', '.join(QUANTS)}.")
    if quant.endswith(("_k", "_k_m")):
        from cutegpt.export.kquants import available

        available()  # llama.cpp's quantizer is there, before anything is read or written
    if out.suffix.lower() != ".gguf":
        raise CuteGPTError(f"--out {out} must be a file name ending in .gguf.")
    check_output(out, kind="file", inputs=(model, lora), overwrite=overwrite)
    with os_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out.parent)  # temporary files and merges of exports killed here before (their process is gone)

    source_info: dict[str, Any] = {}
    if model is None and lora is not None and (Path(lora).expanduser() / "adapter_config.json").is_file():
        from cutegpt.model.adapter_base import base_folder

        model = base_folder(Path(lora).expanduser())  # --lora alone: the base it records (None: the embedded model)
    if model is None:
        from cutegpt.model.embedded import embedded_gguf, embedded_model_dir

        folder = embedded_model_dir()
        source_info = _embedded_general(embedded_gguf())
    else:
        folder = Path(model).expanduser()
    if folder.suffix == ".gguf":
        raise CuteGPTError(f"--model {folder} is already a GGUF file; export takes a model folder (or nothing for the embedded model).")
    _check_source(folder)
    from cutegpt.generation import generation_config_defaults
    from cutegpt.io import run_name

    # what chat and serve resolve for this model (the adapter's generation_config.json over the base's)
    source_info["sampling"] = {**generation_config_defaults(folder), **generation_config_defaults(lora)}
    if name or lora is not None or not source_info.get("name"):
        source_info["name"] = name or run_name(Path(lora).expanduser() if lora is not None else folder)

    with contextlib.ExitStack() as stack:
        if lora is not None:
            folder = _merge_lora(folder, Path(lora).expanduser(), stack, out.parent, out.name)
        template_name, tokenizer = _template_and_tokenizer(template, folder, lora)
        plan = plan_export(folder, tokenizer, quant, template_name, source_info)
        with published(out, f" (the model needs about {_gib(plan.nbytes)} GiB free)") as tmp:
            write_gguf(plan, tmp, progress=progress)
            report = None
            if verify:
                from cutegpt.export.verify import verify_gguf

                report = verify_gguf(tmp, folder, tokenizer, quant, template_name, progress=progress, threads=threads)
    last_report = {"out": str(out), "quant": quant, "template": template_name, "bytes": out.stat().st_size,
                   "tensors": len(plan.tensors), "verification": report}
    return out


last_report: dict[str, Any] | None = None


# ----------------------------------------------------------------------------------------------- source


def _check_source(folder: Path) -> None:
    if not folder.exists():
        raise CuteGPTError(f"--model {folder} does not exist.")
    if not (folder / "config.json").is_file():
        if (folder / "adapter_config.json").is_file():
            raise CuteGPTError(f"--model {folder} is a LoRA adapter: pass it as --lora and its base model as --model.")
        raise CuteGPTError(f"--model {folder} is not a model folder: it has no config.json.")
    architecture(folder, _read_json(folder / "config.json"))
    if not list(folder.glob("*.safetensors")):
        raise CuteGPTError(f"{folder} has no *.safetensors weights; GGUF export streams safetensors only (re-save the model with save_pretrained).")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        raise CuteGPTError(f"{path}: not valid JSON.") from None


def _short_write(e: OSError) -> bool:
    """numpy's tofile reports a full disk as "N requested and M written", with no errno."""
    return e.errno is None and "requested and" in str(e)


def _merge_lora(base: Path, lora: Path, stack: contextlib.ExitStack, near: Path, out_name: str) -> Path:
    """Merge the adapter in float32 into a temporary folder beside the output (removed afterwards).

    Named like the output's other temporary files, so a run killed before it could remove the folder (SIGKILL)
    has it removed by the next export into the same place (io.clean_leftovers).
    """
    import shutil

    import torch

    from cutegpt.model.loading import ModelArgs, load_model, save_tokenizer
    from cutegpt.templates import write_model_card

    lm = load_model(ModelArgs(model=str(base), lora=str(lora), dtype="float32", device="cpu", merge_lora=True))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_name}.tmp-{os.getpid()}-merge-", dir=near))
    stack.callback(shutil.rmtree, tmp, True)
    try:
        lm.model.to(torch.float32).save_pretrained(tmp)
        save_tokenizer(lm.tokenizer, tmp, lm.template.name)
        write_model_card(tmp, lm.template.name, merged_from={"model": base.name, "lora": lora.name})
    except OSError as e:
        if e.errno == errno.ENOSPC or _short_write(e):
            raise CuteGPTError(f"the disk is full while merging {lora} into {base} (next to {near}).") from None
        raise
    return tmp


def _template_and_tokenizer(template: str | None, folder: Path, lora: Any) -> tuple[str, Any]:
    from cutegpt.model.tokenizer import load_tokenizer  # not model.loading's wrapper: that module imports torch
    from cutegpt.templates import TEMPLATES, resolve_template_name

    if template is not None and template not in TEMPLATES:
        raise CuteGPTError(f"unknown --template '{template}'; choose one of: {', '.join(TEMPLATES)}.")
    tokenizer = load_tokenizer(folder)
    return resolve_template_name(template, [folder], tokenizer), tokenizer


def _embedded_general(path: Path) -> dict[str, Any]:
    """name / organization / licence of the embedded model, from the general.* keys at the head of its GGUF."""
    info: dict[str, Any] = {"name": "SmolLM2-135M-Instruct"}
    from cutegpt.model.gguf_header import read_header

    try:
        general = {k: v for k, _t, _s, v in read_header(path, arrays=False).fields if k.startswith("general.")}
    except CuteGPTError:  # metadata is a courtesy; a broken embedded file fails elsewhere
        return info
    for key in ("license", "organization"):
        if isinstance(general.get(f"general.{key}"), str):
            info[key] = general[f"general.{key}"]
    return info



# ----------------------------------------------------------------------------------------------- plan


@dataclass
class TensorPlan:
    name: str           # GGUF name
    source: str         # safetensors key (or "" for computed tensors)
    file: Path | None
    shape: tuple[int, ...]
    qtype: Any
    permute_heads: int = 0  # >0: undo HF's rotary permutation with this many heads
    data: Any = None    # precomputed float32 array (rope_freqs)
    offset: float = 0.0  # added to every value (Gemma's norms)

    @property
    def nbytes(self) -> int:
        import gguf

        return int(np.prod(gguf.quant_shape_to_byte_shape(self.shape, self.qtype), dtype=np.int64))


@dataclass
class Plan:
    folder: Path
    quant: str
    tensors: list[TensorPlan]
    arch: str = "llama"  # gguf's architecture name: the prefix of the hyper-parameter keys
    kv: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)  # (GGUFWriter method, args)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_export(folder: Path, tokenizer: Any, quant: str, template_name: str, source_info: dict[str, Any] | None = None) -> Plan:
    """Everything to write, decided before a byte is written (so bad input fails fast)."""
    import gguf

    from cutegpt.model.architectures import architecture_name

    config = _read_json(folder / "config.json")
    arch = architecture(folder, config)
    n_layer = int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // n_head)
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    tied = bool(config.get("tie_word_embeddings", False))

    plan = Plan(folder, quant, [], arch.name)
    kv = plan.kv
    info = source_info or {}
    name = info.get("name") or folder.name
    kv.append(("add_type", ("model",)))
    kv.append(("add_name", (str(name),)))
    if info.get("organization"):
        kv.append(("add_organization", (str(info["organization"]),)))
    lic = info.get("license") or _licence(folder)
    if lic:
        kv.append(("add_license", (str(lic),)))
    kv += sampling_kv(info.get("sampling") or {}, template_name)
    repo = config.get("_name_or_path")
    if isinstance(repo, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", repo) and not Path(repo).exists():
        kv.append(("add_source_url", (f"https://huggingface.co/{repo}",)))
    context = int(config.get("max_position_embeddings") or 2048)
    window = sliding_window(config)
    if window and not arch.sliding_window_kv:
        # llama.cpp attends to the whole context on this architecture: up to the window that is exactly what
        # the sliding layers do, past it the answers would differ, so the file claims no more than the window
        context = min(context, window)
    kv += [
        ("add_context_length", (context,)),
        ("add_embedding_length", (hidden,)),
        ("add_block_count", (n_layer,)),
        ("add_feed_forward_length", (int(config["intermediate_size"]),)),
        ("add_head_count", (n_head,)),
        ("add_head_count_kv", (n_kv,)),
        ("add_rope_freq_base", (rope_theta,)),
        ("add_layer_norm_rms_eps", (float(config.get("rms_norm_eps", 1e-6)),)),
        ("add_file_type", (int(_file_type(quant)),)),
    ]
    if arch.rope_dim_kv:
        kv.append(("add_rope_dimension_count", (head_dim,)))
    kv += [("add_key_length", (head_dim,)), ("add_value_length", (head_dim,))]
    kv += [(method, (config[key],)) for method, key in arch.extra_kv]

    # tensors
    files = _weight_index(folder)
    has_output = "lm_head.weight" in files and not tied  # K-quant mixtures give the head (else the embedding) Q6_K
    tmap = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.gguf_arch), n_layer)
    n_rows = None
    for key, (file, shape) in files.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if key == "lm_head.weight" and tied:
            continue
        new = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise CuteGPTError(f"{folder}: the tensor {key} has no place in a {arch.name} GGUF file (is this really a plain "
                               f"{architecture_name(config)}?).")
        if new == "token_embd.weight":
            n_rows = shape[0]
        permute = (n_head if ".attn_q." in new else n_kv if ".attn_k." in new else 0) if arch.permute_qk else 0
        offset = arch.norm_offset if key.endswith("norm.weight") else 0.0
        plan.tensors.append(TensorPlan(new, key, file, shape, _tensor_qtype(new, shape, quant, n_layer, has_output),
                                       permute, offset=offset))
    if n_rows is None:
        raise CuteGPTError(f"{folder}: no token embedding (model.embed_tokens.weight) in the weights.")

    scaling = rope.get("rope_type") or rope.get("type")
    if scaling and scaling != "default":
        factor = float(rope.get("factor", 1.0))
        if scaling == "linear":
            kv += [("add_rope_scaling_type", (gguf.RopeScalingType.LINEAR,)), ("add_rope_scaling_factor", (factor,))]
        elif scaling == "yarn":
            kv += [("add_rope_scaling_type", (gguf.RopeScalingType.YARN,)), ("add_rope_scaling_factor", (factor,)),
                   ("add_rope_scaling_orig_ctx_len", (int(rope["original_max_position_embeddings"]),))]
        elif scaling == "llama3":
            freqs = _llama3_rope_factors(rope, rope_theta, head_dim)
            plan.tensors.insert(0, TensorPlan("rope_freqs.weight", "", None, freqs.shape, gguf.GGMLQuantizationType.F32, data=freqs))
        else:
            raise CuteGPTError(f"{folder}: rope scaling '{scaling}' cannot be written to GGUF yet (linear, yarn and llama3 can).")

    kv += _tokenizer_kv(folder, tokenizer, n_rows, template_name)
    return plan


# llama.cpp's sampler names, in the order transformers (and our llama.cpp requests, runtime.llamacpp.request_for) apply them
SAMPLER_SEQUENCE = "penalties;temperature;top_k;top_p"


def sampling_kv(model_defaults: dict[str, Any], template_name: str) -> list[tuple[str, tuple[Any, ...]]]:
    """`general.sampling.*`: the settings chat and serve resolve for this model (its generation_config.json, else the
    template's defaults), in llama.cpp's terms, so llama-cli, llama-server and ollama sample as `cutegpt chat` does.

    Greedy is temperature 0 for llama.cpp; the penalty covers the whole context (-1) and min_p is off, as transformers."""
    from cutegpt.generation import GenerationArgs, resolve_generation

    gen, _ = resolve_generation(GenerationArgs(), model_defaults, "model", template_name)
    return [("add_sampling_sequence", (SAMPLER_SEQUENCE,)),
            ("add_sampling_temp", (0.0 if gen.greedy else float(gen.temperature),)),
            ("add_sampling_top_k", (int(gen.top_k),)),
            ("add_sampling_top_p", (float(gen.top_p),)),
            ("add_sampling_min_p", (0.0,)),
            ("add_sampling_penalty_repeat", (float(gen.repetition_penalty),)),
            ("add_sampling_penalty_last_n", (-1,))]


def _licence(folder: Path) -> str | None:
    readme = folder / "README.md"
    if readme.is_file():
        m = re.search(r"^license:\s*(\S+)", readme.read_text(encoding="utf-8", errors="replace")[:4000], re.M)
        if m:
            return m.group(1)
    return None


def _weight_index(folder: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """safetensors key -> (file, shape), in file order; headers only, no tensor is read."""
    out: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        for k, t in _safetensors(f).items():
            if t.dtype not in SOURCE_DTYPES:
                raise CuteGPTError(f"{f}: the tensor {k} is {t.dtype}; GGUF export reads {', '.join(SOURCE_DTYPES)} weights.")
            out[k] = (f, tuple(t.shape))
    return out


# safetensors dtypes the export reads, as numpy dtypes (BF16, which numpy lacks, is widened from its 16 bits)
SOURCE_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def _safetensors(f: Path) -> dict[str, Any]:
    """The file's tensors (name -> gguf.utility.LocalTensor: dtype, shape, byte range), from its header only."""
    from gguf.utility import SafetensorsLocal

    try:
        with SafetensorsLocal(f) as tensors:
            return tensors
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError) as e:
        raise CuteGPTError(f"{f}: the weights file is corrupt or truncated ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__}).") from None


def _tensor_qtype(name: str, shape: tuple[int, ...], quant: str, n_layer: int = 0, has_output: bool = True) -> Any:
    import gguf

    from cutegpt.export.kquants import K_QUANTS, tensor_type

    if len(shape) == 1 or quant == "f32":
        return gguf.GGMLQuantizationType.F32
    if quant in K_QUANTS:
        return tensor_type(name, shape, quant, n_layer, has_output)
    q = quant
    if quant.startswith(("q4", "q5")) and name in ("token_embd.weight", "output.weight"):
        q = "q8_0"
    qtype = _qtype(q)
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        return gguf.GGMLQuantizationType.F16
    return qtype


def _llama3_rope_factors(rope: dict[str, Any], base: float, dim: int) -> np.ndarray:
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_ctx = int(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wl, high_wl = old_ctx / low, old_ctx / high
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (old_ctx / wl - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


# ----------------------------------------------------------------------------------------------- tokenizer


def tokenizer_family(folder: Path) -> str:
    """'llama' (SentencePiece) or 'gpt2' (byte-level BPE), as GGUF names them."""
    if (folder / "tokenizer.model").is_file():
        return "llama"
    path = folder / "tokenizer.json"
    if path.is_file():
        tj = _read_json(path)
        model = tj.get("model") or {}
        if model.get("type") == "BPE" and model.get("byte_fallback"):
            return "llama"
        if model.get("type") == "BPE" and _has_byte_level(tj.get("pre_tokenizer")):
            return "gpt2"
    raise CuteGPTError(
        f"{folder}: GGUF export handles SentencePiece (tokenizer.model) and byte-level BPE (tokenizer.json) tokenizers, "
        "and this one is neither.")


def _has_byte_level(pre: Any) -> bool:
    if not isinstance(pre, dict):
        return False
    if pre.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(p) for p in pre.get("pretokenizers") or [])


# llama.cpp's fingerprint of a byte-level BPE pre-tokenizer: sha256 of the ids of this text
# (convert_hf_to_gguf.py, get_vocab_base_pre); the hashes below are the ones it lists for these names.
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 '
          '33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български '
          '\'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, '
          '\'D you like some tea? We\'Ve a\'lL')
KNOWN_PRE = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",            # HuggingFaceTB/SmolLM-135M
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",             # ruGPT3XL
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",             # openai-community/gpt2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",         # Meta-Llama-3-8B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",             # Qwen3-Embedding-0.6B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",             # Qwen1.5-7B (Qwen2/2.5/3)
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",  # DeepSeek-R1-Distill-Qwen
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",            # Mistral-Nemo-Base-2407
}

# The regexes of the Split pre-tokenizers in tokenizer.json and llama.cpp's name for each (llama-vocab.cpp
# keeps the same rule under that name): Qwen2/2.5/3 split digits one by one, Llama-3 in groups of up to three.
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
PRE_TOKENIZERS: dict[tuple[Any, ...], str] = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", QWEN2_SPLIT, "Isolated", False), ("ByteLevel", False)): "qwen2",
    (("Split", LLAMA3_SPLIT, "Isolated", False), ("ByteLevel", False)): "llama-bpe",
}


def _pre_signature(pre: dict[str, Any]) -> tuple[Any, ...]:
    """What a tokenizer.json pre-tokenizer does, as a key of PRE_TOKENIZERS."""
    parts = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]
    sig: list[tuple[Any, ...]] = []
    for p in parts:
        kind = p.get("type")
        if kind == "ByteLevel":
            sig.append((kind, bool(p.get("use_regex", True))))
        elif kind == "Digits":
            sig.append((kind, bool(p.get("individual_digits"))))
        elif kind == "Split":
            sig.append((kind, (p.get("pattern") or {}).get("Regex"), p.get("behavior"), bool(p.get("invert"))))
        else:
            sig.append((kind,))
    return tuple(sig)


def pre_tokenizer_name(tj: dict[str, Any], tokenizer: Any = None) -> str:
    """llama.cpp's name for the pre-tokenizer in tokenizer.json (the regex it must apply before BPE).

    First llama.cpp's own fingerprint (the ids of CHKTXT), so an unchanged vocabulary gets the
    name llama.cpp's converter gives it; then what the pre-tokenizer does (its split regex), so
    vocabularies `vocab extend` grew from a known base, or trained anew with a known family's
    rules, keep that family's name. Verification then checks llama.cpp tokenizes like the HF tokenizer.
    """
    import hashlib

    if tokenizer is not None:
        ids = tokenizer.encode(CHKTXT)
        name = KNOWN_PRE.get(hashlib.sha256(str(ids).encode()).hexdigest())
        if name:
            return name
    sig = _pre_signature(tj.get("pre_tokenizer") or {})
    name = PRE_TOKENIZERS.get(sig)
    if name is None:
        raise CuteGPTError(
            "the tokenizer's pre-tokenizer (" + " + ".join(str(k[0]) for k in sig) + ") is not one llama.cpp is known "
            "to reproduce (GPT-2 byte-level, SmolLM2's digits + byte-level, or the Qwen2 and Llama-3 split rules); "
            "export it with llama.cpp's own converter.")
    return name


def _tokenizer_kv(folder: Path, tokenizer: Any, n_rows: int, template_name: str) -> list[tuple[str, tuple[Any, ...]]]:
    import gguf

    from cutegpt.templates import CUTEGPT_STOP, chat_template_jinja

    family = tokenizer_family(folder)
    n_tok = len(tokenizer)
    if n_tok > n_rows:
        raise CuteGPTError(f"{folder}: the tokenizer has {n_tok:,} tokens but the model only {n_rows:,} embedding rows.")
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    kv: list[tuple[str, tuple[Any, ...]]] = [("add_tokenizer_model", (family,))]
    if family == "llama":
        pieces = _sp_pieces(folder, tokenizer)
        for i, (piece, score, ptype) in enumerate(pieces):
            if i in added and ptype == gguf.TokenType.NORMAL:
                ptype = gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
            tokens.append(piece)
            scores.append(score)
            types.append(int(ptype))
        for i in range(len(pieces), n_tok):
            tok = added.get(i)
            if tok is None:
                raise CuteGPTError(f"{folder}: token id {i} is neither in tokenizer.model nor an added token.")
            tokens.append(tok.content)
            scores.append(-1000.0)
            types.append(int(gguf.TokenType.CONTROL if tok.special else gguf.TokenType.USER_DEFINED))
        kv.append(("add_tokenizer_pre", ("default",)))
        sp_prefix = _sp_add_dummy_prefix(folder)
        if sp_prefix is not None:
            kv.append(("add_add_space_prefix", (sp_prefix,)))
    else:
        tj = _read_json(folder / "tokenizer.json")
        vocab = tj["model"]["vocab"]
        by_id = {i: t for t, i in vocab.items()}
        for i in range(n_tok):
            if i in added:
                tokens.append(added[i].content)
                types.append(int(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED))
            elif i in by_id:
                tokens.append(by_id[i])
                types.append(int(gguf.TokenType.NORMAL))
            else:
                raise CuteGPTError(f"{folder}: token id {i} is missing from tokenizer.json.")
        merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges") or []]
        kv.append(("add_tokenizer_pre", (pre_tokenizer_name(tj, tokenizer),)))
    for i in range(n_tok, n_rows):  # embedding rows past the vocabulary (padding to a multiple of 64)
        tokens.append(f"[PAD{i}]")
        scores.append(-10000.0)  # as llama.cpp's converter writes them (added tokens get -1000)
        types.append(int(gguf.TokenType.UNUSED))
    kv.append(("add_token_list", (tokens,)))
    if family == "llama":
        kv.append(("add_token_scores", (scores,)))
    kv.append(("add_token_types", (types,)))
    if family == "gpt2":
        kv.append(("add_token_merges", (merges,)))
    kv.append(("add_vocab_size", (n_rows,)))

    for attr, method in (("bos_token_id", "add_bos_token_id"), ("eos_token_id", "add_eos_token_id"),
                         ("unk_token_id", "add_unk_token_id"), ("pad_token_id", "add_pad_token_id")):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int) and value >= 0:
            kv.append((method, (value,)))
    probe = "hello"
    with_specials = tokenizer(probe)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    add_bos = bool(tokenizer.bos_token_id is not None and with_specials[:1] == [tokenizer.bos_token_id] and plain[:1] != [tokenizer.bos_token_id])
    add_eos = bool(tokenizer.eos_token_id is not None and with_specials[-1:] == [tokenizer.eos_token_id] and plain[-1:] != [tokenizer.eos_token_id])
    kv.append(("add_add_bos_token", (add_bos,)))
    if add_eos:
        kv.append(("add_add_eos_token", (True,)))

    jinja = chat_template_jinja(template_name) if template_name != "auto" else getattr(tokenizer, "chat_template", None)
    if isinstance(jinja, str) and jinja:
        kv.append(("add_chat_template", (jinja,)))
    marker = CUTEGPT_STOP if template_name == "cutegpt" else _auto_stop(tokenizer) if template_name == "auto" else None
    if marker:
        stop = tokenizer(marker, add_special_tokens=False)["input_ids"]
        if len(stop) == 1:  # llama.cpp ends generation at its end-of-turn token, as chat and serve stop at the marker
            kv.append(("add_eot_token_id", (stop[0],)))
    # ollama's own engine reads its ends of generation from this list (beside eos_token_id), not from eot or names
    from cutegpt.model.tokenizer import end_of_generation_ids

    eog = end_of_generation_ids(tokenizer, marker)
    if eog:
        kv.append(("add_array", ("tokenizer.ggml.eos_token_ids", eog)))
    return kv


def _auto_stop(tokenizer: Any) -> str | None:
    """The end-of-turn marker of the tokenizer's own chat template (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, ...)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    from cutegpt.templates import get_template

    return get_template("auto", tokenizer).stop


def _sp_proto(folder: Path) -> Any:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString((folder / "tokenizer.model").read_bytes())
    except Exception:
        raise CuteGPTError(f"{folder / 'tokenizer.model'}: not a SentencePiece model file.") from None
    return proto


def _sp_pieces(folder: Path, tokenizer: Any) -> list[tuple[str, float, int]]:
    """(piece, score, GGUF token type) per id; SentencePiece's piece types use GGUF's numbering."""
    import gguf

    if (folder / "tokenizer.model").is_file():
        proto = _sp_proto(folder)
        return [(p.piece, float(p.score), int(p.type)) for p in proto.pieces]
    # no tokenizer.model: a SentencePiece BPE converted to tokenizer.json (byte fallback);
    # merge priority becomes the score, as SentencePiece BPE scores are ranks
    tj = _read_json(folder / "tokenizer.json")
    vocab = tj["model"]["vocab"]
    out: list[tuple[str, float, int]] = []
    for piece, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        if re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            out.append((piece, 0.0, int(gguf.TokenType.BYTE)))
        elif piece == tj["model"].get("unk_token"):
            out.append((piece, 0.0, int(gguf.TokenType.UNKNOWN)))
        else:
            out.append((piece, -float(i), int(gguf.TokenType.NORMAL)))
    return out


def _sp_add_dummy_prefix(folder: Path) -> bool | None:
    if (folder / "tokenizer.model").is_file():
        return bool(_sp_proto(folder).normalizer_spec.add_dummy_prefix)
    return None


# ----------------------------------------------------------------------------------------------- writing


def write_gguf(plan: Plan, path: Path, progress: bool = True) -> None:
    """Write `plan` to `path`, one tensor in memory at a time."""
    import gguf
    from tqdm import tqdm

    writer = gguf.GGUFWriter(str(path), plan.arch)
    for method, args in plan.kv:
        getattr(writer, method)(*args)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for t in plan.tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    bar = tqdm(total=plan.nbytes, unit="B", unit_scale=True, desc=f"GGUF {plan.quant}", disable=not progress, leave=False)
    headers: dict[Path, dict[str, Any]] = {}
    try:
        for t in plan.tensors:
            if t.file is not None and t.file not in headers:
                headers[t.file] = _safetensors(t.file)
            data = _convert(t, headers[t.file][t.source] if t.file is not None else None)
            writer.write_tensor_data(data)
            bar.update(t.nbytes)
            del data
        writer.close()
    finally:
        bar.close()
        with contextlib.suppress(Exception):
            for f in writer.fout or []:
                f.close()


def _source(t: TensorPlan, local: Any) -> np.ndarray:
    """The tensor as stored (BF16 as its raw 16 bits), mapped from its file; a fresh mapping per tensor, so the
    pages it made resident go with it."""
    if t.data is not None:
        return t.data
    return local.mmap_bytes().view(SOURCE_DTYPES[local.dtype]).reshape(local.shape)


def _widen(a: np.ndarray) -> np.ndarray:
    """float32 values of stored ones (uint16 holds bfloat16: the top half of a float32)."""
    if a.dtype == np.uint16:
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32, copy=False)


def _convert(t: TensorPlan, local: Any) -> np.ndarray:
    """One tensor as GGUF bytes: unpermuted, then cast or quantized CHUNK_ROWS rows at a time.

    numpy throughout, as llama.cpp's converter (no torch import); a 16-bit tensor is widened to float32
    a block of rows at a time into the preallocated output, never as a whole.
    """
    import gguf

    src = _source(t, local)
    if t.permute_heads:
        src = _unpermute(src, t.permute_heads)
    if src.ndim == 1:
        return _widen(src) + np.float32(t.offset) if t.offset else np.ascontiguousarray(_widen(src))
    from cutegpt.export.kquants import quantize as ggml_quantize

    Q = gguf.GGMLQuantizationType
    # K-quants only in llama.cpp's own code (gguf-py cannot); the legacy types by gguf-py, byte-identical either way
    quantize = ggml_quantize if t.qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K) else gguf.quants.quantize
    if t.qtype == Q.F32:
        out = np.empty(src.shape, dtype=np.float32)
    elif t.qtype == Q.F16:
        out = np.empty(src.shape, dtype=np.float16)
    else:
        out = np.empty(gguf.quant_shape_to_byte_shape(src.shape, t.qtype), dtype=np.uint8)
    for start in range(0, src.shape[0], CHUNK_ROWS):
        rows = _widen(src[start:start + CHUNK_ROWS])
        if t.offset:
            rows = rows + np.float32(t.offset)
        if out.dtype == np.uint8:
            out[start:start + CHUNK_ROWS] = quantize(rows, t.qtype)
        else:
            out[start:start + CHUNK_ROWS] = rows  # to float16 with round-to-nearest-even, as llama.cpp's converter
    return out


def _unpermute(w: Any, n_head: int) -> Any:
    """HF's rotate-half row order -> llama.cpp's interleaved pairs, per head (LlamaModel.permute)."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


# ----------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def published(out: Path, need: str = "") -> Iterator[Path]:
    """A hidden temporary file beside `out` to write; renamed to `out` only if the block completes, removed otherwise.

    A full disk or another OS error becomes one sentence naming `out` (`need`: what the sentence adds about space)."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent)  # io.clean_leftovers knows it
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except OSError as e:
        _unlink(tmp)
        if e.errno == errno.ENOSPC or _short_write(e):
            raise CuteGPTError(f"the disk is full while writing {out}; nothing was left behind{need}.") from None
        raise CuteGPTError(describe_os_error(e, out)) from None
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"

