"""Validation: a seeded split of whole conversations, and the loss on packed, isolated rows.

    packed rows  [a a a | b b | c c c c]  [d d | e e e]
    samples       a, b, c, d, e            (cut at seq_lens: one conversation each)
    seeded pick   val = {b, e}             (--val-ratio of the samples, at least one)
    repacked      train rows [a a a | c c c c] [d d]    val rows [b b | e e e]

A sample never straddles the split, and validation rows are packed like
training rows (restarting position ids keep samples apart), so the validation
loss equals the loss of each held-out conversation computed alone, summed over
its loss-bearing tokens and divided by their count.
"""

from __future__ import annotations

import sys

import random
from typing import Any

import torch

from cutegpt.errors import CuteGPTError

IGNORE = -100


def unpack(ds: Any) -> list[tuple[list[int], list[int]]]:
    """The samples (input_ids, labels) inside packed rows, in order."""
    out = []
    for row in ds:
        ids, labels = row["input_ids"], row["labels"]
        lens = row.get("seq_lens") or [len(ids)]
        start = 0
        for n in lens:
            out.append((list(ids[start:start + n]), list(labels[start:start + n])))
            start += n
    return out


def pack(samples: list[tuple[list[int], list[int]]], max_length: int) -> Any:
    from datasets import Dataset

    from cutegpt.data.packing import pack_bins

    lengths = [len(s[0]) for s in samples]
    bins = pack_bins(lengths, max(max_length, max(lengths)))
    rows: dict[str, list] = {"input_ids": [], "labels": [], "seq_lens": []}
    for b in bins:
        rows["input_ids"].append([t for i in b for t in samples[i][0]])
        rows["labels"].append([t for i in b for t in samples[i][1]])
        rows["seq_lens"].append([lengths[i] for i in b])
    return Dataset.from_dict(rows)


def choose(n: int, ratio: float, seed: int) -> set[int]:
    """Indices of the held-out items: round(ratio * n), at least one, leaving at least one to train on."""
    if n < 2:
        raise CuteGPTError(f"--val-ratio needs at least two conversations or documents; the data has {n}.")
    k = min(n - 1, max(1, round(ratio * n)))
    return set(random.Random(seed).sample(range(n), k))


def split_packed(ds: Any, ratio: float, seed: int, max_length: int) -> tuple[Any, Any]:
    """(train rows, validation rows): whole samples held out, both sides packed again."""
    samples = unpack(ds)
    held = choose(len(samples), ratio, seed)
    train = [s for i, s in enumerate(samples) if i not in held]
    val = [s for i, s in enumerate(samples) if i in held]
    return pack(train, max_length), pack(val, max_length)


@torch.no_grad()
def validation_loss(model: Any, dataset: Any, collator: Any, micro_batch: int, precision: str, show: bool = True) -> float:
    """Mean loss over every loss-bearing token of `dataset` (no dropout), as the training rows compute it.

    A progress bar (stderr) shows the pass: on a large validation set it took minutes with no sign of life.
    """
    from tqdm import tqdm

    # Only dropout goes to eval mode: bitsandbytes repacks 4-bit weights for CPU inference in eval mode,
    # a format training cannot continue from; the model's own layers have no dropout at p=0 anyway.
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.training]
    for m in dropouts:
        m.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    bar = tqdm(total=len(dataset), desc="validation", unit="row", leave=False, disable=not show, file=sys.stderr)
    try:
        for s in range(0, len(dataset), micro_batch):
            batch = collator([dataset[i] for i in range(s, min(s + micro_batch, len(dataset)))])
            batch.pop("n_tokens", None)
            labels = batch.pop("labels").to(device)
            inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(**inputs).logits
            bar.update(min(micro_batch, len(dataset) - s))
            targets = labels[:, 1:]
            mask = targets != IGNORE
            if not mask.any():
                continue
            lg = logits[:, :-1][mask].float()
            total += float(torch.nn.functional.cross_entropy(lg, targets[mask], reduction="sum"))
            count += int(mask.sum())
    finally:
        bar.close()
        for m in dropouts:
            m.train()
    if count == 0:
        raise CuteGPTError("the validation data has no token to compute a loss on.")
    return total / count
