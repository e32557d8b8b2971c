"""`eval` on every base architecture: the batched, prefix-cached scoring equals the brute-force path (one question,
full prompt, no cache) on tiny Llama-3, Mistral, Qwen2, Qwen3 and Gemma 2 models (Gemma 2's cache mixes sliding
and full layers; Qwen3 has q/k norms)."""

from __future__ import annotations

import pytest

from cutegpt.evaluation.data import load_benchmark
from cutegpt.evaluation.scoring import brute_force, common_prefix_length, score_items
from tests.evaluation.test_scoring import _items, _same
from tests.export.archs import ARCH_VARIANTS, build_arch_variant


@pytest.fixture(scope="module")
def arch_models(tmp_path_factory):
    return {name: build_arch_variant(tmp_path_factory.mktemp(name), name) for name in ARCH_VARIANTS}


@pytest.mark.parametrize("name", list(ARCH_VARIANTS))
def test_prefix_cached_scoring_equals_brute_force(arch_models, ceval_dir, name):
    from cutegpt.model.loading import ModelArgs, load_model

    lm = load_model(ModelArgs(model=str(arch_models[name]), template="auto"))
    bench = load_benchmark("ceval", ceval_dir, "val")
    for items in _items(lm, bench, 5, "logits"):
        ref = brute_force(lm.model, items, "logits")
        assert common_prefix_length([it.ids for it in items]) > 50
        pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
        for batch_size, max_tokens in [(16, 4096), (3, 40)]:
            _same(score_items(lm.model, items, "logits", batch_size, max_tokens, pad_id=pad), ref)
