"""`cutegpt export`: merge a LoRA adapter into its base model and save a plain model folder, or write a GGUF file.

    export/cli.py     the command: settings, checks before anything loads, what is printed
    export/hf.py      --format hf: the merged safetensors folder
    export/gguf.py    --format gguf: one file for llama.cpp / ollama / LM Studio, streamed tensor by tensor
    export/verify.py  the GGUF file checked in llama.cpp (runtime/llamacpp.py) against transformers
    export/ollama.py  --ollama: the Modelfile beside the .gguf file (FROM, Go TEMPLATE, SYSTEM, PARAMETERs)
    export/gguf_lora.py  --format gguf-lora: the adapter alone as a llama.cpp LoRA GGUF (run on the base's GGUF)

    cutegpt export --model BASE --lora runs/sft/final --out merged [--dtype float16]
    cutegpt export --format gguf [--model DIR] [--lora ADAPTER] --out model.gguf [--quant q8_0] [--no-verify] [--ollama]
    cutegpt export --format gguf-lora --lora ADAPTER [--model BASE_DIR] --out adapter.gguf [--quant f16]

GGUF export (llama.cpp, ollama, LM Studio) is `cutegpt.export.gguf.export_gguf`; with no
--model it exports the embedded model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from cutegpt.config import arg
from cutegpt.errors import CuteGPTError
from cutegpt.model.args import ModelArgs
from cutegpt.threads import THREADS_HELP


@dataclass
class ExportConfig(ModelArgs):
    dropped_flags: ClassVar[tuple[str, ...]] = ("load_in_8bit", "int8_backend", "merge_lora", "device")

    out: str = arg("", "folder for the merged model (--format hf) or the .gguf file (--format gguf)",
                   aliases=("--output", "--output-dir", "--output_dir"))
    format: Literal["hf", "gguf", "gguf-lora"] = arg(
        "hf", "hf: merged safetensors folder; gguf: one file for llama.cpp / ollama / LM Studio; "
              "gguf-lora: the --lora adapter alone as a llama.cpp LoRA GGUF (f32, f16 or bf16), run with the base's GGUF")
    quant: Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "q6_k", "q5_k_m", "q4_k_m"] = arg(
        "f16", "GGUF tensor type (--format gguf); q4_k_m, q5_k_m and q6_k are llama.cpp's K-quant mixtures (its quantizer, from xllamacpp)")
    verify: bool = arg(True, "load the GGUF file in llama.cpp and check tokenization, top-1 agreement and the template")
    threads: int = arg(0, THREADS_HELP, ge=0, aliases=("--num-threads",))
    quiet: bool = arg(False, "no progress bars")
    overwrite: bool = arg(False, "replace --out if it exists (once the new output is complete)")
    ollama: bool = arg(False, "also write an Ollama Modelfile beside the .gguf file (--format gguf; gguf-lora with --base-gguf)")
    base_gguf: str | None = arg(None, "--format gguf-lora --ollama: the base model's .gguf file, the Modelfile's FROM "
                                      "(the adapter is its ADAPTER)")
    system: str | None = arg(None, "the Modelfile's SYSTEM line (--ollama); default: the template's")
    name: str | None = arg(None, "the GGUF file's general.name (--format gguf); default: the run's name (runs/sft/final -> sft)")

    def check(self) -> None:
        """Refuse a bad output before any model loads: never inside, or instead of, the model being exported."""
        from cutegpt.io import check_output

        if self.format == "gguf-lora":
            from cutegpt.export.gguf_lora import LORA_QUANTS

            if not self.lora:
                raise CuteGPTError("--lora is required: the adapter folder --format gguf-lora converts.")
            if self.quant not in LORA_QUANTS:
                raise CuteGPTError(f"--format gguf-lora writes {', '.join(LORA_QUANTS)} tensors; --quant {self.quant} is for whole models.")
        if self.base_gguf is not None:
            from cutegpt.export.ollama import check_base_gguf

            check_base_gguf(self.base_gguf)
        if self.format == "gguf-lora" and self.ollama and not self.base_gguf:
            raise CuteGPTError("--ollama with --format gguf-lora needs --base-gguf FILE: the base model's .gguf file "
                               "(`cutegpt export --format gguf --model BASE --out base.gguf`), the Modelfile's FROM.")
        if self.base_gguf is not None and not (self.format == "gguf-lora" and self.ollama):
            raise CuteGPTError("--base-gguf names the FROM of a LoRA's Modelfile; it applies to --format gguf-lora --ollama only.")
        if self.format == "gguf-lora" and self.name is not None:
            raise CuteGPTError("--name applies to --format gguf only.")
        if self.format == "hf" and (self.ollama or self.system is not None or self.name is not None):
            flag = "--ollama" if self.ollama else "--system" if self.system is not None else "--name"
            raise CuteGPTError(f"{flag} applies to --format gguf only.")
        if self.name is not None and not self.name.strip():
            raise CuteGPTError("--name is empty; give the model's name, or leave the flag out for the run's name.")
        if self.system is not None and not self.ollama:
            raise CuteGPTError("--system sets the Modelfile's SYSTEM line; add --ollama.")
        if self.format in ("gguf", "gguf-lora"):
            if self.format == "gguf-lora" and not self.out:
                raise CuteGPTError("--out is required: the .gguf file to write.")
            if self.out and not self.out.lower().endswith(".gguf"):
                raise CuteGPTError(f"--out {self.out} must be a file name ending in .gguf.")
            if self.out:
                check_output(self.out, kind="file", inputs=(self.model, self.lora), overwrite=self.overwrite)
            if self.out and self.ollama:
                from cutegpt.export.ollama import check_modelfile

                check_modelfile(self.out, self.template, self.system, overwrite=self.overwrite)
            return
        if not self.out:
            raise CuteGPTError("--out is required: the folder for the merged model.")
        if not self.lora:
            raise CuteGPTError("--lora is required: the adapter folder to merge into --model (or --format gguf to convert a model).")
        check_output(self.out, kind="folder", inputs=(self.model, self.lora), overwrite=self.overwrite)


def _say_base(cfg: ExportConfig) -> None:
    """An adapter trained on a 4-/8-bit base is merged onto the 16-bit base it records, never onto dequantized weights."""
    import json

    record = Path(cfg.lora) / "cutegpt_training.json" if cfg.lora else None
    if record is None or not record.is_file():
        return
    try:
        info = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    quant = info.get("quantization", "none") if isinstance(info, dict) else "none"
    if quant and quant != "none":
        base = cfg.model or info.get("base_model") or "the recorded base"
        print(f"merging {cfg.lora} (trained on a {quant} base) onto the 16-bit base {base}, never onto dequantized weights")


def run_export(cfg: ExportConfig) -> int:
    from cutegpt.threads import apply_threads

    _say_base(cfg)
    # auto measures the machine once; llama.cpp's verification gets the same count. A GGUF written without
    # verification or a merge never runs torch, so it is not imported (seconds of a small export's time)
    torchless = cfg.format == "gguf" and not cfg.verify and not cfg.lora
    threads = 1 if torchless else apply_threads(cfg.threads)  # without verification nothing runs on threads
    if cfg.format == "gguf":
        return run_export_gguf(cfg, threads)
    if cfg.format == "gguf-lora":
        return run_export_gguf_lora(cfg)
    from cutegpt.export.hf import export_merged

    export_merged(cfg)
    return 0


def run_export_gguf(cfg: ExportConfig, threads: int = 1) -> int:
    from cutegpt.export import gguf as gguf_export

    if not cfg.out:
        raise CuteGPTError("--out is required: the .gguf file to write.")
    if cfg.load_in_8bit:
        raise CuteGPTError("--load-in-8bit does not apply to --format gguf; choose the file's precision with --quant.")
    if cfg.dtype != "auto":
        raise CuteGPTError("--dtype applies to --format hf; choose the GGUF tensor type with --quant.")
    out = gguf_export.export_gguf(cfg.model, Path(cfg.out), lora=cfg.lora, quant=cfg.quant, template=cfg.template,
                                  verify=cfg.verify, overwrite=cfg.overwrite, progress=not cfg.quiet,
                                  threads=threads, name=cfg.name)
    report = gguf_export.last_report or {}
    size = out.stat().st_size
    print(f"saved {out} ({cfg.quant}, {size / 2**20:.1f} MiB, {report.get('tensors')} tensors, template {report.get('template')})")
    check = report.get("verification")
    if check:
        top1 = check["top1"]
        if top1.get("skipped"):
            agreement = f"top-1 check skipped ({top1['skipped']})"
        else:
            agreement = (f"top-1 agreement with transformers {top1['agreement']:.1%} over {top1['positions']} positions, "
                         f"greedy continuations {'identical' if top1['greedy_same'] else 'differ'}"
                         + (f" ({top1['greedy_near_ties']} at a near tie)" if top1.get("greedy_near_ties") else ""))
        print(f"verified in llama.cpp: tokenization identical ({check['tokenization']['probe_tokens']} probe tokens), "
              f"chat template renders as in {'templates.py' if report.get('template') == 'cutegpt' else 'transformers'}, {agreement}")
    else:
        print("not verified (--no-verify)")
    if cfg.ollama:
        _write_modelfile(cfg, out, str(report.get("template") or cfg.template or "cutegpt"))
    return 0


def run_export_gguf_lora(cfg: ExportConfig) -> int:
    from cutegpt.export.gguf_lora import export_gguf_lora, lora_metadata

    if cfg.load_in_8bit or cfg.dtype != "auto":
        raise CuteGPTError(f"{'--load-in-8bit' if cfg.load_in_8bit else '--dtype'} does not apply to --format gguf-lora; "
                           f"choose the tensor type with --quant.")
    out = export_gguf_lora(cfg.model, cfg.lora, Path(cfg.out), quant=cfg.quant, overwrite=cfg.overwrite)
    meta = lora_metadata(out)
    print(f"saved {out} (LoRA for {meta.get('general.architecture')}, alpha {meta.get('adapter.lora.alpha'):g}, {cfg.quant}, "
          f"{out.stat().st_size / 2**20:.1f} MiB): run it on the base's GGUF, e.g. "
          f"`cutegpt chat --model base.gguf --lora {out}` or llama.cpp's `--lora {out}`")
    if cfg.ollama:
        _write_modelfile(cfg, out, _adapter_template(cfg), base=Path(cfg.base_gguf or ""))
    return 0


def _adapter_template(cfg: ExportConfig) -> str:
    """The template the adapter answers in: --template, else the one its training recorded, else the base's own."""
    from cutegpt.templates import read_model_card

    return cfg.template or str(read_model_card(cfg.lora or "").get("template") or "auto")


def _write_modelfile(cfg: ExportConfig, out: Path, template: str, base: Path | None = None) -> None:
    from cutegpt.export.ollama import write_modelfile

    try:
        modelfile = write_modelfile(out, template, system=cfg.system, overwrite=cfg.overwrite, base=base)
    except CuteGPTError as e:  # the GGUF file is complete and valid on its own: keep it, say so
        raise CuteGPTError(f"{str(e).rstrip('.')}; {out} was written without a Modelfile.") from None
    print(f"saved {modelfile}: `ollama create NAME -f {modelfile}` imports it")
