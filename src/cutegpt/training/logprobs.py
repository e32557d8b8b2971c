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

Paired batches (DPO and the other pair losses: rows [chosen_1..chosen_B, rejected_1..rejected_B], each a prompt
and an answer, right-padded) share their prompt: each pair becomes ONE row, the prompt computed once,

    row i:   prompt_i (positions 0..P-1) | chosen_i (P..P+C-1) | rejected_i (P..P+R-1) | padding
    mask:    causal, except that rejected tokens do not see the chosen ones (they see the prompt and themselves)

so the rejected answer sees exactly what it sees in its own row (same keys, same positions): the same
log-probabilities, for the prompt's compute and activations once instead of twice and without the padding of the
shorter answer. Batches that are not such pairs (KTO, a differing prompt) take the row-by-row path.

`install` replaces trl's head (it keeps trl's forward for every call without `fused_lm_head=True`). The metrics
(entropy, mean logit, top-1, log sum p^2) carry no gradient: trl only logs them (DPO's WPO weights use
log sum p^2 under no_grad).
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class PairRows:
    """A paired batch laid out one row per pair (see the module docstring)."""

    input_ids: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, 1, T, T): True / 0.0 where a query may attend
    source: torch.Tensor  # (N,) flat index into (B*T) of the hidden state that predicts each answer token


def pair_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, answers: torch.Tensor,
              scored: torch.Tensor, float_mask: torch.dtype | None = None) -> PairRows | None:
    """The one-row-per-pair layout of [chosen rows; rejected rows], or None when the batch is not such pairs (odd
    count, a prompt that differs between chosen and rejected, an answer that is not one right-aligned block).

    answers (2B, L): the answer tokens (they define the prompt); scored (2B, L-1): the shifted positions whose next
    token is scored, in the row-major order of which `source` lists them (the answers; ORPO adds the chosen prompt)."""
    rows, length = input_ids.shape
    if rows % 2 or rows == 0:
        return None
    b = rows // 2
    device = input_ids.device
    lengths = attention_mask.sum(1) if attention_mask is not None else torch.full((rows,), length, device=device)
    if attention_mask is not None and not bool((attention_mask.bool() == (torch.arange(length, device=device) < lengths[:, None])).all()):
        return None  # not right-padded
    prompt = answers.int().argmax(1)  # the first answer position
    if (bool((prompt[:b] != prompt[b:]).any()) or bool((prompt == 0).any())
            or bool((answers.sum(1) != lengths - prompt).any())):
        return None
    spans = [(int(prompt[i]), int(lengths[i] - prompt[i]), int(lengths[b + i] - prompt[i])) for i in range(b)]
    if any(not torch.equal(input_ids[i, :p], input_ids[b + i, :p]) for i, (p, _, _) in enumerate(spans)):
        return None
    width = max(p + c + r for p, c, r in spans)
    ids = torch.zeros(b, width, dtype=input_ids.dtype, device=device)
    pos = torch.zeros(b, width, dtype=torch.long, device=device)
    allowed = torch.zeros(b, width, width, dtype=torch.bool, device=device)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril_()
    eye = torch.eye(width, dtype=torch.bool, device=device)
    chosen_src, rejected_src = [], []
    for i, (p, c, r) in enumerate(spans):
        n = p + c + r
        ids[i, :p + c] = input_ids[i, :p + c]
        ids[i, p + c:n] = input_ids[b + i, p:p + r]
        pos[i, :p + c] = torch.arange(p + c, device=device)
        pos[i, p + c:n] = torch.arange(p, p + r, device=device)
        allowed[i, :n, :n] = causal[:n, :n]
        allowed[i, p + c:n, p:p + c] = False  # rejected does not see chosen
        allowed[i, n:, n:] = eye[n:, n:]  # padding sees itself only (a row with no key would be NaN)
        # the token at t+1 is predicted at t; the rejected answer's positions from P on sit C further in the row
        # (its first token is predicted by the last prompt token, shared with chosen)
        t = scored[i].nonzero()[:, 0]
        chosen_src.append(i * width + t)
        t = scored[b + i].nonzero()[:, 0]
        rejected_src.append(i * width + t + c * (t >= p))
    mask = allowed[:, None]
    if float_mask is not None:
        mask = torch.zeros(mask.shape, dtype=float_mask, device=device).masked_fill_(~mask, torch.finfo(float_mask).min)
    return PairRows(ids, pos, mask, torch.cat(chosen_src + rejected_src))


