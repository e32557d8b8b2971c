"""Attention over packed rows that computes each sample's causal triangle only (`--attn-implementation segments`).

A packed row holds several samples; transformers gives SDPA a block-diagonal mask for it, and SDPA's CPU
kernel then computes every L x L block of the row, masked or not. Here each sample is one causal SDPA call
on its own slice:

    row          [ a a a | b b | c c c c ]           positions 0 1 2 0 1 0 1 2 3
    SDPA + mask  L^2 = 81 scores                     segments  3^2 + 2^2 + 4^2 = 29, half of each skipped (causal)

The samples are read from the position ids (a new sample restarts them), as transformers reads them to
build the mask. The mask is still built, and used to check: the segments run only when the mask is exactly
the causal block-diagonal mask of those samples. Anything else (padding masks, a sliding window shorter
than a sample, DPO's pair rows) goes to plain SDPA with the mask, so the result never differs from SDPA's.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

NAME = "cutegpt_segments"
_checked: tuple[Any, list[list[int]] | None] | None = None  # (weakref to the last mask, what _segments said)


def bounds(position_ids: torch.Tensor) -> list[list[int]]:
    """Start of every sample and the row's end, per row: a sample starts where positions do not go up by one."""
    out = []
    for row in position_ids.tolist():
        starts = [0] + [i for i in range(1, len(row)) if row[i] != row[i - 1] + 1]
        out.append(starts + [len(row)])
    return out


def is_segment_mask(mask: torch.Tensor, cuts: list[list[int]]) -> bool:
    """Whether `mask` (B, 1|H, L, L; bool = may attend, or float 0 / -inf) is the causal block-diagonal mask of `cuts`."""
    length = mask.shape[-1]
    if mask.shape[-2] != length:
        return False
    allowed = mask if mask.dtype == torch.bool else mask == 0
    seg = torch.zeros(len(cuts), length, dtype=torch.long)
    for b, row in enumerate(cuts):
        for k, (s, e) in enumerate(zip(row, row[1:])):
            seg[b, s:e] = k
    want = (seg[:, :, None] == seg[:, None, :]) & torch.ones(length, length, dtype=torch.bool).tril()
    return bool(torch.equal(allowed.to("cpu"), want[:, None].expand(allowed.shape)))


def _segments(mask: torch.Tensor, position_ids: torch.Tensor) -> list[list[int]] | None:
    """The rows' sample bounds when the segments should run: `mask` is exactly their causal block-diagonal mask and
    some row holds more than one sample (else SDPA's own call is as cheap). Worked out once per forward: every
    layer gets the same mask object."""
    global _checked
    if _checked is not None and _checked[0]() is mask:
        return _checked[1]
    cuts = bounds(position_ids)
    useful = mask.shape[0] == len(cuts) and any(len(row) > 2 for row in cuts) and is_segment_mask(mask, cuts)
    _checked = (weakref.ref(mask), cuts if useful else None)
    return _checked[1]


def segment_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query (B, H, L, D), key/value (B, H_kv, L, D) -> (B, L, H, D)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    # transformers drops the mask when rows are neither packed nor padded; a KV cache (generation) gives keys
    # longer than the queries: plain SDPA for both
    cuts = None
    if attention_mask is not None and position_ids is not None and query.shape[2] == key.shape[2]:
        cuts = _segments(attention_mask, position_ids)
    if cuts is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    kwargs.pop("is_causal", None)
    rows = []
    for b, row in enumerate(cuts):
        pieces = [sdpa_attention_forward(module, query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                         None, dropout=dropout, scaling=scaling, is_causal=True, **kwargs)[0]
                  for s, e in zip(row, row[1:])]
        rows.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1))
    return (rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)), None


def register() -> str:
    """Make NAME a transformers attention implementation (idempotent); its mask is SDPA's, built as for SDPA."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, segment_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
