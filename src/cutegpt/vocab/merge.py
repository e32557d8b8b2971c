"""Merging new Chinese pieces into a base tokenizer, for the two families LLaMA models use.

SentencePiece (`tokenizer.model`, original LLaMA, CuteGPT's base):

    base pieces  [<unk> <s> </s> <0x00>..<0xFF> ▁t er ... ]   scores  0 ... -31741 (lowest)
    appended                                   [中 国 中国 ...]  scores -31742, -31743, ...

  Only pieces the base lacks and that are made of CJK characters are appended, each scored below
  every existing piece: BPE applies merges by score, so the base's merges all run first and only
  then may two base pieces join into a new CJK piece. Descending scores keep SentencePiece and the
  fast tokenizer transformers converts from it in agreement (measured: with score 0 they disagree).

Byte-level BPE (`tokenizer.json`, GPT-2 style: SmolLM2, LLaMA-3):

    vocab    {..., 49151: 'ĠOS'} + {49152: 'ä¸Ń', 49153: 'åĽ½', 49154: 'ä¸ŃåĽ½', ...}
    merges   [... 48,900 base merges ...] + [('ä¸', 'Ń'), ('åĽ', '½'), ('ä¸Ń', 'åĽ½'), ...]

  New merges go after the base's, and only those whose result is a fragment of CJK text (see
  `text.is_cjk_fragment`): such a result always holds a byte >= 0x80, so ASCII text (English,
  code) can never reach it and is tokenized exactly as before.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from cutegpt.errors import CuteGPTError
from cutegpt.vocab.text import is_cjk_fragment, is_cjk_piece

Family = Literal["sentencepiece", "byte-bpe"]
SP_FILE = "tokenizer.model"
JSON_FILE = "tokenizer.json"
SP_SPACE = "\u2581"  # ▁


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: printable stand-in character -> byte value."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(token: str) -> bytes | None:
    """Raw bytes of a byte-level token, or None when it is not written in the byte-level alphabet."""
    dec = byte_decoder()
    try:
        return bytes(dec[ch] for ch in token)
    except KeyError:
        return None


# ---------------------------------------------------------------------------------------------
# Family detection


def load_sp_proto(path: Path) -> Any:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception:
        raise CuteGPTError(f"{path}: not a SentencePiece model file.") from None
    if not proto.pieces:
        raise CuteGPTError(f"{path}: not a SentencePiece model file (it has no pieces).")
    return proto


def load_tokenizer_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CuteGPTError(f"{path}: not a valid tokenizer.json (not JSON).") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise CuteGPTError(f"{path}: not a tokenizers file (no 'model' section).")
    return data


def is_byte_level(data: dict[str, Any]) -> bool:
    return data["model"].get("type") == "BPE" and "ByteLevel" in json.dumps(data.get("pre_tokenizer"))


def detect_family(folder: Path) -> Family:
    """`sentencepiece` when the folder has a tokenizer.model, `byte-bpe` for a byte-level BPE tokenizer.json."""
    if (folder / SP_FILE).is_file():
        proto = load_sp_proto(folder / SP_FILE)
        if proto.trainer_spec.model_type not in (1, 2):  # UNIGRAM, BPE
            raise CuteGPTError(f"{folder / SP_FILE}: SentencePiece model type {proto.trainer_spec.model_type} is not supported (only BPE and unigram).")
        return "sentencepiece"
    if (folder / JSON_FILE).is_file():
        data = load_tokenizer_json(folder / JSON_FILE)
        if is_byte_level(data):
            return "byte-bpe"
        raise CuteGPTError(
            f"{folder / JSON_FILE}: a {data['model'].get('type')} tokenizer without byte-level pre-tokenization is not supported; "
            "vocabulary extension works on SentencePiece tokenizer.model files and byte-level BPE tokenizer.json files."
        )
    raise CuteGPTError(f"{folder} has neither a tokenizer.model nor a tokenizer.json, so its tokenizer cannot be extended.")


def pieces_file(path: Path) -> tuple[Family, Path]:
    """The tokenizer file in a `vocab train` output folder (or the file itself)."""
    if not path.exists():
        raise CuteGPTError(f"--pieces {path} does not exist.")
    if path.is_dir():
        family = detect_family(path)
        return family, path / (SP_FILE if family == "sentencepiece" else JSON_FILE)
    if path.suffix == ".model":
        load_sp_proto(path)
        return "sentencepiece", path
    if path.suffix == ".json":
        if not is_byte_level(load_tokenizer_json(path)):
            raise CuteGPTError(f"{path}: not a byte-level BPE tokenizer.json.")
        return "byte-bpe", path
    raise CuteGPTError(f"--pieces {path}: expected a folder from `cutegpt vocab train`, a tokenizer.model or a tokenizer.json.")


# ---------------------------------------------------------------------------------------------
# SentencePiece


@dataclass
class Merged:
    """The result of a merge: the new tokenizer file's content and what was added."""

    content: Any                       # ModelProto (SentencePiece) or dict (tokenizer.json)
    added: list[str] = field(default_factory=list)   # new tokens in id order (as written in the vocabulary)
    first_id: int = 0                  # id of added[0]
    skipped_known: int = 0             # candidate pieces the base already had
    skipped_not_cjk: int = 0           # candidate pieces dropped because they are not CJK text


