"""Per-token log-probabilities of the answer tokens for preference losses, without full-vocabulary logits.

trl's DPO and KTO trainers call the model with `fused_lm_head=True` and read `.log_probs` (and a few metrics).
On devices without Triton (the CPU) trl's head scores every position, prompt and padding included, in tiles of
32,768 vocabulary entries, computes the tile a second time in the backward pass, and builds its metrics with
several full-size temporaries: on the embedded model about a third of a DPO step. Here, as in loss.py:

    hidden (B, L, H) --answer positions only--> (N, H)
        --chunks of 512 rows--> logits (chunk, V) fp32 -> log p(target), entropy, mean logit, top-1, log sum p^2
                                and, when the backbone trains, D = (onehot - p) @ W  (chunk, H)

The gradient of log p(target) with respect to the hidden state is (onehot - p) @ W, so it is computed while the
chunk's logits exist and the backward pass only scales it by the incoming per-token gradient: nothing is
recomputed when the output layer is frozen (LoRA). A trained output layer (full tuning, tied embeddings) needs the
incoming gradient inside the product, so its chunks are recomputed in the backward pass, as trl does.

`install` replaces trl's head (it keeps trl's forward for every call without `fused_lm_head=True`). The metrics
(entropy, mean logit, top-1, log sum p^2) carry no gradient: trl only logs them (DPO's WPO weights use
log sum p^2 under no_grad).
"""

from __future__ import annotations

from typing import Any

import torch

from cutegpt.training.loss import IGNORE, output_weight, supported

CHUNK = 512  # rows per chunk: 512 x 49,152 fp32 logits = 100 MB, and two such temporaries at the peak


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        n = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        out = {k: torch.empty(n, dtype=torch.float32, device=hidden.device)
               for k in ("logp", "entropy", "mean", "log_sum_sq")}
        top1 = torch.empty(n, dtype=torch.bool, device=hidden.device)
        d_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        w = weight.to(hidden.dtype)
        rows = torch.arange(min(n, chunk), device=hidden.device)
        for s in range(0, n, chunk):
            h, t = hidden[s:s + chunk], targets[s:s + chunk]
            r = rows[:t.shape[0]]
            z = (h @ w.t()).float()  # (chunk, V)
            out["mean"][s:s + chunk] = z.mean(-1)
            top1[s:s + chunk] = z.argmax(-1) == t  # argmax is the first maximum, as trl's is_top1
            lse = torch.logsumexp(z, -1)
            z.sub_(lse[:, None])  # log p
            out["logp"][s:s + chunk] = z[r, t]
            p = z.exp()
            out["entropy"][s:s + chunk] = -torch.linalg.vecdot(p, z)
            out["log_sum_sq"][s:s + chunk] = torch.linalg.vecdot(p, p).log()
            del z
            if need_h:
                p.neg_()
                p[r, t] += 1.0  # onehot - p: d log p(target) / d logits
                d_hidden[s:s + chunk] = p.to(w.dtype) @ w
            del p
        ctx.save_for_backward(d_hidden if need_h else None, hidden if need_w else None, weight if need_w else None,
                              targets if need_w else None)
        ctx.chunk, ctx.h_dtype = chunk, hidden.dtype
        ctx.mark_non_differentiable(out["entropy"], out["mean"], out["log_sum_sq"], top1)
        return out["logp"], out["entropy"], out["mean"], top1, out["log_sum_sq"]

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor | None, *_: Any):
        d_hidden, hidden, weight, targets = ctx.saved_tensors
        if grad_logp is None:
            return None, None, None, None
        g = grad_logp.float()
        grad_h = (d_hidden * g[:, None]).to(ctx.h_dtype) if d_hidden is not None else None
        grad_w = None
        if weight is not None:
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            w = weight.to(hidden.dtype)
            for s in range(0, hidden.shape[0], ctx.chunk):
                h, t, gs = hidden[s:s + ctx.chunk], targets[s:s + ctx.chunk], g[s:s + ctx.chunk]
                p = torch.softmax((h @ w.t()).float(), -1).neg_()
                p[torch.arange(t.shape[0], device=t.device), t] += 1.0
                p.mul_(gs[:, None])
                grad_w.addmm_(p.t(), h.float())
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None


def token_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK):
    """(log p(target), entropy, mean logit, target is top-1, log sum p^2) per row of `hidden` (N, H)."""
    return _TokenLogProbs.apply(hidden, weight, targets, chunk)


def install(causal_lm: Any) -> bool:
    """Answer trl's `fused_lm_head=True` calls on `causal_lm` with the head above; False when it cannot (then trl's
    own head stays: a soft-capped or scaled output layer, a bias, router logits)."""
    from trl.trainer.utils import FusedCausalLMOutput

    if not supported(causal_lm):
        return False
    previous = causal_lm.forward  # trl's: it still answers every call without fused_lm_head=True

    def forward(*args: Any, fused_lm_head: bool = False, labels: Any = None, shift_labels: Any = None,
                num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        if not fused_lm_head or args or kwargs.get("output_router_logits"):
            return previous(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                            num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = causal_lm.model(**kwargs).last_hidden_state  # (B, L, H)
        if shift_labels is None:
            hidden, targets = hidden[:, :-1], labels[:, 1:]
        else:
            targets = shift_labels
        weight = output_weight(causal_lm)
        targets = targets.to(weight.device)
        mask = targets != IGNORE  # (B, L-1): the answer tokens
        logp, entropy, mean, top1, log_sum_sq = token_log_probs(hidden.to(weight.device)[mask], weight, targets[mask])
        # masked_scatter keeps an all-prompt batch connected to the graph (a zero with a gradient), as trl's head
        full = [x.new_zeros(mask.shape).masked_scatter(mask, x) for x in (logp, entropy, mean, top1, log_sum_sq)]
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-full[0].sum() / denom, log_probs=full[0], entropy=full[1], mean_logits=full[2],
                                   is_top1=full[3], log_sum_sq_probs=full[4], label_mask=mask)

    causal_lm.forward = forward
    return True
