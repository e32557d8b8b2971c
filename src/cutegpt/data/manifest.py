"""The on-disk training dataset and its manifest (the contract between `data convert` and `train`).

A dataset folder:

    OUT/
      data/            datasets.Dataset.save_to_disk (Arrow; loads memory-mapped)
      manifest.json    what made it: tokenizer + vocabulary hash, template, max length, packing, seed, counts

Columns of each row (one training sequence, at most max_length tokens, not padded):

    input_ids  list[int32]
    labels     list[int32]   -100 where no loss is taken (prompts, system line, the first token of every sample)
    seq_lens   list[int32]   lengths of the samples packed in this row, in order; they sum to len(input_ids)

      row:      [ s1 s1 s1 s1 | s2 s2 s2 | s3 s3 ]      seq_lens = [4, 3, 2]
      position:   0  1  2  3    0  1  2    0  1
      attention:  each sample sees only itself (block-diagonal causal)

`packing: concat` (the original's layout) stores one entry in seq_lens per row:
there, samples attend to each other on purpose, for reproduction.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cutegpt.errors import CuteGPTError

MANIFEST = "manifest.json"
DATA_DIR = "data"
FORMAT = "cutegpt-dataset"
VERSION = 1


def tokenizer_hash(tokenizer: Any) -> str:
    """A fingerprint of the tokenizer's vocabulary (token -> id, special tokens included)."""
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256()
    for token, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\t{token}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    from cutegpt.model.tokenizer import ids_fingerprint

    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_hash": tokenizer_hash(tokenizer),
        "ids_hash": ids_fingerprint(tokenizer),  # how it tokenizes: same vocabulary, other rule -> other hash
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


# keys a manifest must have (the trainer and `data stats` read them), with their types
REQUIRED = {"format": str, "tokenizer": dict, "max_length": int, "packing": str, "template": str}


def read_manifest(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.exists():
        raise CuteGPTError(f"dataset folder {folder} does not exist.")
    if not path.is_file():
        raise CuteGPTError(f"{folder} is not a CuteGPT dataset: it has no {MANIFEST} (make one with `cutegpt data convert`).")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise CuteGPTError(f"{path}: not valid JSON.") from None
    except OSError as e:
        from cutegpt.io import describe_os_error

        raise CuteGPTError(describe_os_error(e, path, "reading")) from None
    if not isinstance(manifest, dict):
        raise CuteGPTError(f"{path}: a manifest must be a JSON object, not {type(manifest).__name__}; convert the data again.")
    if manifest.get("format") != FORMAT:
        raise CuteGPTError(f"{path}: not a CuteGPT dataset manifest (format is {manifest.get('format')!r}).")
    for key, kind in REQUIRED.items():
        value = manifest.get(key)
        if value is None:
            raise CuteGPTError(f"{path}: the manifest lacks '{key}'; convert the data again.")
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CuteGPTError(f"{path}: the manifest's '{key}' is {type(value).__name__}, not {kind.__name__}; convert the data again.")
    if not isinstance(manifest["tokenizer"].get("vocab_hash"), str):
        raise CuteGPTError(f"{path}: the manifest lacks 'tokenizer.vocab_hash'; convert the data again.")
    if not isinstance(manifest.get("counts", {}), dict):
        raise CuteGPTError(f"{path}: the manifest's 'counts' is not a JSON object; convert the data again.")
    return manifest


def check_tokenizer(manifest: dict[str, Any], tokenizer: Any, folder: str | Path) -> None:
    """Refuse a dataset tokenized with another vocabulary than the model's tokenizer."""
    want = manifest["tokenizer"]["vocab_hash"]
    have = tokenizer_hash(tokenizer)
    if want != have:
        raise CuteGPTError(
            f"{folder} was tokenized with {manifest['tokenizer'].get('name_or_path') or 'another tokenizer'} "
            f"(vocabulary {want}, {manifest['tokenizer'].get('vocab_size')} tokens), not with this model's tokenizer "
            f"{getattr(tokenizer, 'name_or_path', '')} (vocabulary {have}, {len(tokenizer)} tokens); convert the data again with --model."
        )
    info = manifest["tokenizer"]
    _check_tokenization_rule(info, tokenizer, folder)
    # same vocabulary, other special tokens (e.g. EOS <|endoftext|> vs <|im_end|>): the data would end
    # conversations with one id while the model stops on another
    for key, name in (("eos_token_id", "EOS"), ("bos_token_id", "BOS"), ("pad_token_id", "PAD")):
        if key not in info:
            continue  # a manifest from before these were recorded
        have_id = getattr(tokenizer, key, None)
        if info[key] != have_id:
            raise CuteGPTError(
                f"{folder} was converted with {name} id {info[key]} ({_token(tokenizer, info[key])}), but this model's "
                f"tokenizer has {name} id {have_id} ({_token(tokenizer, have_id)}); convert the data again with this --model.")
    stop = manifest.get("stop")
    if isinstance(stop, dict) and isinstance(stop.get("text"), str) and stop["text"]:
        ids = tokenizer(stop["text"], add_special_tokens=False)["input_ids"]
        if list(ids) != list(stop.get("ids") or []):
            raise CuteGPTError(
                f"{folder} was converted with the stop marker {stop['text']!r} as ids {stop.get('ids')}, but this model's "
                f"tokenizer gives {list(ids)}; convert the data again with this --model (and the same --add-stop-token).")


def _check_tokenization_rule(info: dict[str, Any], tokenizer: Any, folder: str | Path) -> None:
    """Same vocabulary, same ids for the same text: a dataset tokenized by another rule teaches other input."""
    from cutegpt.model.tokenizer import ids_fingerprint, is_sentencepiece

    want = info.get("ids_hash")
    if want is None:  # converted before cutegpt recorded how it tokenizes
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and is_sentencepiece(backend):
            raise CuteGPTError(
                f"{folder} was converted before cutegpt tokenized SentencePiece vocabularies as SentencePiece itself does "
                "(text right after <s> or <end>, such as every 问 after a turn's <end>, and leading or repeated spaces got other ids "
                "than the model saw in pre-training and than llama.cpp gives it); convert the data again with `cutegpt data convert`.")
        return
    have = ids_fingerprint(tokenizer)
    if want != have:
        raise CuteGPTError(
            f"{folder} was tokenized by another rule than this model's tokenizer follows (same vocabulary, other ids for the "
            f"same text: probe hash {want} vs {have}); convert the data again with `cutegpt data convert` and this --model.")


def _token(tokenizer: Any, idx: Any) -> str:
    if idx is None:
        return "none"
    try:
        return repr(tokenizer.convert_ids_to_tokens(int(idx)))
    except Exception:
        return "unknown token"


def load_dataset(folder: str | Path, tokenizer: Any = None) -> tuple[Any, dict[str, Any]]:
    """(datasets.Dataset memory-mapped, manifest) of a converted folder; checks the tokenizer when given."""
    from datasets import load_from_disk

    folder = Path(folder)
    manifest = read_manifest(folder)
    if tokenizer is not None:
        check_tokenizer(manifest, tokenizer, folder)
    if not (folder / DATA_DIR).is_dir():
        raise CuteGPTError(f"{folder} has a manifest but no {DATA_DIR}/ folder; convert the data again.")
    try:
        ds = load_from_disk(str(folder / DATA_DIR))
    except Exception as e:  # datasets raises several types for a damaged folder
        raise CuteGPTError(f"{folder / DATA_DIR}: cannot load the dataset ({str(e).splitlines()[0][:200]}).") from None
    return ds, manifest
