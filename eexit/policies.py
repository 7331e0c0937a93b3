"""Exit policies (confidence measures), registered by name.

A policy looks at N tokens at one exit layer (an `ExitView`: that layer's hidden state, the
previous layer's, lazily the exit logits, and its own per-token state carried from earlier
exits) and returns one confidence score per token. The token exits when

    score > threshold  and  layer >= min_exit_layer

(like `transformers`' StoppingCriteria, one bool per row). Scores do not depend on the
threshold, so a sweep scores every exit once and then applies each threshold cheaply; every
score is "higher = more confident" and lies in [0, 1], so compute rises with the threshold,
threshold 0 exits wherever the score is positive and threshold 1.0 never exits early. Adding a policy is
one decorated class here plus a test.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import torch
import torch.nn.functional as F

from eexit.errors import EexitError
from eexit.registry import Registry

POLICIES: Registry[type["ExitPolicy"]] = Registry("policy")
register_policy = POLICIES.register


@dataclass
class ExitView:
    """What a policy sees for N tokens (rows) at one exit layer."""

    layer: int  # 1-based layer just computed
    num_layers: int  # depth of the model
    hidden: torch.Tensor  # [N, d] output of this layer's block
    prev_hidden: torch.Tensor  # [N, d] output of the previous block (embeddings for layer 1)
    logits_fn: Callable[[], torch.Tensor]  # -> [N, V] exit logits (computed at most once)
    model: object = None  # the EarlyExitModel (for learned gates / classifiers)
    state: dict = field(default_factory=dict)  # the policy's per-token state, carried across exits

    @cached_property
    def logits(self) -> torch.Tensor:
        return self.logits_fn().float()

    @cached_property
    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=-1)


class ExitPolicy:
    """Base class: subclasses implement `score`; `decide` applies threshold and min exit layer."""

    needs_logits = True  # the score needs the exit's vocabulary logits (an LM-head matmul)
    needs_future = False  # the score needs all layers (oracle): offline evaluation only
    threshold_free = False  # the threshold plays no role (static, oracle)

    def __init__(self, threshold: float = 0.9, min_exit_layer: int = 1, **params):
        if params:
            raise EexitError(f"policy {self.registered_name!r} takes no parameter(s) {sorted(params)}")
        if not 0.0 <= float(threshold) <= 1.0:
            raise EexitError(f"threshold must be in [0, 1], got {threshold}")
        if int(min_exit_layer) < 1:
            raise EexitError(f"min_exit_layer must be >= 1, got {min_exit_layer}")
        self.threshold = float(threshold)
        self.min_exit_layer = int(min_exit_layer)

    registered_name = "?"

    def score(self, view: ExitView) -> torch.Tensor:
        raise NotImplementedError

    def decide(self, view: ExitView) -> torch.Tensor:
        """One bool per row: exit now?"""
        s = self.score(view)
        return (s > self.threshold) & (view.layer >= self.min_exit_layer)

    def decision_macs(self, hidden_size: int, vocab_size: int) -> float:
        """Multiply-accumulates one decision costs for one token."""
        return hidden_size * vocab_size + 4.0 * vocab_size if self.needs_logits else 0.0


def make_policy(name: str, threshold: float = 0.9, min_exit_layer: int = 1, **params) -> ExitPolicy:
    return POLICIES.get(name)(threshold=threshold, min_exit_layer=min_exit_layer, **params)


@register_policy("max-prob")
class MaxProb(ExitPolicy):
    """Seed 002: the largest softmax probability of the exit's prediction."""

    def score(self, view):
        return view.probs.max(-1).values


@register_policy("margin")
class Margin(ExitPolicy):
    """CALM: top-1 minus top-2 softmax probability."""

    def score(self, view):
        top = view.probs.topk(2, dim=-1).values
        return top[:, 0] - top[:, 1]


@register_policy("entropy")
class Entropy(ExitPolicy):
    """DeeBERT: 1 - H(p) / log V, so that a peaked distribution scores near 1."""

    def score(self, view):
        logp = torch.log_softmax(view.logits, -1)
        h = -(logp.exp() * logp).sum(-1)
        return 1.0 - h / math.log(view.logits.shape[-1])


@register_policy("saturation")
class Saturation(ExitPolicy):
    """CALM: hidden-state saturation, cosine similarity of this and the previous layer's state."""

    needs_logits = False

    def score(self, view):
        return F.cosine_similarity(view.hidden.float(), view.prev_hidden.float(), dim=-1).clamp_min(0.0)

    def decision_macs(self, hidden_size, vocab_size):
        return 3.0 * hidden_size


@register_policy("static")
class Static(ExitPolicy):
    """Every token exits at the first exit at or after a fixed layer (`layer`, default: the last = full model)."""

    needs_logits = False
    threshold_free = True

    def __init__(self, threshold: float = 0.9, min_exit_layer: int = 1, layer: int | None = None):
        super().__init__(threshold, min_exit_layer)
        self.layer = int(layer) if layer is not None else None

    def score(self, view):
        target = self.layer if self.layer is not None else view.num_layers
        return torch.full((view.hidden.shape[0],), float(view.layer >= target), device=view.hidden.device)

    def decide(self, view):
        return self.score(view) > 0

    def decision_macs(self, hidden_size, vocab_size):
        return 0.0


@register_policy("oracle")
class Oracle(ExitPolicy):
    """The earliest exit after which the top-1 prediction never changes (needs all layers)."""

    needs_logits = False
    needs_future = True
    threshold_free = True

    def score(self, view):
        raise EexitError("the oracle policy needs every layer's prediction: use it with evaluate / sweep, not decoding")

    @staticmethod
    def scores_from_top1(top1: torch.Tensor) -> torch.Tensor:
        """[K, N] top-1 ids per exit -> [K, N] 1.0 where the prediction is fixed from this exit on."""
        same = top1 == top1[-1:]
        stable = torch.flip(torch.cumprod(torch.flip(same.int(), [0]), 0), [0])
        return stable.float()

    def decision_macs(self, hidden_size, vocab_size):
        return 0.0


@register_policy("halting-cdf")
class HaltingCDF(ExitPolicy):
    """Seed 000: exit once the learned gate's cumulative halting probability CDF_n exceeds the threshold."""

    needs_logits = False

    def score(self, view):
        model = view.model
        if model is None or getattr(model, "halting_gate", None) is None:
            raise EexitError("policy halting-cdf needs a model trained with --loss ponder (it has no halting gate)")
        lam = torch.sigmoid(model.halting_gate(view.hidden).squeeze(-1).float())
        if view.layer == view.num_layers:
            lam = torch.ones_like(lam)
        survive = view.state.get("survive", torch.ones_like(lam))
        cdf = view.state.get("cdf", torch.zeros_like(lam)) + lam * survive
        view.state["survive"], view.state["cdf"] = survive * (1 - lam), cdf
        return cdf

    def decision_macs(self, hidden_size, vocab_size):
        return float(hidden_size)
