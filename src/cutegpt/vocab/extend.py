"""`cutegpt vocab extend`: merge new Chinese pieces into a model's tokenizer, embeddings and output head.

    base model + tokenizer ──┐                        ┌─> OUT/model.safetensors, config.json (vocab padded to --pad-to)
                             ├─ merge pieces (merge.py) ─> OUT/tokenizer.* (+ the base's chat template, specials)
    --pieces (vocab train) ──┘  resize + init rows      └─> OUT/vocab_report.json, cutegpt.json

A new token's rows start as the mean of the rows of the base tokens it replaces:

    new token '中国'  --base tokenizer-->  [ä¸Ń, åĽ½]  (or bytes <0xE4> <0xB8> ... with byte fallback)
    E[中国] = mean(E[ä¸Ń], E[åĽ½]);  the output head likewise when it is not tied to E

Padding rows (up to a multiple of --pad-to) get the mean of all old rows. Every output is checked
before the folder appears (see `checks.py`); a failed check leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from cutegpt.config import arg
from cutegpt.model.tokenizer import save_tokenizer_files
from cutegpt.errors import CuteGPTError
from cutegpt.io import atomic_dir, write_json
from cutegpt.model.args import ModelArgs
from cutegpt.templates import chat_template_jinja, write_model_card
from cutegpt.threads import THREADS_HELP
from cutegpt.vocab.merge import (
    JSON_FILE, SP_FILE, Family, Merged, detect_family, display, load_sp_proto, load_tokenizer_json,
    merge_byte_bpe, merge_sentencepiece, pieces_file,
)
from cutegpt.vocab.text import ENGLISH_PROBES, read_corpus, token_stats
from cutegpt.vocab.train import HELD_OUT_FILE, base_folder

REPORT_FILE = "vocab_report.json"
# Tokenizer files carried over from the base folder unchanged (special tokens, chat template).
CARRIED_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")


@dataclass
class VocabExtendConfig(ModelArgs):
    """Merge new pieces into --model's tokenizer, resize its embeddings and head, save it to --out."""

    dropped_flags: ClassVar[tuple[str, ...]] = ("lora", "load_in_8bit", "int8_backend", "merge_lora")

    pieces: str | None = arg(None, "folder from `cutegpt vocab train` (or a tokenizer.model / tokenizer.json) with the new pieces")
    out: str | None = arg(None, "output folder for the extended model", aliases=("--output", "--output-dir", "--output_dir"))
    pad_to: int = arg(64, "pad the embedding size to a multiple of this (1 = no padding)", ge=1)
    init: Literal["decomposition", "mean"] = arg("decomposition", "new rows: mean of the rows of the base tokens each new token replaces, or the plain mean of all rows")
    max_pieces: int | None = arg(None, "append at most this many new tokens (in the Chinese tokenizer's order)", ge=1, absent="every new piece")
    corpus: list[str] = arg([], "held-out text (.txt/.jsonl) for the before/after statistics", absent="heldout.jsonl of --pieces")
    text_field: str = arg("text", "field holding the text in .jsonl corpus files")
    threads: int = arg(0, THREADS_HELP, ge=0, aliases=("--num-threads",))
    overwrite: bool = arg(False, "replace an existing output folder")


