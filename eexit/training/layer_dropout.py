"""LayerSkip's layer dropout: during training each block is skipped for a whole sequence (its
output is its input) with a probability that rises with depth, none at the first block and
`train.layer_dropout` at the last. Deeper blocks learn to be optional and shallow exits learn
to stand in for the stack, which is what early exit and self-speculative drafting rely on.

Rates per block l = 0..L-1 (Elhoushi et al. 2024): p_l = p_max * S(l) with
S(l) = exp(l ln 2 / (L - 1)) - 1 (`exp`), l / (L - 1) (`linear`) or 1 (`uniform`).

The skip is applied by mask (a skipped row keeps its input), so it is exact for any family,
padding and attention layout; it does not save the skipped rows' compute in training.
"""

from __future__ import annotations

import contextlib
import math

import torch

SCALES = ("exp", "linear", "uniform")


def layer_dropout_rates(num_layers: int, p_max: float, scale: str = "exp") -> list[float]:
    """Skip probability of each block, first to last."""
    if num_layers == 1 or p_max == 0:
        return [0.0] * num_layers if scale != "uniform" else [p_max] * num_layers
    last = num_layers - 1
    if scale == "exp":
        shape = [math.exp(l * math.log(2) / last) - 1 for l in range(num_layers)]
    elif scale == "linear":
        shape = [l / last for l in range(num_layers)]
    else:
        shape = [1.0] * num_layers
    return [p_max * s for s in shape]


def install_layer_dropout(layers, rates: list[float], active=lambda: True) -> list:
    """Hooks replacing block i's output by its input for rows drawn with probability rates[i]
    (torch's global RNG: fixed by the seed, restored on --resume), while `active()` is true.
    Registered before any other forward hook of the blocks, so hooks that read block outputs see
    the skip. They stay while the caller keeps them (returned handles), so that a block
    recomputed in the backward pass (activation checkpointing, which restores the RNG state)
    draws the same rows and skips them again."""

    def skip(rate):
        def hook(_module, args, kwargs, output):
            if not active():
                return None
            h_in = args[0] if args else kwargs["hidden_states"]
            drop = torch.rand(h_in.shape[0], device=h_in.device) < rate
            if not bool(drop.any()):
                return None
            mask = drop.view(-1, *([1] * (h_in.dim() - 1)))
            if isinstance(output, tuple):
                return (torch.where(mask, h_in, output[0]), *output[1:])
            return torch.where(mask, h_in, output)

        return hook

    return [
        layer.register_forward_hook(skip(rate), with_kwargs=True, prepend=True)
        for layer, rate in zip(layers, rates)
        if rate > 0
    ]


@contextlib.contextmanager
def layer_dropout(layers, rates: list[float]):
    """`install_layer_dropout` for the duration of a block of code."""
    hooks = install_layer_dropout(layers, rates)
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
