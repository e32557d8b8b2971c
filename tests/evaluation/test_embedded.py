"""On the embedded SmolLM2 (slow): batched + prefix-cached scoring equals brute force on a real tokenizer."""

from __future__ import annotations

import pytest

from cutegpt.evaluation.data import load_benchmark
from cutegpt.evaluation.scoring import brute_force, score_items
from tests.evaluation.test_scoring import _items, _same


@pytest.mark.slow
def test_embedded_batched_equals_brute_force(embedded_dir, ceval_dir):
    from cutegpt.model.loading import ModelArgs, load_model

    lm = load_model(ModelArgs(model=str(embedded_dir)))
    bench = load_benchmark("ceval", ceval_dir, "val", ["computer_network"])
    (items,) = _items(lm, bench, 5, "logits")
    _same(score_items(lm.model, items, batch_size=2), brute_force(lm.model, items))
