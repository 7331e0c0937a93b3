"""Confidence measures computed from one exit: the softmax-based ones (max-prob, margin, entropy),
the hidden-state saturation that needs no LM head, and the reference rules static and oracle."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from eexit.errors import EexitError
from eexit.policies.base import ExitPolicy, positive_int, register_policy


class SoftmaxMeasure(ExitPolicy):
    """A measure of the exit's softmax. `shortlist=K` cuts its cost: the first exit where the
    token is scored computes the full vocabulary once and keeps its top-K tokens; every later
    exit computes the logits of those K candidates only (d x K multiply-adds instead of d x V)
    and the measure is taken over the candidates' softmax (an approximation: calibrate it)."""

    def __init__(
        self,
        threshold: float = 0.9,
        min_exit_layer: int = 1,
        decay_tau: float = 0.0,
        shortlist: int = 0,
        **params,
    ):
        super().__init__(threshold, min_exit_layer, decay_tau, **params)
        self.shortlist = int(shortlist)
        if self.shortlist < 0:
            raise EexitError(f"shortlist must be >= 0 (0 = the full vocabulary); got {shortlist}")
        if self.shortlist:
            self.stateful = True  # the candidates come from the first scored exit

    def measure_logits(self, view) -> torch.Tensor:
        """The logits the measure reads: the full exit, or the token's K candidates."""
        if not self.shortlist:
            return view.logits
        ids = view.state.get("shortlist")
        model = view.model
        if ids is None or str(view.layer) in getattr(model, "exit_heads", {}):
            full = view.logits  # one full head: the first scored exit (or a separate head)
            ids = full.topk(min(self.shortlist, full.shape[-1]), dim=-1).indices
            view.state["shortlist"] = ids
            return full.gather(1, ids)
        h = model.parts.final_norm(model.translate(view.hidden, view.layer)).float()
        head = model.parts.lm_head
        logits = torch.bmm(head.weight[ids].float(), h[:, :, None])[:, :, 0]  # [n, K]
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[ids].float()
        return logits

    def check_model(self, model) -> None:
        if self.shortlist > model.vocab_size:
            raise EexitError(
                f"--param shortlist={self.shortlist} is more candidates than the vocabulary: K "
                f"must be <= {model.vocab_size} (0 = the full vocabulary)"
            )

    def decision_macs(self, hidden_size, vocab_size):
        if not self.shortlist:
            return super().decision_macs(hidden_size, vocab_size)
        k = min(self.shortlist, vocab_size)  # the candidates actually scored
        return float(hidden_size * k + 4 * k)

    def first_decision_extra_macs(self, hidden_size, vocab_size):
        if not self.shortlist:
            return 0.0
        full = super().decision_macs(hidden_size, vocab_size)
        return full - self.decision_macs(hidden_size, vocab_size)


@register_policy("max-prob")
class MaxProb(SoftmaxMeasure):
    """Seed 002: the largest softmax probability of the exit's prediction."""

    def score(self, view):
        return torch.softmax(self.measure_logits(view).float(), -1).max(-1).values


@register_policy("margin")
class Margin(SoftmaxMeasure):
    """CALM: top-1 minus top-2 softmax probability."""

    def score(self, view):
        top = torch.softmax(self.measure_logits(view).float(), -1).topk(2, dim=-1).values
        return top[:, 0] - top[:, 1]


@register_policy("entropy")
class Entropy(SoftmaxMeasure):
    """DeeBERT: 1 - H(p) / log V, so that a peaked distribution scores near 1."""

    def score(self, view):
        logits = self.measure_logits(view).float()
        logp = torch.log_softmax(logits, -1)
        h = -(logp.exp() * logp).sum(-1)
        return 1.0 - h / math.log(logits.shape[-1])


@register_policy("saturation")
class Saturation(ExitPolicy):
    """CALM: hidden-state saturation, cosine similarity of this and the previous layer's state."""

    needs_logits = False

    def score(self, view):
        return F.cosine_similarity(view.hidden.float(), view.prev_hidden.float(), dim=-1).clamp_min(
            0.0
        )

    def decision_macs(self, hidden_size, vocab_size):
        return 3.0 * hidden_size


@register_policy("static")
class Static(ExitPolicy):
    """Every token exits at the first exit at or after a fixed layer (`layer`, default: the last =
    full model)."""

    needs_logits = False
    threshold_free = True

    def __init__(
        self,
        threshold: float = 0.9,
        min_exit_layer: int = 1,
        decay_tau: float = 0.0,
        layer: int | None = None,
    ):
        super().__init__(threshold, min_exit_layer, decay_tau)
        self.layer = positive_int("layer", layer) if layer is not None else None

    def bind(self, model, model_dir) -> None:
        if self.layer is not None and self.layer > model.num_layers:
            raise EexitError(
                f"static: --param layer={self.layer} is beyond the model's {model.num_layers} "
                "layers"
            )

    def score(self, view):
        target = self.layer if self.layer is not None else view.num_layers
        return torch.full(
            (view.hidden.shape[0],), float(view.layer >= target), device=view.hidden.device
        )

    def decision_macs(self, hidden_size, vocab_size):
        return 0.0


@register_policy("oracle")
class Oracle(ExitPolicy):
    """The earliest exit after which the top-1 prediction never changes (needs all layers)."""

    needs_logits = False
    needs_future = True
    threshold_free = True

    def score(self, view):
        raise EexitError(
            "the oracle policy needs every layer's prediction: use it with evaluate / sweep, not "
            "decoding"
        )

    @staticmethod
    def scores_from_top1(top1: torch.Tensor) -> torch.Tensor:
        """[K, N] top-1 ids per exit -> [K, N] 1.0 where the prediction is fixed from this exit
        on."""
        same = top1 == top1[-1:]
        stable = torch.flip(torch.cumprod(torch.flip(same.int(), [0]), 0), [0])
        return stable.float()

    def decision_macs(self, hidden_size, vocab_size):
        return 0.0
