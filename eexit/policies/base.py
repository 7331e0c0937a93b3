"""The exit rule: one place decides whether a token leaves the model at an exit.

A policy looks at N tokens at one exit layer (an `ExitView`: that layer's hidden state, the
earlier layers, lazily the exit logits, and its own per-token state carried from earlier exits)
and returns one confidence score per token (`score`). Whether the token exits is `exit_rule`:

    score > threshold  and  layer >= min_exit_layer

(like `transformers`' StoppingCriteria, one bool per row). The same `exit_rule` is applied by the
decoder (one exit at a time, `decide`) and by the offline evaluation, sweeps and calibration (a
[exits x tokens] table of scores at once, `exit_indices`), so a policy that changes the rule
overrides `exit_rule` and every path follows. `decide` itself cannot be overridden.

Scores do not depend on the threshold, so a sweep scores every exit once and then applies each
threshold cheaply (`policy.at(threshold)`): the threshold travels one way, as an attribute of
the policy. Every score is "higher = more confident" and lies in [0, 1], so compute rises with
the threshold; threshold 1.0 never exits early.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Sequence

import torch

from eexit.errors import EexitError
from eexit.registry import Registry

POLICIES: Registry[type[ExitPolicy]] = Registry("policy")
register_policy = POLICIES.register


@dataclass
class ExitView:
    """What a policy sees for N tokens (rows) at one exit layer."""

    layer: int  # 1-based layer just computed
    num_layers: int  # depth of the model
    # [embeddings, h_1, ..., h_layer], each [N, d]: the token's layers so far
    states: Sequence[torch.Tensor]
    logits_fn: Callable[[], torch.Tensor]  # -> [N, V] exit logits (computed at most once)
    model: object = None  # the EarlyExitModel (for learned gates / classifiers)
    state: dict = field(default_factory=dict)  # the policy's per-token state, carried across exits
    positions: torch.Tensor | None = None  # [N] decoding step / position (decaying threshold)
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


def decayed_threshold(
    threshold: float, tau: float, positions: torch.Tensor | None, max_steps: int | None
):
    """CALM's decaying threshold clip(0.9 * lambda + 0.1 * exp(-tau * t / N), 0, 1) per row
    (tau = 0: the constant threshold)."""
    if tau <= 0 or positions is None or not max_steps:
        return threshold
    decay = torch.exp(-tau * positions.float() / max_steps)
    return (0.9 * threshold + 0.1 * decay).clamp(0.0, 1.0)


class ExitPolicy:
    """Base class: subclasses implement `score`; `exit_rule` turns scores into exits."""

    needs_logits = True  # the score needs the exit's vocabulary logits (an LM-head matmul)
    needs_future = False  # the score needs all layers (oracle): offline evaluation only
    threshold_free = False  # the threshold plays no role (static, oracle, patience)
    # the score depends on earlier exits, so it is computed at every exit, below min_exit_layer too
    stateful = False
    needs_classifier = False  # a fitted classifier is loaded by `bind` (learned policies)
    registered_name = "?"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "decide" in cls.__dict__:
            raise TypeError(
                f"{cls.__name__} overrides decide(); override exit_rule() instead, so that the "
                "offline evaluation, calibration and decoding apply the same rule"
            )

    def __init__(
        self, threshold: float = 0.9, min_exit_layer: int = 1, decay_tau: float = 0.0, **params
    ):
        if params:
            raise EexitError(
                f"policy {self.registered_name!r} takes no parameter(s) {sorted(params)}"
            )
        if int(min_exit_layer) < 1:
            raise EexitError(f"min_exit_layer must be >= 1, got {min_exit_layer}")
        if float(decay_tau) < 0:
            raise EexitError(f"decay_tau must be >= 0 (0 = constant threshold), got {decay_tau}")
        self.threshold = check_threshold(threshold)
        self.min_exit_layer = int(min_exit_layer)
        self.decay_tau = float(decay_tau)

    def score(self, view: ExitView) -> torch.Tensor:
        """One confidence in [0, 1] per row (higher = more confident)."""
        raise NotImplementedError

    def exit_rule(
        self,
        scores: torch.Tensor,
        layers: int | torch.Tensor,
        positions: torch.Tensor | None = None,
        max_steps: int | None = None,
    ) -> torch.Tensor:
        """THE exit rule. `scores` [..., N] at 1-based `layers` (an int, or [K, 1] for a table of
        K exits); `positions` [N] for the decaying threshold. Returns bools of the scores' shape."""
        if self.threshold_free:
            passed = scores > 0
        else:
            passed = scores > decayed_threshold(
                self.threshold, self.decay_tau, positions, max_steps
            )
        if isinstance(layers, int):  # one exit (the decoder): no tensor for the layer test
            return passed if layers >= self.min_exit_layer else torch.zeros_like(passed)
        return passed & (torch.as_tensor(layers) >= self.min_exit_layer)

    def decide(self, view: ExitView) -> torch.Tensor:
        """One bool per row of the view: exit now? (the decoder's call of `exit_rule`)"""
        return self.exit_rule(self.score(view), view.layer, view.positions, view.max_steps)

    def scored_at(self, layer: int, num_layers: int) -> bool:
        """Is the policy asked at this exit? Below the last layer, at or after the minimum exit
        layer, or everywhere for stateful policies (their score needs the earlier exits)."""
        return layer < num_layers and (self.stateful or layer >= self.min_exit_layer)

    def at(self, threshold: float) -> ExitPolicy:
        """The same policy (same fitted classifier) with another threshold."""
        other = copy.copy(self)
        other.threshold = check_threshold(threshold)
        return other

    def check_model(self, model) -> None:
        """Refuse parameters this model cannot honour (a depth or a vocabulary size exceeded),
        right after the load and before any work; nothing is loaded here."""

    def bind(self, model, model_dir) -> None:
        """Attach what the policy loads for a model (learned policies: their classifier)."""

    def decision_macs(self, hidden_size: int, vocab_size: int) -> float:
        """Multiply-accumulates one decision costs for one token."""
        return hidden_size * vocab_size + 4.0 * vocab_size if self.needs_logits else 0.0

    def first_decision_extra_macs(self, hidden_size: int, vocab_size: int) -> float:
        """What a token's first decision costs beyond `decision_macs` (a shortlisted softmax
        measure computes the full vocabulary once)."""
        return 0.0

    @property
    def reuses_exit_logits(self) -> bool:
        """The decision's logits are also the exit's output (no second head at the exit)."""
        return self.needs_logits and not getattr(self, "shortlist", 0)


def check_threshold(threshold) -> float:
    if not 0.0 <= float(threshold) <= 1.0:
        raise EexitError(f"threshold must be in [0, 1], got {threshold}")
    return float(threshold)


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