def run_vocab_extend(cfg: VocabExtendConfig) -> int:
    import torch

    from cutegpt.model.loading import load_model
    from cutegpt.threads import apply_threads
    from cutegpt.vocab.checks import run_checks

    t0 = time.perf_counter()
    if not cfg.pieces:
        raise CuteGPTError("--pieces is required: the folder written by `cutegpt vocab train`.")
    if not cfg.out:
        raise CuteGPTError("--out is required: the folder for the extended model.")
    from cutegpt.io import check_input, check_output
    from cutegpt.vocab.train import check_corpus

    out = Path(cfg.out).expanduser()
    pieces_in = check_input(Path(cfg.pieces).expanduser(), flag="--pieces")
    corpus = check_corpus(cfg.corpus, "--corpus")
    base_in = base_folder(cfg.model)
    check_output(out, flag="--out", inputs=[base_in, pieces_in, *corpus], overwrite=cfg.overwrite, kind="folder")
    apply_threads(cfg.threads)
    if cfg.lora or cfg.load_in_8bit:
        raise CuteGPTError("extend a plain model: merge the LoRA adapter first (`cutegpt export`) and do not pass --load-in-8bit.")
    if cfg.pad_to < 1:
        raise CuteGPTError(f"--pad-to must be at least 1, not {cfg.pad_to}.")

    base = base_folder(cfg.model)
    family = detect_family(base)
    pieces_path = Path(cfg.pieces).expanduser()
    pieces_family, pieces_path_file = pieces_file(pieces_path)
    if pieces_family != family:
        raise CuteGPTError(
            f"--pieces {pieces_path} holds a {pieces_family} tokenizer but {base} uses a {family} tokenizer; "
            f"train the pieces with `cutegpt vocab train --model {base}` so the kinds match."
        )
    held = _held_out(cfg, pieces_path)

    # Extension is CPU work (no GPU needed, and `device_map` sharding would only complicate resizing).
    lm = load_model(dataclasses.replace(cfg, device="cpu") if cfg.device == "auto" else cfg)
    base_tok = lm.tokenizer
    merged = _merge(family, base, pieces_path_file, base_tok, cfg.max_pieces)
    if not merged.added:
        raise CuteGPTError(f"--pieces {pieces_path} adds nothing: {base}'s tokenizer already has every Chinese piece in it.")

    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        new_tok = _write_tokenizer(family, base, merged, tmp)
        new_ids = new_tok.convert_tokens_to_ids(merged.added)
        if new_ids != list(range(merged.first_id, merged.first_id + len(merged.added))):
            raise CuteGPTError(f"the merged tokenizer does not give the new pieces the ids {merged.first_id}.. it was built with (a bug; please report it).")
        english_ids = base_tok(ENGLISH_PROBES[0], return_tensors="pt", add_special_tokens=False)["input_ids"].to(lm.model.device)
        with torch.no_grad():
            logits_before = lm.model(english_ids).logits.float()
        rows_before = lm.model.get_input_embeddings().weight.shape[0]

        print(f"Adding {len(merged.added):,} tokens ({family}); resizing embeddings from {rows_before:,} rows.", flush=True)
        sources = decompositions(base_tok, merged.added)
        info = extend_embeddings(lm.model, len(base_tok), new_ids, sources, cfg.init, cfg.pad_to)
        lm.model.save_pretrained(tmp)

        checks = run_checks(base_tok, new_tok, lm.model, tmp, family, held, english_ids, logits_before, len(base_tok),
                            base_sp=base / SP_FILE if family == "sentencepiece" else None)
        before, after = token_stats(base_tok, held), token_stats(new_tok, held)
        report = {
            "family": family, "base": str(base), "pieces": str(pieces_path),
            "pieces_added": len(merged.added), "first_new_id": merged.first_id,
            "skipped_already_in_base": merged.skipped_known, "skipped_not_chinese": merged.skipped_not_cjk,
            "vocab_size_before": len(base_tok), "vocab_size_after": len(new_tok),
            "embedding_rows_before": rows_before, "embedding_rows_after": info["rows"], "pad_to": cfg.pad_to,
            "tied_embeddings": info["tied"], "init": cfg.init,
            "held_out": {"documents": len(held), "before": before.as_dict(), "after": after.as_dict()},
            "checks": checks,
            "examples": [display(t, family) for t in merged.added[:30]],
            "seconds": round(time.perf_counter() - t0, 2),
        }
        write_json(tmp / REPORT_FILE, report)
        if chat_template_jinja(lm.template.name) is not None:  # the extended tokenizer carries the template as Jinja too
            new_tok.chat_template = chat_template_jinja(lm.template.name)
            save_tokenizer_files(new_tok, tmp)
        write_model_card(tmp, lm.template.name, base=str(base), vocab_extension={
            "pieces_added": len(merged.added), "vocab_size": len(new_tok), "init": cfg.init})
    _print_summary(out, report)
    return 0


# ---------------------------------------------------------------------------------------------


def _held_out(cfg: VocabExtendConfig, pieces: Path) -> list[str]:
    if cfg.corpus:
        return read_corpus(cfg.corpus, cfg.text_field)
    default = pieces / HELD_OUT_FILE if pieces.is_dir() else None
    return read_corpus([default]) if default is not None and default.is_file() else []


