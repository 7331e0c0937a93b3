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
from typing import Callable, Sequence

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
    states: Sequence[torch.Tensor]  # [embeddings, h_1, ..., h_layer], each [N, d]: the token's layers so far
    logits_fn: Callable[[], torch.Tensor]  # -> [N, V] exit logits (computed at most once)
    model: object = None  # the EarlyExitModel (for learned gates / classifiers)
    state: dict = field(default_factory=dict)  # the policy's per-token state, carried across exits
    positions: torch.Tensor | None = None  # [N] decoding step / position of each row (decaying threshold)
    max_steps: int | None = None  # N of CALM's decay: the longest sequence

    @property
    def hidden(self) -> torch.Tensor:
        return self.states[self.layer]

    @property
    def prev_hidden(self) -> torch.Tensor:
        return self.states[self.layer - 1]

    @cached_property
    def logits(self) -> torch.Tensor:
        return self.logits_fn().float()

    @cached_property
    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=-1)


def decayed_threshold(threshold: float, tau: float, positions: torch.Tensor | None, max_steps: int | None):
    """CALM's decaying threshold: clip(0.9 * lambda + 0.1 * exp(-tau * t / N), 0, 1) per row (tau = 0: off)."""
    if tau <= 0 or positions is None or not max_steps:
        return threshold
    return (0.9 * threshold + 0.1 * torch.exp(-tau * positions.float() / max_steps)).clamp(0.0, 1.0)


class ExitPolicy:
    """Base class: subclasses implement `score`; `decide` applies threshold and min exit layer."""

    needs_logits = True  # the score needs the exit's vocabulary logits (an LM-head matmul)
    needs_future = False  # the score needs all layers (oracle): offline evaluation only
    threshold_free = False  # the threshold plays no role (static, oracle, patience)
    stateful = False  # the score depends on earlier exits, so it is computed at every exit, below min_exit_layer too
    registered_name = "?"

    def __init__(self, threshold: float = 0.9, min_exit_layer: int = 1, decay_tau: float = 0.0, **params):
        if params:
            raise EexitError(f"policy {self.registered_name!r} takes no parameter(s) {sorted(params)}")
        if not 0.0 <= float(threshold) <= 1.0:
            raise EexitError(f"threshold must be in [0, 1], got {threshold}")
        if int(min_exit_layer) < 1:
            raise EexitError(f"min_exit_layer must be >= 1, got {min_exit_layer}")
        if float(decay_tau) < 0:
            raise EexitError(f"decay_tau must be >= 0 (0 = constant threshold), got {decay_tau}")
        self.threshold = float(threshold)
        self.min_exit_layer = int(min_exit_layer)
        self.decay_tau = float(decay_tau)

    def score(self, view: ExitView) -> torch.Tensor:
        raise NotImplementedError

    def decide(self, view: ExitView) -> torch.Tensor:
        """One bool per row: exit now?"""
        s = self.score(view)
        thr = decayed_threshold(self.threshold, self.decay_tau, view.positions, view.max_steps)
        if self.threshold_free:
            return (s > 0) & (view.layer >= self.min_exit_layer)
        return (s > thr) & (view.layer >= self.min_exit_layer)

    def decision_macs(self, hidden_size: int, vocab_size: int) -> float:
        """Multiply-accumulates one decision costs for one token."""
        return hidden_size * vocab_size + 4.0 * vocab_size if self.needs_logits else 0.0


def positive_int(name: str, value) -> int:
    if int(value) < 1:
        raise EexitError(f"{name} must be >= 1, got {value}")
    return int(value)


def make_policy(name: str, threshold: float = 0.9, min_exit_layer: int = 1, **params) -> ExitPolicy:
    cls = POLICIES.get(name)
    try:
        return cls(threshold=threshold, min_exit_layer=min_exit_layer, **params)
    except (TypeError, ValueError) as e:  # an unknown keyword, or a value of the wrong type
        raise EexitError(f"policy {name!r}: bad parameter ({e})") from None


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

    def __init__(self, threshold: float = 0.9, min_exit_layer: int = 1, decay_tau: float = 0.0, layer: int | None = None):
        super().__init__(threshold, min_exit_layer, decay_tau)
        self.layer = int(layer) if layer is not None else None

    def score(self, view):
        target = self.layer if self.layer is not None else view.num_layers
        return torch.full((view.hidden.shape[0],), float(view.layer >= target), device=view.hidden.device)

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

    stateful = True

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


@register_policy("heuristic")
class MonotonicHeuristic(ExitPolicy):
    """Monotonic early exiting (seed 001): exit iff the top-1 softmax scores of the last three exits
    are strictly increasing and all above the threshold (the paper uses 0.9 and min exit layer 4).
    Score = the smallest of the three when they increase strictly, else 0."""

    stateful = True

    def score(self, view):
        top = view.probs.max(-1).values
        hist = view.state.get("top1_probs", [])[-2:] + [top]
        view.state["top1_probs"] = hist
        if len(hist) < 3:
            return torch.zeros_like(top)
        a, b, c = hist
        increasing = (a < b) & (b < c)
        return torch.where(increasing, a, torch.zeros_like(a))  # a is the smallest when increasing


@register_policy("patience")
class Patience(ExitPolicy):
    """PABEE: exit once the top-1 prediction has stayed the same for `patience` consecutive exits."""

    stateful = True
    threshold_free = True

    def __init__(self, threshold: float = 0.9, min_exit_layer: int = 1, decay_tau: float = 0.0, patience: int = 2):
        super().__init__(threshold, min_exit_layer, decay_tau)
        self.patience = positive_int("patience", patience)

    def score(self, view):
        top1 = view.logits.argmax(-1)
        prev = view.state.get("top1")
        count = view.state.get("count", torch.zeros_like(top1))
        count = torch.where(prev == top1, count + 1, torch.zeros_like(count)) if prev is not None else count
        view.state["top1"], view.state["count"] = top1, count
        return (count >= self.patience).float()


@register_policy("topk-saturation")
class TopKSaturation(ExitPolicy):
    """Seed 003 (top-k tokens saturate in rank order): the share of the top-k ranks whose token is
    unchanged since the previous exit. With the default threshold 0.99 a token exits once its
    whole ordered top-k list stopped changing between two consecutive exits; because ranks
    saturate in order (top-1 first), a fixed top-k implies a settled top-1."""

    stateful = True

    def __init__(self, threshold: float = 0.99, min_exit_layer: int = 1, decay_tau: float = 0.0, k: int = 3):
        super().__init__(threshold, min_exit_layer, decay_tau)
        self.k = positive_int("k", k)

    def score(self, view):
        top = view.logits.topk(self.k, dim=-1).indices
        prev = view.state.get("topk")
        view.state["topk"] = top
        if prev is None:
            return torch.zeros(top.shape[0], device=top.device)
        return (top == prev).float().mean(-1)
