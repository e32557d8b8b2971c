"""The causal-LM loss without full-vocabulary logits over every packed position.

transformers computes `lm_head` over all B x L positions, upcasts the logits to
fp32 and keeps log-softmax for the backward pass: for micro-batch 2 x 512 tokens
and a 49,152-entry vocabulary that is ~200 MB per copy and ~1 GB at the peak,
although prompts and padding carry no loss. Here:

    hidden (B, L, H) --select loss-bearing positions--> (N, H)
        --chunks of 256 rows--> logits (chunk, V) fp32 -> loss sum, d loss / d hidden, d loss / d W
                                  (the chunk's logits are freed before the next one)

`install` puts this loss inside the model's own forward (for training batches with
labels), so DDP and DeepSpeed, which only call the wrapped model's forward, keep
their gradient hooks and every process uses it.

The gradients are computed during the forward pass (softmax - one-hot is the
gradient of cross-entropy), so nothing is recomputed: the same matrix products
as the usual path, on fewer rows. The result equals transformers' loss
(sum over tokens / num_items_in_batch) to float rounding.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE = -100
# 256 rows x 49,152 fp32 logits = 48 MiB a copy: with the temporaries of logsumexp ~0.14 GiB at the peak, against
# 0.57 GiB for 1,024 rows, for ~1.5% more time in a LoRA step (smaller products, measured on the embedded model)
CHUNK = 256


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        need_w = weight.requires_grad
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w = weight
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            t = targets[s:s + chunk]
            logits = (h @ w.to(h.dtype).t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            logits.sub_(lse[:, None]).exp_()  # softmax, in place
            logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            g = logits.to(h.dtype)
            del logits
            grad_h[s:s + chunk] = g @ w.to(h.dtype)
            if need_w:
                grad_w.addmm_(g.t().float(), h.float())
        ctx.save_for_backward(grad_h, grad_w if need_w else torch.empty(0))
        ctx.need_w = need_w
        ctx.w_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype)
        gw = (grad_w * grad_out).to(ctx.w_dtype) if ctx.need_w else None
        return gh, gw, None, None


def output_weight(causal_lm: Any) -> torch.Tensor | None:
    """lm_head's weight when it is a plain linear layer without bias (or peft's modules_to_save copy of one)."""
    head = getattr(causal_lm, "lm_head", None)
    if head is None:
        return None
    if hasattr(head, "modules_to_save") and hasattr(head, "active_adapter"):
        active = head.active_adapter
        active = active[0] if isinstance(active, (list, tuple)) else active
        if active in head.modules_to_save:
            head = head.modules_to_save[active]
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    return head.weight


def supported(causal_lm: Any) -> bool:
    cfg = getattr(causal_lm, "config", None)
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return False
    return getattr(causal_lm, "model", None) is not None and output_weight(causal_lm) is not None


def causal_lm_loss(causal_lm: Any, inputs: dict[str, Any], num_items: Any = None, chunk: int = CHUNK) -> tuple[torch.Tensor, int]:
    """(loss, loss-bearing tokens) for one batch: sum / num_items when given, else the mean."""
    labels = inputs["labels"]
    kwargs = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}
    kwargs["use_cache"] = False
    hidden = causal_lm.model(**kwargs).last_hidden_state  # (B, L, H)
    targets = labels[:, 1:]
    mask = targets != IGNORE
    n = int(mask.sum())
    weight = output_weight(causal_lm)
    if n == 0:
        return hidden.sum() * 0.0 + weight.sum() * 0.0, 0
    h = hidden[:, :-1][mask]
    t = targets[mask].to(h.device)
    total = _LinearCrossEntropy.apply(h, weight, t, chunk)
    denom = num_items if num_items is not None else n
    if isinstance(denom, torch.Tensor):
        denom = denom.to(total.device)
    return total / denom, n


def install(causal_lm: Any) -> dict[str, int]:
    """Make `causal_lm`'s forward compute the chunked loss for training batches with labels.

    Returns a counter of batches that went through it (`{"batches": n}`), for the run summary.
    Evaluation (model.eval()) and calls without labels take the model's own forward.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    original = causal_lm.forward
    used = {"batches": 0}

    def forward(*args: Any, labels: Any = None, num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        if labels is None or args or not causal_lm.training:
            extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
            return original(*args, labels=labels, **kwargs, **extra)
        used["batches"] += 1
        kwargs.pop("return_dict", None)
        # a module-level lookup, so a test can wrap causal_lm_loss
        loss, _ = causal_lm_loss(causal_lm, {**kwargs, "labels": labels}, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss)

    causal_lm.forward = forward  # an instance attribute: nn.Module.__call__ and peft's LoraModel both call it
    return used
