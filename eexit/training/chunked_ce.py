"""Cross-entropy through the LM head whose memory follows a chunk of tokens, not tokens x V.

Training every exit of a large-vocabulary model materialises (exits x tokens x V) float32 logits
and their gradient: 126 GB for Llama-3.2-1B's shape at batch 8 x 2048 with all 15 exits. Here the
head's matmul and the log-sum-exp run over `chunk` tokens at a time; only the per-token
log-sum-exp is kept for the backward pass, which recomputes each chunk's logits and turns them
into the gradient at once (softmax - one-hot, scaled by the incoming gradient). Peak memory is
one chunk's logits; the price is the head's forward matmul once more in the backward pass.

Written with torch operations only, so it runs on every device; the plain path
(`F.cross_entropy` on the whole logits) is the reference it is tested against: equal loss and
gradients to float32 tolerance, `ignore_index` (-100) included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # as F.cross_entropy: a target that neither counts nor receives gradient


class _ChunkedLinearCE(torch.autograd.Function):
    """Per-token CE of F.linear(x, weight, bias) (upcast to float32) against targets."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, chunk: int):
        n = x.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=x.device)
        ce = torch.empty(n, dtype=torch.float32, device=x.device)
        for a in range(0, n, chunk):
            logits = F.linear(x[a : a + chunk], weight, bias).float()
            t = targets[a : a + chunk]
            keep = t != IGNORE_INDEX
            lse[a : a + chunk] = torch.logsumexp(logits, -1)
            picked = logits.gather(1, t.clamp_min(0)[:, None]).squeeze(1)
            ce[a : a + chunk] = torch.where(keep, lse[a : a + chunk] - picked, 0.0)
        ctx.save_for_backward(x, weight, bias, targets, lse)
        ctx.chunk = chunk
        # mixed precision: the backward pass recomputes the logits under the same autocast
        dev = x.device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        return ce

    @staticmethod
    def backward(ctx, grad_ce):
        x, weight, bias, targets, lse = ctx.saved_tensors
        chunk = ctx.chunk
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        )
        grad_b = (
            torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
            if bias is not None and need_b
            else None
        )
        dev, enabled, amp_dtype = ctx.autocast
        with torch.autocast(dev, dtype=amp_dtype, enabled=enabled):
            _backward_chunks(x, weight, bias, targets, lse, grad_ce, chunk, grad_x, grad_w, grad_b)
        return (
            grad_x,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None,
            None,
        )


def _backward_chunks(x, weight, bias, targets, lse, grad_ce, chunk, grad_x, grad_w, grad_b):
    """Each chunk's logits recomputed and turned into the gradient (softmax - one-hot, scaled by
    the incoming gradient), accumulated into grad_x / grad_w / grad_b (None: not needed)."""
    for a in range(0, x.shape[0], chunk):
        xc, t = x[a : a + chunk], targets[a : a + chunk]
        logits = F.linear(xc, weight, bias).float()
        g = torch.exp(logits - lse[a : a + chunk, None])  # softmax
        keep = t != IGNORE_INDEX
        g[torch.arange(len(t), device=t.device), t.clamp_min(0)] -= 1.0
        g = (g * (grad_ce[a : a + chunk] * keep)[:, None]).to(x.dtype)  # ignored: no gradient
        if grad_x is not None:
            grad_x[a : a + chunk] = g @ weight
        if grad_w is not None:
            grad_w += (g.t() @ xc).float()
        if grad_b is not None:
            grad_b += g.float().sum(0)


def linear_ce(
    x: torch.Tensor, linear: nn.Linear, targets: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Per-token cross-entropy [N] of `linear(x)` ([N, d] -> [N, V]) against `targets` [N],
    `chunk` tokens of logits at a time (chunk <= 0 or >= N: the plain computation, one
    matmul, exactly today's loss)."""
    if chunk <= 0 or x.shape[0] <= chunk:
        return F.cross_entropy(linear(x).float(), targets, reduction="none")
    return _ChunkedLinearCE.apply(x, linear.weight, linear.bias, targets, chunk)


def head_ce(model, layer: int, hidden: torch.Tensor, targets: torch.Tensor, chunk: int):
    """Per-token CE of the exit after `layer` for hidden states [N, d] of that layer: its own
    head (norm + linear) where it has one, else its adapter, the shared final norm and the LM
    head; the linear part chunked (`linear_ce`). A head that is not a plain linear layer is
    computed whole."""
    key = str(layer)
    if key in model.exit_heads:
        head = model.exit_heads[key]
        pre, linear = (head[0], head[1]) if isinstance(head, nn.Sequential) else (None, head)
        x = pre(hidden) if pre is not None else hidden
    else:
        linear = model.parts.lm_head
        x = model.parts.final_norm(model.translate(hidden, layer))
    if not isinstance(linear, nn.Linear):
        return F.cross_entropy(model.exit_logits(hidden, layer).float(), targets, reduction="none")
    return linear_ce(x, linear, targets, chunk)