def sp_candidate_pieces(proto: Any) -> list[tuple[str, float]]:
    """(piece, score) of the ordinary pieces of a trained SentencePiece model, in file order."""
    return [(p.piece, p.score) for p in proto.pieces if p.type in (1, 4)]  # NORMAL, USER_DEFINED


def merge_sentencepiece(base: Any, new: Any, limit: int | None = None) -> Merged:
    """Append the CJK pieces of `new` that `base` lacks, scored below every base piece."""
    out = copy.deepcopy(base)
    known = {p.piece for p in base.pieces}
    normal = [p.score for p in base.pieces if p.type == 1]
    floor = min(normal) if normal else 0.0
    unigram = base.trainer_spec.model_type == 1 and new.trainer_spec.model_type == 1
    result = Merged(out, first_id=len(base.pieces))
    for piece, score in sp_candidate_pieces(new):
        if piece in known:
            result.skipped_known += 1
            continue
        if not is_cjk_piece(piece.replace(SP_SPACE, " ")):
            result.skipped_not_cjk += 1
            continue
        if limit is not None and len(result.added) >= limit:
            break
        p = out.pieces.add()
        p.piece = piece
        p.type = 1
        # BPE: below every base score, in the new model's order. Unigram: the new model's own log-probability.
        p.score = score if unigram else floor - 1.0 - len(result.added)
        known.add(piece)
        result.added.append(piece)
    return result


# ---------------------------------------------------------------------------------------------
# Byte-level BPE


def _pairs(merges: list[Any]) -> list[tuple[str, str]]:
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]  # type: ignore[misc]


def merge_byte_bpe(base: dict[str, Any], new: dict[str, Any], limit: int | None = None) -> Merged:
    """Append `new`'s merges whose result is CJK text (and their tokens) after `base`'s."""
    out = copy.deepcopy(base)
    model = out["model"]
    vocab: dict[str, int] = model["vocab"]
    base_merges = model["merges"]
    as_strings = bool(base_merges) and isinstance(base_merges[0], str)
    have = set(_pairs(base_merges))
    ids = list(vocab.values()) + [t["id"] for t in out.get("added_tokens", [])]
    next_id = max(ids) + 1 if ids else 0
    result = Merged(out, first_id=next_id)
    for a, b in _pairs(new["model"]["merges"]):
        joined = a + b
        raw = token_bytes(joined)
        if raw is None or not is_cjk_fragment(raw):
            result.skipped_not_cjk += 1
            continue
        if a not in vocab or b not in vocab:
            continue  # built on a part that was dropped (not CJK); unreachable anyway
        if (a, b) in have:
            result.skipped_known += 1
            continue
        if joined not in vocab:
            if limit is not None and len(result.added) >= limit:
                break
            vocab[joined] = next_id
            next_id += 1
            result.added.append(joined)
        base_merges.append(f"{a} {b}" if as_strings else [a, b])
        have.add((a, b))
    return result


def display(token: str, family: Family) -> str:
    """Readable text of a token (byte-level fragments of a character shown as \\x escapes)."""
    if family == "sentencepiece":
        return token.replace(SP_SPACE, " ")
    raw = token_bytes(token)
    return raw.decode("utf-8", errors="backslashreplace") if raw is not None else token
