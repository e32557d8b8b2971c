"""Packing samples into rows of at most `max_length` tokens.

Three layouts (`--packing`):

    bins    whole samples placed into bins of L tokens, best-fit-decreasing;
            a sample is never split, rows keep the per-sample lengths
    pad     one sample per row
    concat  the original's layout: one stream, cut every L tokens

    bins (L = 8):   [ a a a a a | b b b ]   [ c c c c c c | d d ]
    concat (L = 8): [ a a a a a b b b ]     [ c c c c c c d d ]   (b sees a; a sample may straddle rows)
"""

from __future__ import annotations

import bisect
from typing import Sequence


def pack_bins(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group sample indices into bins whose total length is at most `max_length`.

    Best-fit-decreasing: samples are taken longest first and each goes into the
    fullest bin that still has room (ties keep the earliest bin), else a new bin.
    Best-fit gives at least first-fit-decreasing's bound (11/9 OPT + 6/9) and in
    practice fills bins tighter. O(n log n) with a sorted list of free space.

    Within a bin, indices are in placement order (longest first). Samples longer
    than `max_length` are an error: truncate them first.

    >>> pack_bins([3, 5, 2, 4], 8)
    [[1, 0], [3, 2]]
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(f"sample {i} has {n} tokens, more than max_length {max_length}")
        if n < 0:
            raise ValueError(f"sample {i} has a negative length {n}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # (free space, bin index), sorted: the first entry with free >= n is the best fit
    free: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (space - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (max_length - n, len(bins) - 1))
    return bins


def pack_efficiency(lengths: Sequence[int], bins: Sequence[Sequence[int]], max_length: int) -> float:
    """Real tokens / block tokens (rows x max_length)."""
    if not bins:
        return 0.0
    return sum(lengths) / (len(bins) * max_length)


def concat_blocks(total: int, max_length: int) -> list[tuple[int, int]]:
    """(start, end) of each fixed block over a stream of `total` tokens; the last one may be short."""
    return [(s, min(s + max_length, total)) for s in range(0, total, max_length)]
