"""Segment attention (training/segments.py) against plain SDPA with transformers' own packed mask."""

from __future__ import annotations

import pytest
import torch

from cutegpt.training import segments
from tests.tiny import _tiny_config


def _model(arch: str, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(arch, 97, False, 4, 2, **kw), attn_implementation="sdpa")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def _packed(lens_per_row, length):
    """Rows of samples back to back, padding continuing the last sample's positions (as training/data.py collates)."""
    from cutegpt.training.data import position_ids_for

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (len(lens_per_row), length), generator=g)
    pos = torch.tensor([position_ids_for(lens, length) for lens in lens_per_row])
    return ids, pos


def _record_sdpa(monkeypatch, what) -> list:
    """Every call of torch's SDPA from now on appends what(query, kwargs) to the returned list."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **k: calls.append(what(q, k)) or real(q, *a, **k))
    return calls


def _loss_and_grads(model, impl, ids, pos, **kw):
    model.set_attn_implementation(impl)
    model.zero_grad()
    out = model(input_ids=ids, position_ids=pos, labels=ids, use_cache=False, **kw)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_segments_equal_sdpa_on_packed_rows_and_compute_only_the_samples(arch, monkeypatch):
    segments.register()
    model = _model(arch)
    ids, pos = _packed([[5, 9, 3, 7], [20, 4], [24]], 24)  # the last row: one sample, the first: padding at the end
    want_logits, want_grads = _loss_and_grads(model, "sdpa", ids, pos)
    calls = _record_sdpa(monkeypatch, lambda q, k: (q.shape[2], k.get("is_causal")))
    logits, grads = _loss_and_grads(model, segments.NAME, ids, pos)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=1e-5, rtol=1e-4)
    per_layer = [5, 9, 3, 7, 20, 4, 24]  # each sample alone, causal (row 0's padding belongs to its last sample)
    assert calls == [(n, True) for n in per_layer] * model.config.num_hidden_layers


def test_other_masks_go_to_sdpa_unchanged(monkeypatch):
    """A padding mask or a sliding window shorter than a sample: plain SDPA with transformers' mask."""
    segments.register()
    ids, pos = _packed([[6, 10], [16]], 16)
    pad = torch.ones_like(ids)
    pad[1, 12:] = 0
    model = _model("llama")
    want = _loss_and_grads(model, "sdpa", ids, pos, attention_mask=pad)[0]
    torch.testing.assert_close(_loss_and_grads(model, segments.NAME, ids, pos, attention_mask=pad)[0], want)
    windowed = _model("mistral", sliding_window=4)
    want = _loss_and_grads(windowed, "sdpa", ids, pos)[0]
    calls = _record_sdpa(monkeypatch, lambda q, k: q.shape[2])
    torch.testing.assert_close(_loss_and_grads(windowed, segments.NAME, ids, pos)[0], want)
    assert calls and set(calls) == {16}  # whole rows with the mask, never the segments


def test_bounds_and_mask_check():
    assert segments.bounds(torch.tensor([[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6]])) == [[0, 3, 7], [0, 7]]
    cuts = [[0, 2, 3]]
    good = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)[None, None]
    assert segments.is_segment_mask(good, cuts)
    assert not segments.is_segment_mask(torch.ones(1, 1, 3, 3, dtype=torch.bool).tril(), cuts)  # crosses the samples
    as_float = torch.zeros(1, 1, 3, 3).masked_fill(~good, torch.finfo(torch.float32).min)
    assert segments.is_segment_mask(as_float, cuts)


def test_rows_of_one_sample_each_are_plain_sdpa(monkeypatch):
    segments.register()
    model = _model("llama")
    ids, pos = _packed([[12], [9]], 12)
    want = _loss_and_grads(model, "sdpa", ids, pos)[0]
    calls = _record_sdpa(monkeypatch, lambda q, k: q.shape[0])
    torch.testing.assert_close(_loss_and_grads(model, segments.NAME, ids, pos)[0], want)
    assert calls == [2] * model.config.num_hidden_layers  # one call over the batch per layer, as SDPA makes
