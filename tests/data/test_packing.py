import random

import pytest

from cutegpt.data.packing import concat_blocks, pack_bins, pack_efficiency


def _check(lengths, bins, L):
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))  # every sample exactly once, none split
    assert all(sum(lengths[i] for i in b) <= L for b in bins)


def test_small_hand_case():
    assert pack_bins([3, 5, 2, 4], 8) == [[1, 0], [3, 2]]
    assert pack_bins([], 8) == []
    assert pack_bins([8, 8], 8) == [[0], [1]]


def test_best_fit_beats_or_equals_first_fit_and_lower_bound():
    rng = random.Random(0)
    for _ in range(30):
        L = rng.choice([16, 64, 2048])
        lengths = [rng.randint(1, L) for _ in range(rng.randint(1, 300))]
        bins = pack_bins(lengths, L)
        _check(lengths, bins, L)
        # brute-force first-fit-decreasing as the reference bound
        ffd: list[int] = []
        for n in sorted(lengths, reverse=True):
            for k, used in enumerate(ffd):
                if used + n <= L:
                    ffd[k] += n
                    break
            else:
                ffd.append(n)
        assert len(bins) <= len(ffd)
        assert len(bins) >= -(-sum(lengths) // L)


def test_efficiency_high_on_realistic_lengths():
    rng = random.Random(1)
    lengths = [min(2048, int(rng.lognormvariate(5.5, 0.8)) + 1) for _ in range(5000)]
    bins = pack_bins(lengths, 2048)
    _check(lengths, bins, 2048)
    assert pack_efficiency(lengths, bins, 2048) > 0.97


def test_errors():
    with pytest.raises(ValueError):
        pack_bins([9], 8)
    with pytest.raises(ValueError):
        pack_bins([1], 0)


def test_concat_blocks():
    assert concat_blocks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert concat_blocks(0, 4) == []
