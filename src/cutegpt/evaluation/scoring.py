"""Score multiple-choice prompts: batched, with the subject's shared prefix computed once.

Every question of a subject starts with the same tokens (header + few-shot
examples). We run that prefix once, keep its KV cache, copy it over the batch,
and feed only each question's own tokens, right-padded:

    prefix (once):  [以下是中国关于…考试的单项选择题… shot1 … shot5]  -> KV cache (1, P)
    batch:          cache expanded to (B, P)
                    row 0: [q0 q0 q0 q0 q0 q0]       <- longest first (sorted by length)
                    row 1: [q1 q1 q1 q1 pad pad]     <- pads come after the real tokens, so
                    row 2: [q2 q2 q2 pad pad pad]       causal attention never lets a real token
                                                        see them; positions run P, P+1, … as usual
    read:           logits at each row's last real token (only those positions go through
                    the output layer: `logits_to_keep`)

The shared prefix is found on token ids (the longest common prefix of the
tokenized full prompts), not on text, so a tokenizer that merges across the
prefix/question boundary still sees exactly the brute-force tokens.

`brute_force` is the reference: one question at a time, full prompt, no cache.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from cutegpt.model.kv import cache_kwarg, new_cache


@dataclass(frozen=True)
class Item:
    """One question ready to score: its full prompt ids and one continuation per option."""

    ids: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]  # per option; single-token for the logits method


@dataclass(frozen=True)
class Scored:
    scores: tuple[float, ...]  # logits method: raw logit; loglikelihood: sum of log-probabilities
    probs: tuple[float, ...]  # softmax over the options' scores

    @property
    def best(self) -> int:
        return max(range(len(self.scores)), key=lambda i: (self.scores[i], -i))

    def rank_of(self, gold: int) -> int:
        """1-based rank of option `gold` (ties count against it), for MRR."""
        return 1 + sum(1 for i, s in enumerate(self.scores) if i != gold and s >= self.scores[gold])


@dataclass(frozen=True)
class _Row:
    item: int
    ids: tuple[int, ...]
    targets: tuple[tuple[int, int, int], ...]  # (position in ids, token id, option index)


def _rows(items: Sequence[Item]) -> list[_Row]:
    """One row per question when every option is a single token; else one row per option."""
    rows: list[_Row] = []
    for n, item in enumerate(items):
        last = len(item.ids) - 1
        if all(len(c) == 1 for c in item.continuations):
            rows.append(_Row(n, item.ids, tuple((last, c[0], j) for j, c in enumerate(item.continuations))))
            continue
        for j, cont in enumerate(item.continuations):
            ids = item.ids + cont[:-1]
            rows.append(_Row(n, ids, tuple((last + t, tok, j) for t, tok in enumerate(cont))))
    return rows


def _finish(items: Sequence[Item], rows: Sequence[_Row], values: dict[tuple[int, int], float]) -> list[Scored]:
    """Sum the per-target values into option scores; softmax over options."""
    sums: list[list[float]] = [[0.0] * len(it.continuations) for it in items]
    for r, row in enumerate(rows):
        for t, (_pos, _tok, j) in enumerate(row.targets):
            sums[row.item][j] += values[(r, t)]
    out = []
    for s in sums:
        probs = torch.softmax(torch.tensor(s, dtype=torch.float64), dim=0).tolist()
        out.append(Scored(tuple(s), tuple(probs)))
    return out


@torch.no_grad()
def brute_force(model: Any, items: Sequence[Item], method: str = "logits") -> list[Scored]:
    """Reference path: each row alone, full prompt, no cache, all logits."""
    rows = _rows(items)
    values: dict[tuple[int, int], float] = {}  # (row, target index) -> value
    for r, row in enumerate(rows):
        logits = model(torch.tensor([row.ids]), use_cache=False).logits[0]  # (T, V)
        for t, (pos, tok, _j) in enumerate(row.targets):
            v = float(logits[pos, tok]) if method == "logits" else float(torch.log_softmax(logits[pos].float(), -1)[tok])
            values[(r, t)] = v
    return _finish(items, rows, values)


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Tokens shared by all sequences, leaving at least one own token per sequence."""
    if not seqs:
        return 0
    first = seqs[0]
    n = min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def _batches(order: list[int], lengths: list[int], batch_size: int, max_tokens: int) -> list[list[int]]:
    """Greedy batches of rows already sorted longest first; padded size B x L_max stays under max_tokens."""
    out: list[list[int]] = []
    cur: list[int] = []
    for r in order:
        width = lengths[cur[0]] if cur else lengths[r]
        if cur and (len(cur) >= batch_size or (len(cur) + 1) * width > max_tokens):
            out.append(cur)
            cur = []
        cur.append(r)
    if cur:
        out.append(cur)
    return out


