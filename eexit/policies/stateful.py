"""Measures whose score depends on earlier exits of the same token (`stateful = True`): they are
scored at every exit, below the minimum exit layer too, so that their history is complete."""

from __future__ import annotations

import torch

from eexit.errors import EexitError
from eexit.policies.base import ExitPolicy, positive_int, register_policy


@register_policy("halting-cdf")
class HaltingCDF(ExitPolicy):
    """Seed 000: exit once the learned gate's cumulative halting probability CDF_n exceeds the
    threshold."""

    stateful = True

    needs_logits = False

    def score(self, view):
        model = view.model
        if model is None or getattr(model, "halting_gate", None) is None:
            raise EexitError(
                "policy halting-cdf needs a model trained with --loss ponder (it has no halting "
                "gate)"
            )
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
    """PABEE: exit once the top-1 prediction has stayed the same for `patience` consecutive
    exits."""

    stateful = True
    threshold_free = True

    def __init__(
        self,
        threshold: float = 0.9,
        min_exit_layer: int = 1,
        decay_tau: float = 0.0,
        patience: int = 2,
    ):
        super().__init__(threshold, min_exit_layer, decay_tau)
        self.patience = positive_int("patience", patience)

    def score(self, view):
        top1 = view.logits.argmax(-1)
        prev = view.state.get("top1")
        count = view.state.get("count", torch.zeros_like(top1))
        count = (
            torch.where(prev == top1, count + 1, torch.zeros_like(count))
            if prev is not None
            else count
        )
        view.state["top1"], view.state["count"] = top1, count
        return (count >= self.patience).float()


@register_policy("topk-saturation")
class TopKSaturation(ExitPolicy):
    """Seed 003 (top-k tokens saturate in rank order): the share of the top-k ranks whose token is
    unchanged since the previous exit. With the default threshold 0.99 a token exits once its
    whole ordered top-k list stopped changing between two consecutive exits; because ranks
    saturate in order (top-1 first), a fixed top-k implies a settled top-1."""

    stateful = True

    def __init__(
        self, threshold: float = 0.99, min_exit_layer: int = 1, decay_tau: float = 0.0, k: int = 3
    ):
        super().__init__(threshold, min_exit_layer, decay_tau)
        self.k = positive_int("k", k)

    def score(self, view):
        top = view.logits.topk(self.k, dim=-1).indices
        prev = view.state.get("topk")
        view.state["topk"] = top
        if prev is None:
            return torch.zeros(top.shape[0], device=top.device)
        return (top == prev).float().mean(-1)
