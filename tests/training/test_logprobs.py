"""The answer-only log-prob head (training/logprobs.py) against trl's fused head and plain log_softmax: values,
metrics and gradients, for a frozen output layer (LoRA) and a trained one (full tuning, tied embeddings)."""

from __future__ import annotations

import copy

import pytest
import torch

from cutegpt.training import logprobs


def test_token_log_probs_equal_log_softmax_and_its_gradients():
    torch.manual_seed(0)
    n, h, v = 37, 16, 101
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    targets[3] = int((hidden[3] @ weight.t()).argmax())  # at least one top-1 hit
    g = torch.randn(n)
    logp, entropy, mean, top1, log_sum_sq = logprobs.token_log_probs(hidden, weight, targets, chunk=8)  # 5 chunks
    (logp * g).sum().backward()
    ours = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    z = hidden @ weight.t()
    ref = z.log_softmax(-1)
    (ref.gather(1, targets[:, None])[:, 0] * g).sum().backward()
    p = ref.exp()
    torch.testing.assert_close(logp, ref.gather(1, targets[:, None])[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, -(p * ref).sum(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean, z.mean(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(log_sum_sq, (p * p).sum(-1).log(), atol=1e-5, rtol=1e-5)
    assert top1.tolist() == (z.argmax(-1) == targets).tolist() and top1[3]
    torch.testing.assert_close(ours[0], hidden.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1], weight.grad, atol=1e-5, rtol=1e-5)
    assert not entropy.requires_grad  # metrics only: trl logs them


@pytest.mark.parametrize("train_head", [False, True], ids=["frozen-head", "trained-head"])
def test_installed_head_equals_trls_fused_head(tiny_model_dir, train_head):
    """The same model through trl's `add_fused_lm_head` and through ours: same log-probs at the answer tokens,
    zeros elsewhere, same metrics there, same gradients (backbone, and the tied output layer when it trains)."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    theirs = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    theirs.requires_grad_(True)
    theirs.get_output_embeddings().weight.requires_grad_(train_head)
    ours = copy.deepcopy(theirs)
    add_fused_lm_head(theirs, outputs=("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs"))
    add_fused_lm_head(ours)
    assert logprobs.install(ours)
    torch.manual_seed(0)
    ids = torch.randint(3, theirs.config.vocab_size, (3, 12))
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0  # padding
    labels = ids.masked_fill(torch.arange(12) < 5, -100).masked_fill(mask == 0, -100)  # answers from position 5
    got = {}
    for name, model in (("theirs", theirs), ("ours", ours)):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        (out.log_probs.sum() * 0.7 + out.log_probs[0].sum()).backward()
        got[name] = out, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    (a, ga), (b, gb) = got["theirs"], got["ours"]
    torch.testing.assert_close(b.log_probs, a.log_probs, atol=1e-5, rtol=1e-5)
    assert bool((b.log_probs[labels[:, 1:] == -100] == 0).all())
    keep = labels[:, 1:] != -100
    for field in ("entropy", "mean_logits", "log_sum_sq_probs"):
        torch.testing.assert_close(getattr(b, field)[keep], getattr(a, field)[keep], atol=1e-5, rtol=1e-5)
    assert b.is_top1[keep].tolist() == a.is_top1[keep].tolist()
    torch.testing.assert_close(b.loss, a.loss, atol=1e-6, rtol=1e-6)
    assert ga.keys() == gb.keys()
    assert (ours.get_output_embeddings().weight.grad is not None) == train_head
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], atol=1e-5, rtol=1e-4)
    # without fused_lm_head the model's own forward answers (generation, evaluation)
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
