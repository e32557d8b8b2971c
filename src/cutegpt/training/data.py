"""Training rows: packed datasets from `data convert`, raw text for pre-training, and the collator.

Packed rows keep samples apart with position ids alone:

    row         [ a a a a | b b b | c c ]  + padding to the batch's longest row
    position_ids  0 1 2 3   0 1 2   0 1    4 5 6 ...   (padding continues the last sample)
    labels        - x x x   - x x   - x    - - - ...   (-100 at each sample's first token)

transformers turns restarting position ids into a block-diagonal causal mask
(SDPA, eager) or variable-length attention (flash_attention_2), but only when
no KV cache is built: the collator therefore sends `use_cache=False`
with every batch. Padding sits at the end of a row, so causal attention keeps
every real token from seeing it, and its labels are -100.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from cutegpt.data.text import read_documents
from cutegpt.errors import CuteGPTError

IGNORE = -100


def position_ids_for(seq_lens: Sequence[int], length: int) -> list[int]:
    """Per-sample positions for a row of `length` tokens (padding continues the last sample)."""
    pos: list[int] = []
    for n in seq_lens:
        pos.extend(range(n))
    start = seq_lens[-1] if seq_lens else 0
    pos.extend(range(start, start + length - len(pos)))
    return pos


@dataclass
class PackedCollator:
    """Pads rows of (input_ids, labels, seq_lens) to the longest in the batch; no attention mask."""

    pad_id: int
    pad_to_multiple_of: int = 1

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        longest = max(len(r["input_ids"]) for r in rows)
        m = self.pad_to_multiple_of
        longest = (longest + m - 1) // m * m
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
        pos = torch.zeros((len(rows), longest), dtype=torch.long)
        real = 0
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.as_tensor(r["labels"], dtype=torch.long)
            seq_lens = list(r.get("seq_lens") or [n])
            pos[i] = torch.as_tensor(position_ids_for(seq_lens, longest), dtype=torch.long)
            real += n
        # n_tokens is popped by the trainer (tokens/s); use_cache=False makes position ids act as sample boundaries
        return {"input_ids": ids, "labels": labels, "position_ids": pos, "use_cache": False, "n_tokens": real}


def load_packed_dataset(folder: str | Path, tokenizer: Any) -> tuple[Any, dict[str, Any]]:
    """A `data convert` dataset the trainer can use: same tokenizer, the needed columns, not empty."""
    from cutegpt.data.manifest import DATA_DIR, load_dataset

    folder = Path(folder)
    ds, manifest = load_dataset(folder, tokenizer)
    missing = {"input_ids", "labels"} - set(ds.column_names)
    if missing:
        raise CuteGPTError(f"{folder / DATA_DIR}: the dataset has no column(s) {', '.join(sorted(missing))}.")
    if len(ds) == 0:
        raise CuteGPTError(f"{folder / DATA_DIR}: the dataset is empty.")
    return ds, manifest


# ---------------------------------------------------------------- pre-training text

def pack_documents(docs: Iterable[list[int]], block: int) -> dict[str, list[list[int]]]:
    """Concatenate token lists into blocks of `block` tokens, recording where each document piece starts.

        docs:    [a a a a a a] [b b b] [c c c c]     block = 5
        rows:    [a a a a a] [a | b b b | c] [c c c]  seq_lens [5] [1, 3, 1] [3]

    A document cut by a block edge continues in the next row as a new piece (it
    cannot attend across rows anyway). The first token of every piece gets no
    loss: nothing before it in its piece predicts it.
    """
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "seq_lens": []}
    ids: list[int] = []
    labels: list[int] = []
    lens: list[int] = []

    def flush() -> None:
        nonlocal ids, labels, lens
        if ids:
            rows["input_ids"].append(ids)
            rows["labels"].append(labels)
            rows["seq_lens"].append(lens)
        ids, labels, lens = [], [], []

    for doc in docs:
        while doc:
            room = block - len(ids)
            piece, doc = doc[:room], doc[room:]
            ids += piece
            labels += [IGNORE] + piece[1:]
            lens.append(len(piece))
            if len(ids) == block:
                flush()
    flush()
    return rows


def pretraining_dataset(paths: Sequence[str | Path], tokenizer: Any, block: int, text_field: str = "text",
                        val_ratio: float = 0.0, seed: int = 0) -> Any:
    """Tokenize documents (EOS appended to each) and pack them into rows of `block` tokens.

    With `val_ratio`, a seeded share of whole documents is held out and packed
    apart: returns (training rows, validation rows).
    """
    from datasets import Dataset

    if tokenizer.eos_token_id is None:
        raise CuteGPTError(f"the tokenizer {tokenizer.name_or_path} has no EOS token to separate documents.")
    eos = tokenizer.eos_token_id

    def tokenized() -> Iterable[list[int]]:
        batch: list[str] = []
        for text in read_documents(paths, text_field):
            batch.append(text)
            if len(batch) == 256:
                yield from (ids + [eos] for ids in tokenizer(batch, add_special_tokens=False)["input_ids"])
                batch = []
        if batch:
            yield from (ids + [eos] for ids in tokenizer(batch, add_special_tokens=False)["input_ids"])

    if val_ratio:
        from cutegpt.training.validation import choose

        docs = list(tokenized())
        held = choose(len(docs), val_ratio, seed)
        train = pack_documents((d for i, d in enumerate(docs) if i not in held), block)
        val = pack_documents((d for i, d in enumerate(docs) if i in held), block)
        return Dataset.from_dict(train), Dataset.from_dict(val)
    rows = pack_documents(tokenized(), block)
    if not rows["input_ids"]:
        raise CuteGPTError(f"no text found in {', '.join(map(str, paths))}.")
    return Dataset.from_dict(rows)
