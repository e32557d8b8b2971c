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


def _paired_batch(vocab: int, prompts=(4, 6), chosen=(3, 5), rejected=(6, 2)):
    """[chosen rows; rejected rows] of the same prompts, right-padded, labels on the answers only (trl's DPO batch)."""
    b = len(prompts)
    width = max(p + max(c, r) for p, c, r in zip(prompts, chosen, rejected))
    ids = torch.zeros(2 * b, width, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
        prompt = torch.randint(3, vocab, (p,))
        for row, n in ((i, c), (b + i, r)):
            seq = torch.cat([prompt, torch.randint(3, vocab, (n,))])
            ids[row, :len(seq)], mask[row, :len(seq)], labels[row, p:len(seq)] = seq, 1, seq[p:]
    return ids, mask, labels


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_one_row_per_pair_equals_one_row_per_sequence(tiny_model_dir, attn):
    """The shared-prompt layout (prompt once, rejected masked from chosen) gives the log-probs, metrics and gradients of
    the row-by-row path, which the test above ties to trl's head; eager attention takes a float mask (a bool one is wrong under eager)."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    rows = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn)
    rows.requires_grad_(True)
    rows.get_output_embeddings().weight.requires_grad_(False)
    pairs = copy.deepcopy(rows)
    for model, paired in ((rows, False), (pairs, True)):
        add_fused_lm_head(model)
        assert logprobs.install(model, pairs=paired)
    torch.manual_seed(0)
    ids, mask, labels = _paired_batch(rows.config.vocab_size)
    layout = logprobs.pair_rows(ids, mask, labels != -100, labels[:, 1:] != -100)
    assert layout is not None and layout.input_ids.shape == (2, 6 + 5 + 2)  # the longest pair: prompt + both answers
    got = []
    for model in (rows, pairs):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        (out.log_probs.sum() * 0.3 + out.log_probs[2].sum()).backward()  # chosen and rejected rows weighted unequally
        got.append((out, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = got
    assert bool((a.log_probs != 0).any())
    torch.testing.assert_close(b.log_probs, a.log_probs, atol=1e-5, rtol=1e-5)
    for field in ("entropy", "mean_logits", "log_sum_sq_probs"):
        torch.testing.assert_close(getattr(b, field), getattr(a, field), atol=1e-5, rtol=1e-5)
    assert b.is_top1.tolist() == a.is_top1.tolist() and b.label_mask.tolist() == a.label_mask.tolist()
    assert ga.keys() == gb.keys() and ga
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], atol=1e-5, rtol=1e-4)


def test_batches_that_are_not_pairs_keep_their_rows():
    torch.manual_seed(0)
    ids, mask, labels = _paired_batch(50)
    answers, scored = labels != -100, labels[:, 1:] != -100
    assert logprobs.pair_rows(ids, mask, answers, scored) is not None
    other = ids.clone()
    other[3, 1] = (other[3, 1] + 1) % 50  # the second pair's rejected row has another prompt
    assert logprobs.pair_rows(other, mask, answers, scored) is None
    assert logprobs.pair_rows(ids[:3], mask[:3], answers[:3], scored[:3]) is None  # odd: KTO's rows are not pairs
    left = torch.flip(mask, [1])
    assert logprobs.pair_rows(ids, left, answers, scored) is None  # not right-padded
