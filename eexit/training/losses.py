"""Training objectives for early-exit models, registered by name (`--loss NAME`).

Each loss is one decorated class; its settings are its own `Params` dataclass, filled from
`loss.params` in the config (`--set loss.params.kd_weight=0.5`) with the config's strict checks
(unknown keys with "did you mean", types). Adding one:

    @register_loss("my-loss")
    class MyLoss(Loss):
        @dataclass
        class Params:
            weight: float = 1.0  # what it weighs

        def __call__(self, b: LossBatch):
            ce = b.exit_ce()                       # per-token CE at every exit
            return self.params.weight * ce.per_layer[b.last].mean(), {}

Cost: the LM head is the expensive part of an exit (vocabulary x hidden). `exit_ce` scores
the final layer on every position and the intermediate exits on a random share
(`loss.exit_token_fraction`) of positions, all intermediate exits in one matmul; the mean CE
over a uniform sample is an unbiased estimate of the full mean, so the objective is unchanged
in expectation while the extra head cost shrinks by that share.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from eexit.config import LossConfig, fill_dataclass
from eexit.errors import EexitError
from eexit.registry import Registry
from eexit.training.chunked_ce import head_ce

LOSSES: Registry[type[Loss]] = Registry("loss")
register_loss = LOSSES.register


class Loss:
    """Base class: `__call__(batch) -> (loss, logs)`; settings in `self.params`."""

    @dataclass
    class Params:
        pass

    needs_halting_gate = False  # the model gets seed 000's halting gate (ponder)
    registered_name = "?"

    def __init__(self, params: dict | None = None):
        self.params = fill_dataclass(self.Params(), params or {}, "loss.params.")
        self.check()

    def check(self) -> None:
        """Validate `self.params` (raise EexitError with what is allowed)."""

    def __call__(self, b: LossBatch) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


def make_loss(cfg: LossConfig) -> Loss:
    return LOSSES.get(cfg.name)(cfg.params)


@dataclass
class ExitCE:
    per_layer: dict[
        int, torch.Tensor
    ]  # layer -> per-position CE (intermediate: sampled positions; last: all)
    sample: torch.Tensor | None  # flat indices of the sampled positions (None = all)
    last: int

    def at_sample(self, layer: int) -> torch.Tensor:
        """CE of `layer` on the sampled positions (the last layer is gathered there too)."""
        ce = self.per_layer[layer]
        if layer == self.last and self.sample is not None:
            return ce[self.sample]
        return ce


@dataclass
class LossBatch:
    model: torch.nn.Module  # EarlyExitModel
    states: list[torch.Tensor]  # every block's output [B, T, d]
    targets: torch.Tensor  # [B, T] next-token ids
    exit_token_fraction: float = 1.0  # share of positions scored at intermediate exits
    step: int = 0  # optimizer step (0-based) of this batch: curricula depend on it
    total_steps: int = 1  # train.steps
    # tokens of exit logits computed at a time (train.logits_chunk_tokens; 0 = auto: whole when
    # the exits' float32 logits fit AUTO_LOGITS_BYTES, else chunks of AUTO_CHUNK_BYTES)
    logits_chunk_tokens: int = 0

    @property
    def last(self) -> int:
        return self.model.num_layers

    @property
    def exits(self) -> list[int]:
        return self.model.exit_layers

    def exit_ce(self, layers: list[int] | None = None) -> ExitCE:
        return self._exit_ce_all if layers is None else compute_exit_ce(self, layers)

    @cached_property
    def _exit_ce_all(self) -> ExitCE:
        return compute_exit_ce(self, self.exits)


AUTO_LOGITS_BYTES = 1 << 30  # auto: the exits' float32 logits up to 1 GiB are computed whole
AUTO_CHUNK_BYTES = 1 << 28  # auto, beyond that: 256 MiB of logits per chunk


def logits_chunk(b: LossBatch, exits: int, tokens: int) -> int:
    """Tokens per chunk of exit logits for `exits` exits over `tokens` tokens (0 = whole)."""
    if b.logits_chunk_tokens > 0:
        return b.logits_chunk_tokens
    V = b.model.vocab_size
    if exits * tokens * V * 4 <= AUTO_LOGITS_BYTES:
        return 0
    return max(1, AUTO_CHUNK_BYTES // (4 * V))


def compute_exit_ce(b: LossBatch, layers: list[int]) -> ExitCE:
    """Per-position CE of each exit in `layers` (intermediate exits on a sample of positions
    when exit_token_fraction < 1). Whole: one LM-head matmul for all shared-head exits; chunked
    (`logits_chunk`): each exit's logits `chunk` tokens at a time, recomputed in the backward
    pass (training/chunked_ce.py), so that memory follows the chunk, not exits x tokens x V."""
    model, targets, last = b.model, b.targets.reshape(-1), b.last
    n = targets.numel()
    out: dict[int, torch.Tensor] = {}
    inter = [l for l in layers if l != last]
    frac = b.exit_token_fraction
    k = max(1, int(round(frac * n))) if inter and frac < 1.0 else n
    chunk = logits_chunk(b, len(inter), k) if inter else logits_chunk(b, 1, n)
    if last in layers:
        h_last = b.states[last - 1].reshape(n, -1)
        if chunk:
            out[last] = head_ce(model, last, h_last, targets, logits_chunk(b, 1, n))
        else:
            logits = model.exit_logits(h_last, last)
            out[last] = F.cross_entropy(logits.float(), targets, reduction="none")
    sample = None
    if inter:
        if frac < 1.0:
            sample = torch.randperm(n, device=targets.device)[:k]
        pick = (
            (lambda h: h.reshape(n, -1)[sample])
            if sample is not None
            else (lambda h: h.reshape(n, -1))
        )
        tgt = targets[sample] if sample is not None else targets
        if chunk:  # each exit on its own, chunk by chunk
            for l in inter:
                out[l] = head_ce(model, l, pick(b.states[l - 1]), tgt, chunk)
            return ExitCE(out, sample, last)
        shared = [l for l in inter if str(l) not in model.exit_heads]
        if shared:  # one LM-head matmul for all shared-head exits
            # each exit's adapter (lens) first, then the shared norm + head once
            h = torch.cat([model.translate(pick(b.states[l - 1]), l) for l in shared])
            ce = F.cross_entropy(model.head(h).float(), tgt.repeat(len(shared)), reduction="none")
            for l, part in zip(shared, ce.chunk(len(shared))):
                out[l] = part
        for l in inter:
            if l not in out:
                out[l] = F.cross_entropy(
                    model.exit_logits(pick(b.states[l - 1]), l).float(), tgt, reduction="none"
                )
    return ExitCE(out, sample, last)


def _logs(ce: ExitCE) -> dict[str, float]:
    return {f"ce@{l}": v.mean().item() for l, v in sorted(ce.per_layer.items())}


@register_loss("final")
class Final(Loss):
    """Cross-entropy at the last layer only (the standard baseline)."""

    def __call__(self, b):
        ce = b.exit_ce([b.last])
        return ce.per_layer[b.last].mean(), _logs(ce)


def weighted_ce(b: LossBatch):
    """CALM: sum_i alpha_i * CE_i with alpha_i = i / sum_j j over the exit layers."""
    ce = b.exit_ce()
    total = float(sum(b.exits))
    loss = sum((layer / total) * ce.per_layer[layer].mean() for layer in b.exits)
    return loss, _logs(ce)


@register_loss("weighted-ce")
class WeightedCE(Loss):
    """CALM: sum_i alpha_i * CE_i with alpha_i = i / sum_j j over the exit layers."""

    def __call__(self, b):
        return weighted_ce(b)


@register_loss("aux")
class Aux(Loss):
    """Seed 002, experiment 3: 0.5 * CE(shallow exit) + 0.5 * CE(deep exit)."""

    def __call__(self, b):
        if len(b.exits) < 2:
            raise EexitError(
                "--loss aux needs at least two exit layers (e.g. model.exit_layers=[1,3])"
            )
        shallow = b.exits[0]
        ce = b.exit_ce([shallow, b.last])
        loss = 0.5 * ce.per_layer[shallow].mean() + 0.5 * ce.per_layer[b.last].mean()
        return loss, _logs(ce)


@register_loss("deep-supervision")
class DeepSupervision(Loss):
    """Seed 002, experiment 4 (Lee et al. 2015): the mean of CE over all exits."""

    def __call__(self, b):
        ce = b.exit_ce()
        return sum(ce.per_layer[layer].mean() for layer in b.exits) / len(b.exits), _logs(ce)


KD_MAPPINGS = ("last", "uniform", "closest")


def kd_targets(b: LossBatch, shallow: int, mode: str, h: dict | None = None) -> list[int]:
    """FREE's mapping m(i) from shallow layers 1..s to deep layers s+1..L
    (h: layer -> the states compared by `closest`)."""
    s, L = shallow, b.last
    deep = list(range(s + 1, L + 1))
    if mode == "last":
        return [L] * s
    if mode == "uniform":  # the shallow layers spread evenly: m(i) = s + ceil(i (L-s) / s)
        return [s + -(-i * (L - s) // s) for i in range(1, s + 1)]
    with torch.no_grad():  # closest: argmin_j MSE(H_S^i, H_D^j)
        h = h or {layer: b.states[layer - 1] for layer in range(1, b.last + 1)}
        return [
            deep[int(torch.stack([F.mse_loss(h[i], h[j]) for j in deep]).argmin())]
            for i in range(1, s + 1)
        ]


@register_loss("free-kd")
class FreeKD(Loss):
    """FREE: weighted CE + kd_weight * 1/|L_S| sum_i MSE(H_S^i, H_D^m(i)) (deep states teach).

    H are the block outputs passed through the model's final norm (the states the LM head reads):
    on raw residual streams, whose scale grows with depth, the MSE dominates the loss and training
    diverges (seen on an 8-layer GPT-2: loss 5e8 after 400 steps)."""

    @dataclass
    class Params:
        kd_mapping: str = "last"  # shallow -> deep layer mapping: last | uniform | closest
        kd_weight: float = 1.0  # weight of the distillation term
        shallow_layer: int | None = None  # last layer of the shallow module (default: first exit)

    def check(self):
        if self.params.kd_mapping not in KD_MAPPINGS:
            raise EexitError(
                f"loss.params.kd_mapping must be one of {', '.join(KD_MAPPINGS)}; "
                f"got {self.params.kd_mapping!r}"
            )

    def __call__(self, b):
        p = self.params
        shallow = p.shallow_layer or (b.exits[0] if len(b.exits) > 1 else None)
        if shallow is None or not 1 <= shallow < b.last:
            raise EexitError(
                f"--loss free-kd needs a shallow exit below layer {b.last} "
                "(set loss.params.shallow_layer or model.exit_layers)"
            )
        loss, logs = weighted_ce(b)
        norm = b.model.parts.final_norm
        h = {layer: norm(b.states[layer - 1]).float() for layer in range(1, b.last + 1)}
        mapping = kd_targets(b, shallow, p.kd_mapping, h)
        pairs = zip(range(1, shallow + 1), mapping)
        kd = sum(F.mse_loss(h[i], h[m].detach()) for i, m in pairs) / shallow
        logs["kd"] = kd.item()
        return loss + p.kd_weight * kd, logs


def halting_distribution(halting_logits: torch.Tensor) -> torch.Tensor:
    """Per-exit halting probabilities p_n = lambda_n * prod_{j<n} (1 - lambda_j); the last exit
    takes the rest."""
    lam = torch.sigmoid(halting_logits.float())
    lam = torch.cat([lam[:-1], torch.ones_like(lam[-1:])])
    survive = torch.cumprod(torch.cat([torch.ones_like(lam[:1]), 1 - lam[:-1]]), dim=0)
    return lam * survive


@register_loss("ponder")
class Ponder(Loss):
    """Seed 000: expected task loss sum_n p_n * L_n minus beta * H(p), p from the learned gate."""

    needs_halting_gate = True

    @dataclass
    class Params:
        ponder_beta: float = 0.01  # weight of the halting-distribution entropy bonus

    def __call__(self, b):
        ce = b.exit_ce()
        n = b.targets.numel()
        gate = b.model.halting_logits(b.states).reshape(len(b.exits), n)
        if ce.sample is not None:
            gate = gate[:, ce.sample]
        p = halting_distribution(gate)  # [n_exits, positions]
        losses = torch.stack([ce.at_sample(layer) for layer in b.exits])
        expected = (p * losses).sum(0).mean()
        entropy = -(p * torch.log(p.clamp_min(1e-9))).sum(0).mean()
        exits = torch.tensor(b.exits, dtype=p.dtype, device=p.device)[:, None]
        logs = _logs(ce)
        logs.update({"entropy": entropy.item(), "mean_exit": (p * exits).sum(0).mean().item()})
        return expected - self.params.ponder_beta * entropy, logs


@register_loss("lens-kl")
class LensKL(Loss):
    """Exit adapters on a frozen model (tuned lens): the mean over shallow exits of
    KL(p_final || p_exit), the model's own final distribution as the target. With
    model.freeze_backbone the full-depth model is unchanged. Cost control: positions are
    sampled (loss.exit_token_fraction) and `exits_per_step` exits drawn per step."""

    @dataclass
    class Params:
        exits_per_step: int = 0  # shallow exits trained per step, drawn at random (0 = all)

    def check(self):
        if self.params.exits_per_step < 0:
            raise EexitError("loss.params.exits_per_step must be >= 0 (0 = every exit)")

    def __call__(self, b):
        model, L = b.model, b.last
        n = b.targets.numel()
        shallow = [layer for layer in b.exits if layer != L]
        if not shallow:
            raise EexitError("--loss lens-kl needs an exit below the last layer")
        k = self.params.exits_per_step
        if k and k < len(shallow):
            pick = torch.randperm(len(shallow), device=b.targets.device)[:k].sort().values
            shallow = [shallow[i] for i in pick.tolist()]
        idx = None
        if b.exit_token_fraction < 1.0:
            count = max(1, int(round(b.exit_token_fraction * n)))
            idx = torch.randperm(n, device=b.targets.device)[:count]

        def flat(h):
            h = h.reshape(n, -1)
            return h if idx is None else h[idx]

        with torch.no_grad():
            target = torch.log_softmax(model.exit_logits(flat(b.states[L - 1]), L).float(), -1)
            p_target = target.exp()
        total, logs = 0.0, {}
        for layer in shallow:  # one exit's logits at a time: no [exits x positions x V] tensor
            logp = torch.log_softmax(
                model.exit_logits(flat(b.states[layer - 1]), layer).float(), -1
            )
            kl = (p_target * (target - logp)).sum(-1).mean()
            total = total + kl
            logs[f"kl@{layer}"] = kl.item()
        return total / len(shallow), logs


CURRICULA = ("none", "rotational", "gradual")


@register_loss("layerskip")
class LayerSkip(Loss):
    """LayerSkip's early-exit loss (Elhoushi et al. 2024): CE at every exit through the shared
    head, exit l (0-based block index) scaled by e_scale * sum_{i<=l} i (rising with depth), the
    last layer by L - 1 + e_scale * sum_{i<=L-2} i, the scales of the exits switched on at this
    step normalised to sum 1. Curricula decide which shallow exits are on at step t:
    `rotational` every R-th exit, rotating with t ((index - t) mod R == 0); `gradual` exits
    switched on from the last layer down, the deepest shallow exit from step 0 and one more
    every total_steps / (shallow exits) steps; `none` all of them. Pair it with
    `train.layer_dropout` for the whole recipe."""

    @dataclass
    class Params:
        e_scale: float = 1.0  # weight of the shallow exits' losses against the last layer's
        # which shallow exits are on per step: none | rotational | gradual
        curriculum: str = "rotational"
        rotation: int = 2  # rotational: one exit in every `rotation` is on at a step

    def check(self):
        p = self.params
        if p.curriculum not in CURRICULA:
            raise EexitError(
                f"loss.params.curriculum must be one of {', '.join(CURRICULA)}; "
                f"got {p.curriculum!r}"
            )
        if p.rotation < 1 or p.e_scale < 0:
            raise EexitError("loss.params.rotation must be >= 1 and loss.params.e_scale >= 0")

    def active_exits(self, exits: list[int], last: int, step: int, total: int) -> list[int]:
        """The exits whose loss is on at `step` (the last layer always)."""
        shallow = [l for l in exits if l != last]
        p = self.params
        if p.curriculum == "rotational":
            shallow = [l for i, l in enumerate(shallow) if (i - step) % p.rotation == 0]
        elif p.curriculum == "gradual" and shallow:
            on = 1 + (step * len(shallow)) // max(1, total)  # 1 .. len(shallow), top down
            shallow = shallow[len(shallow) - min(on, len(shallow)) :]
        return [*shallow, last]

    def scales(self, layers: list[int], last: int) -> dict[int, float]:
        e = self.params.e_scale
        raw = {
            l: (last - 1 + e * (last - 2) * (last - 1) / 2)
            if l == last
            else e * (l - 1) * l / 2  # block index l - 1: sum_{i<=l-1} i
            for l in layers
        }
        total = sum(raw.values())
        if total == 0:  # a 1-layer model: the last layer alone
            return {l: 1.0 / len(raw) for l in raw}
        return {l: v / total for l, v in raw.items()}

    def __call__(self, b):
        on = self.active_exits(b.exits, b.last, b.step, b.total_steps)
        ce = b.exit_ce(on)
        scale = self.scales(on, b.last)
        loss = sum(scale[l] * ce.per_layer[l].mean() for l in on)
        logs = _logs(ce)
        logs["exits_on"] = float(len(on))
        return loss, logs