def _shares_prompt(causal_lm: Any, width: int) -> bool:
    """Whether a custom 4D mask means the same as the model's own: SDPA / eager attention, no sliding window cut."""
    cfg = causal_lm.config
    window = getattr(cfg, "sliding_window", None)
    from cutegpt.training.segments import NAME

    return cfg._attn_implementation in ("sdpa", "eager", NAME) and not (window and width > window)


def install(causal_lm: Any, pairs: bool = False) -> bool:
    """Answer trl's `fused_lm_head=True` calls on `causal_lm` with the head above; False when it cannot (then trl's
    own head stays: a soft-capped or scaled output layer, a bias, router logits). `pairs`: the trainer's batches are
    [chosen; rejected] rows of the same prompts (DPO), computed one row per pair."""
    from trl.trainer.utils import FusedCausalLMOutput

    if not supported(causal_lm):
        return False
    previous = causal_lm.forward  # trl's: it still answers every call without fused_lm_head=True

    def forward(*args: Any, fused_lm_head: bool = False, labels: Any = None, shift_labels: Any = None,
                num_items_in_batch: Any = None, pair_answers: Any = None, **kwargs: Any) -> Any:
        """pair_answers: the answer tokens (2B, L) when `labels` score more than the answers (ORPO's NLL)."""
        if not fused_lm_head or args or kwargs.get("output_router_logits"):
            # trl's fused forward takes these names; a plain model's (CPO/ORPO: no trl head) gets only what was given
            given = {"fused_lm_head": fused_lm_head or None, "labels": labels, "shift_labels": shift_labels,
                     "num_items_in_batch": num_items_in_batch}
            return previous(*args, **{k: v for k, v in given.items() if v is not None}, **kwargs)
        kwargs["use_cache"] = False
        weight = output_weight(causal_lm)
        layout = None
        plain = all(v is None for k, v in kwargs.items() if k not in ("input_ids", "attention_mask", "use_cache"))
        if pairs and shift_labels is None and plain:  # peft passes inputs_embeds=None, return_dict=None, ...
            eager = causal_lm.config._attn_implementation == "eager"
            answers = labels != IGNORE if pair_answers is None else pair_answers
            layout = pair_rows(kwargs["input_ids"], kwargs.get("attention_mask"), answers, labels[:, 1:] != IGNORE,
                               float_mask=causal_lm.dtype if eager else None)
            if layout is not None and not _shares_prompt(causal_lm, layout.input_ids.shape[1]):
                layout = None
        if layout is not None:
            hidden = causal_lm.model(input_ids=layout.input_ids, attention_mask=layout.mask,
                                     position_ids=layout.position_ids, use_cache=False).last_hidden_state  # (B, T, H)
            targets = labels[:, 1:].to(weight.device)
            mask = targets != IGNORE  # (2B, L-1), row-major order = layout.source's order
            rows = hidden.reshape(-1, hidden.shape[-1]).to(weight.device)[layout.source.to(weight.device)]
        else:
            hidden = causal_lm.model(**kwargs).last_hidden_state  # (B, L, H)
            if shift_labels is None:
                hidden, targets = hidden[:, :-1], labels[:, 1:]
            else:
                targets = shift_labels
            targets = targets.to(weight.device)
            mask = targets != IGNORE  # (B, L-1): the answer tokens
            rows = hidden.to(weight.device)[mask]
        logp, entropy, mean, top1, log_sum_sq = token_log_probs(rows, weight, targets[mask])
        # masked_scatter keeps an all-prompt batch connected to the graph (a zero with a gradient), as trl's head
        full = [x.new_zeros(mask.shape).masked_scatter(mask, x) for x in (logp, entropy, mean, top1, log_sum_sq)]
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-full[0].sum() / denom, log_probs=full[0], entropy=full[1], mean_logits=full[2],
                                   is_top1=full[3], log_sum_sq_probs=full[4], label_mask=mask)

    causal_lm.forward = forward
    return True
