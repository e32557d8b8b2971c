"""The checks `vocab extend` runs before its output folder appears (and the tests run again).

    english        English and code (and held-out text without CJK) tokenize to exactly the same ids
    round_trip     decode(encode(x)) == x for Chinese, English, mixed text, emoji, rare characters
                   and the held-out documents (each text the base tokenizer round-trips)
    sentencepiece  the tokenizer.model and the fast tokenizer.json agree (SentencePiece family)
    logits         on English input the extended model's logits over the base vocabulary equal the
                   base model's
    reload         plain transformers loads the saved folder: tokenizer and embedding sizes agree,
                   tokenization and logits are those of the model in memory

A failure raises CuteGPTError inside `atomic_dir`, so nothing is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from cutegpt.errors import CuteGPTError
from cutegpt.vocab.text import CODE_PROBES, ENGLISH_PROBES, ROUND_TRIP_PROBES, has_cjk

MAX_DOCS = 300  # held-out documents used by the checks (the statistics use all of them)


def _ids(tok: Any, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _round_trips(tok: Any, text: str) -> bool:
    return tok.decode(_ids(tok, text), skip_special_tokens=False, clean_up_tokenization_spaces=False) == text


def _fail(check: str, detail: str) -> CuteGPTError:
    return CuteGPTError(f"vocabulary extension check '{check}' failed: {detail}; nothing was written.")


def check_english(base_tok: Any, new_tok: Any, held: Sequence[str]) -> dict[str, Any]:
    texts = ENGLISH_PROBES + CODE_PROBES + [d for d in held if not has_cjk(d)][:MAX_DOCS]
    for text in texts:
        if _ids(base_tok, text) != _ids(new_tok, text):
            raise _fail("english", f"the text {text[:60]!r} tokenizes differently after the extension")
    return {"ok": True, "texts": len(texts)}


def check_round_trip(base_tok: Any, new_tok: Any, held: Sequence[str]) -> dict[str, Any]:
    texts = ROUND_TRIP_PROBES + ENGLISH_PROBES + CODE_PROBES + list(held[:MAX_DOCS])
    checked = 0
    for text in texts:
        if not _round_trips(base_tok, text):
            continue  # e.g. a leading space the base's decoder drops: not ours to fix
        checked += 1
        if not _round_trips(new_tok, text):
            raise _fail("round_trip", f"decode(encode(x)) != x for {text[:60]!r}")
    return {"ok": True, "texts": checked, "skipped_base_fails": len(texts) - checked}


def check_sentencepiece(base_dir_sp: Path | None, new_sp: Path, base_tok: Any, new_tok: Any, held: Sequence[str]) -> dict[str, Any]:
    """The SentencePiece model and transformers' fast tokenizer agree wherever they agreed on the base."""
    import sentencepiece as spm

    sp_new = spm.SentencePieceProcessor(model_file=str(new_sp))
    sp_base = spm.SentencePieceProcessor(model_file=str(base_dir_sp)) if base_dir_sp else None
    texts = ROUND_TRIP_PROBES + ENGLISH_PROBES + CODE_PROBES + list(held[:MAX_DOCS])
    checked = 0
    for text in texts:
        if sp_base is not None and sp_base.encode(text) != _ids(base_tok, text):
            continue
        checked += 1
        if sp_new.encode(text) != _ids(new_tok, text):
            raise _fail("sentencepiece", f"tokenizer.model and tokenizer.json disagree on {text[:60]!r}")
    return {"ok": True, "texts": checked}


def check_logits(model: Any, english_ids: torch.Tensor, logits_before: torch.Tensor, n_base: int) -> dict[str, Any]:
    with torch.no_grad():
        after = model(english_ids).logits.float()[..., :n_base]  # english_ids is already on the model's device
    diff = (after - logits_before[..., :n_base]).abs().max().item()
    if diff > 1e-4:
        raise _fail("logits", f"English logits changed by {diff:.2e}")
    return {"ok": True, "max_abs_diff": diff}


def check_reload(folder: Path, model: Any, new_tok: Any) -> dict[str, Any]:
    """Load the folder from disk (the tokenizer as every cutegpt command loads it) and compare with what is in memory."""
    from transformers import AutoModelForCausalLM

    from cutegpt.model.tokenizer import load_tokenizer

    tok = load_tokenizer(folder)
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=next(model.parameters()).dtype)
    rows_in = loaded.get_input_embeddings().weight.shape[0]
    head = loaded.get_output_embeddings()
    rows_out = head.weight.shape[0] if head is not None else rows_in
    if not rows_in == rows_out == loaded.config.vocab_size:
        raise _fail("reload", f"embedding rows {rows_in}, head rows {rows_out} and config vocab_size {loaded.config.vocab_size} differ")
    if len(tok) > rows_in:
        raise _fail("reload", f"the saved tokenizer has {len(tok)} tokens but the model only {rows_in} embedding rows")
    text = ROUND_TRIP_PROBES[2]
    ids = _ids(tok, text)
    if ids != _ids(new_tok, text):
        raise _fail("reload", "the reloaded tokenizer tokenizes differently from the one in memory")
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (loaded(x).logits.float() - model(x.to(model.device)).logits.float().cpu()).abs().max().item()
    if diff > 1e-4:
        raise _fail("reload", f"the reloaded model's logits differ by {diff:.2e}")
    return {"ok": True, "tokenizer_size": len(tok), "embedding_rows": rows_in, "max_abs_diff": diff}


def run_checks(base_tok: Any, new_tok: Any, model: Any, folder: Path, family: str, held: Sequence[str],
               english_ids: torch.Tensor, logits_before: torch.Tensor, n_base: int, base_sp: Path | None = None) -> dict[str, Any]:
    checks = {
        "english": check_english(base_tok, new_tok, held),
        "round_trip": check_round_trip(base_tok, new_tok, held),
    }
    if family == "sentencepiece":
        checks["sentencepiece"] = check_sentencepiece(base_sp, folder / "tokenizer.model", base_tok, new_tok, held)
    checks["logits"] = check_logits(model, english_ids, logits_before, n_base)
    checks["reload"] = check_reload(folder, model, new_tok)
    return checks