@torch.no_grad()
def score_items(model: Any, items: Sequence[Item], method: str = "logits", batch_size: int = 16,
                max_batch_tokens: int = 4096, pad_id: int = 0, use_prefix_cache: bool = True,
                progress: Callable[[int], None] | None = None) -> list[Scored]:
    """Score `items` (normally one subject's questions) in batches over a shared-prefix KV cache.

    `progress(n)` is called with the number of questions finished after each batch.
    """
    if not items:
        return []
    device = next(model.parameters()).device
    rows = _rows(items)
    prefix_len = common_prefix_length([r.ids for r in rows]) if use_prefix_cache else 0
    prefix_cache = None
    cache_kw = cache_kwarg(model)  # reads the forward's signature: once, not per batch
    if prefix_len > 0:
        prefix = torch.tensor([rows[0].ids[:prefix_len]], device=device)
        prefix_cache = new_cache(model)
        model(prefix, use_cache=True, **{cache_kw: prefix_cache})  # fills prefix_cache in place

    suffix_len = [len(r.ids) - prefix_len for r in rows]
    order = sorted(range(len(rows)), key=lambda r: -suffix_len[r])
    values: dict[tuple[int, int], float] = {}
    rows_left = {n: 0 for n in range(len(items))}
    for r in rows:
        rows_left[r.item] += 1
    for batch in _batches(order, suffix_len, batch_size, max_batch_tokens):
        width = max(suffix_len[r] for r in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long, device=device)
        for b, r in enumerate(batch):
            input_ids[b, : suffix_len[r]] = torch.tensor(rows[r].ids[prefix_len:], device=device)
        # Positions (relative to the suffix) whose logits we need: only these meet the output layer.
        needed = sorted({pos - prefix_len for r in batch for pos, _t, _j in rows[r].targets})
        column = {p: k for k, p in enumerate(needed)}
        kwargs: dict[str, Any] = {"use_cache": prefix_cache is not None,
                                  "logits_to_keep": torch.tensor(needed, device=device)}
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(batch))
            kwargs[cache_kw] = cache
        logits = model(input_ids, **kwargs).logits  # (B, K, V)
        for b, r in enumerate(batch):
            row = rows[r]
            logp: dict[int, torch.Tensor] = {}
            for t, (pos, tok, _j) in enumerate(row.targets):
                k = column[pos - prefix_len]
                if method == "logits":
                    values[(r, t)] = float(logits[b, k, tok])
                else:
                    if k not in logp:
                        logp[k] = torch.log_softmax(logits[b, k].float(), -1)
                    values[(r, t)] = float(logp[k][tok])
        if progress is not None:
            done = 0
            for r in batch:
                rows_left[rows[r].item] -= 1
                done += rows_left[rows[r].item] == 0
            progress(done)
    scored = _finish(items, rows, values)
    for s in scored:
        if any(math.isnan(x) for x in s.scores):
            raise FloatingPointError("the model produced NaN logits (try --dtype float32)")
    return scored