def _merge(family: Family, base: Path, pieces: Path, base_tok: Any, limit: int | None) -> Merged:
    if family == "sentencepiece":
        proto = load_sp_proto(base / SP_FILE)
        beyond = sorted(i for i in base_tok.added_tokens_decoder if i >= len(proto.pieces))
        if beyond:
            raise CuteGPTError(
                f"{base}'s tokenizer has added tokens after its SentencePiece vocabulary (ids {beyond[0]}..); "
                "new pieces would take their ids: extend the original tokenizer first, then add those tokens again."
            )
        return merge_sentencepiece(proto, load_sp_proto(pieces), limit)
    return merge_byte_bpe(load_tokenizer_json(base / JSON_FILE), load_tokenizer_json(pieces), limit)


def _write_tokenizer(family: Family, base: Path, merged: Merged, dest: Path) -> Any:
    """Write the merged tokenizer (plus the base's specials and chat template) to `dest` and load it back."""
    from cutegpt.model.loading import load_tokenizer

    for name in CARRIED_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, dest / name)
    if family == "sentencepiece":
        (dest / SP_FILE).write_bytes(merged.content.SerializeToString())
        tok = load_tokenizer(dest)  # transformers converts tokenizer.model -> a fast tokenizer
        save_tokenizer_files(tok, dest)  # ... and writes its tokenizer.json; tokenizer.model stays for other tools
    else:
        (dest / JSON_FILE).write_text(json.dumps(merged.content, ensure_ascii=False), encoding="utf-8")
    return load_tokenizer(dest)


def decompositions(base_tok: Any, tokens: list[str]) -> list[list[int]]:
    """Base token ids of each new token, found by running the base BPE on the token's own symbols.

    The BPE model is applied directly (no normalizer, pre-tokenizer or dummy prefix), so a
    byte-level fragment of a character decomposes into the base's bytes and a SentencePiece
    piece into base pieces or byte-fallback pieces.
    """
    model = base_tok.backend_tokenizer.model
    out = []
    for t in tokens:
        ids = [piece.id for piece in model.tokenize(t)]
        if not ids:
            raise CuteGPTError(f"the base tokenizer cannot spell the new token {t!r} (no byte fallback?).")
        out.append(ids)
    return out


def extend_embeddings(model: Any, n_base: int, new_ids: list[int], sources: list[list[int]],
                      init: str, pad_to: int) -> dict[str, Any]:
    """Resize input embeddings and output head together and fill the new rows.

        rows:  [0, n_base)          unchanged
               new_ids              mean of their decomposition rows (init=decomposition) or of all base rows
               the rest up to a multiple of pad_to: mean of all base rows
    """
    import torch

    old_rows = model.get_input_embeddings().weight.shape[0]
    need = max(old_rows, max(new_ids) + 1)
    rows = math.ceil(need / pad_to) * pad_to
    emb_old = model.get_input_embeddings().weight.detach()[:n_base].to(torch.float32, copy=True)  # means in fp32, also for bf16
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    head_old = head.weight.detach()[:n_base].to(torch.float32, copy=True) if head is not None and not tied else None

    model.resize_token_embeddings(rows, mean_resizing=False)  # keeps tying; we fill the new rows below
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        for matrix, old in ((emb, emb_old), (None if head_old is None else model.get_output_embeddings().weight, head_old)):
            if matrix is None:
                continue
            mean = old.mean(0)
            matrix[old_rows:] = mean
            for tid, src in zip(new_ids, sources):
                matrix[tid] = old[src].mean(0) if init == "decomposition" else mean
    return {"rows": rows, "tied": tied}


def _print_summary(out: Path, r: dict[str, Any]) -> None:
    b, a = r["held_out"]["before"], r["held_out"]["after"]
    print(f"Extended vocabulary {r['vocab_size_before']:,} -> {r['vocab_size_after']:,} tokens "
          f"(+{r['pieces_added']:,}; embedding rows {r['embedding_rows_before']:,} -> {r['embedding_rows_after']:,}).")
    if r["held_out"]["documents"]:
        print(f"Held-out text ({r['held_out']['documents']} documents): tokens per Chinese character "
              f"{b['tokens_per_chinese_char']} -> {a['tokens_per_chinese_char']}.")
    print("Checks passed: " + ", ".join(k for k, v in r["checks"].items() if isinstance(v, dict) and v.get("ok")))
    print(f"Model and tokenizer -> {out}   (report: {out / REPORT_FILE})")
