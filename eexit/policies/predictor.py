"""A cheap learned exit predictor in the manner of SpecEE (Xu et al., ISCA 2025): `--policy
predictor`, fitted by `eexit calibrate --fit predictor`.

Why: a softmax measure pays a full LM head (d x V) per decision, which on small models costs
more than the layers it saves, and a hidden-state classifier (meta, lstm, mlp3) never looks at
what the exit would predict. SpecEE decides from a few candidate tokens only: each decision
costs d x K multiply-adds plus a tiny MLP.

At each exit the predictor scores a shortlist of K candidate tokens, chosen as the `shortlist`
option of the softmax measures chooses it: the first scored exit (the first at or above
`min_exit_layer`) computes the full head once and keeps its top-K tokens (in the per-token
state); every later exit takes the logits of those K tokens only, through the exit's own norm
and LM-head rows (exit adapter included). From them and the hidden states it forms a handful
of features (`FEATURES`): the top-1 probability and the top-1 - top-2 margin of the softmax over
the K candidates, whether the top-1 candidate changed since the last scored exit, the change of
the top-1 probability since then, the cosine of this and the previous layer's hidden state, and
the normalised depth (layer / layers). One MLP shared by all exits (the depth is an input) maps
them to the probability that exiting here keeps the final prediction (label `stable` by
default). Its score goes through the one exit rule, so LTT calibrates its threshold as any
other policy's.

Why not the previous position's final prediction as the candidates (SpecEE's draft is a
next-token guess): an exit view holds one token's layers only; the previous position has no
final layer when it exited early (propagate / recompute KV); and on SmolLM2-135M its top-8 held
the final top-1 for 22 % of tokens, against 30 % for layer 1's top-8 and 44 % for layer 20's.

Cost per decision: d x K + 4 K (candidate logits and their softmax) + 3 d (cosine) + the MLP;
a token's first decision computes the full head instead of the K rows
(`first_decision_extra_macs`). The predictor is fitted for one K and one minimum exit layer
(both saved with it; another value is refused at load).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from eexit.errors import EexitError
from eexit.policies.base import ExitPolicy, ExitView, positive_int, register_policy
from eexit.policies.learned import (
    CLASSIFIER_DIR,
    CLASSIFIERS,
    exit_labels,
    load_classifier,
    train_with_early_stopping,
)
from eexit.runtime import LOCAL, Runtime, logits_chunk_tokens

PREDICTOR = "predictor"
DEFAULT_LABEL = "stable"  # calibrate --fit predictor without --label
DEFAULT_SHORTLIST = 8
HIDDEN_UNITS = 16
FEATURES = ("top1_prob", "margin", "top1_changed", "top1_prob_change", "cosine", "depth")


@CLASSIFIERS.register("predictor")
class PredictorMLP(nn.Module):
    """len(FEATURES) -> HIDDEN_UNITS (ReLU) -> 1 exit logit, shared by every exit."""

    def __init__(self, d: int = 0):  # d: the registry's signature; the inputs are FEATURES
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(len(FEATURES), HIDDEN_UNITS), nn.ReLU(), nn.Linear(HIDDEN_UNITS, 1)
        )

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # [..., F] -> exit logit [...]
        return self.net(feats).squeeze(-1)

    def macs(self, d: int = 0) -> float:
        return float(len(FEATURES) * HIDDEN_UNITS + HIDDEN_UNITS)


def check_shortlist(k: int, vocab_size: int) -> int:
    if k > vocab_size:
        raise EexitError(
            f"predictor: shortlist={k} is more candidates than the vocabulary ({vocab_size} tokens)"
        )
    return k


def candidate_logits(model, hidden: torch.Tensor, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """[N, K] logits of the candidate tokens `ids` [N, K] at the exit after `layer`: the exit's
    norm and the LM-head rows of those tokens (d x K multiply-adds), the exit adapter first."""
    key = str(layer)
    if key in model.exit_heads:  # a separate exit head: its own norm and rows
        norm, head = model.exit_heads[key][0], model.exit_heads[key][1]
    else:
        norm, head = model.parts.final_norm, model.parts.lm_head
        hidden = model.translate(hidden, layer)
    h = norm(hidden).float()
    logits = torch.einsum("nd,nkd->nk", h, head.weight[ids].float())
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias[ids].float()
    return logits


@register_policy("predictor")
class Predictor(ExitPolicy):
    """SpecEE-style: a tiny MLP over features of K candidate tokens (`--param shortlist=K`,
    default: the K it was fitted with; `--param classifier=PATH`, default
    `exit_classifiers/predictor.pt` beside the checkpoint)."""

    needs_logits = True  # candidate logits through the exit's head (and adapter)
    needs_classifier = True
    # Not `stateful`: the candidates, the last top-1 and its probability carry across exits, but
    # only from the first exit at or above min_exit_layer (exits below it are not scored, in
    # decoding and offline alike), so a deep model's shortlist comes from a layer that knows
    # something and no decision is paid below the minimum exit layer.
    stateful = False

    def __init__(
        self,
        threshold: float = 0.9,
        min_exit_layer: int = 1,
        decay_tau: float = 0.0,
        shortlist: int | None = None,
        classifier: str | None = None,
    ):
        super().__init__(threshold, min_exit_layer, decay_tau)
        self.requested = positive_int("shortlist", shortlist) if shortlist is not None else None
        self.shortlist = self.requested or DEFAULT_SHORTLIST
        self.classifier_path = classifier
        self.clf: nn.Module | None = None

    def check_model(self, model) -> None:
        if self.requested is not None:
            check_shortlist(self.requested, model.vocab_size)

    def bind(self, model, model_dir) -> None:
        self.check_model(model)
        path = self.classifier_path or (
            Path(model_dir) / CLASSIFIER_DIR / f"{PREDICTOR}.pt" if model_dir else None
        )
        if path is None:
            raise EexitError("policy 'predictor' needs a fitted predictor: --param classifier=PATH")
        clf, blob = load_classifier(path, model.hidden_size, PREDICTOR, model)
        fitted = int(blob.get("shortlist", DEFAULT_SHORTLIST))
        if self.requested is not None and self.requested != fitted:
            raise EexitError(
                f"the predictor at {path} was fitted with shortlist={fitted}, not "
                f"{self.requested}; refit with --fit predictor --param shortlist={self.requested}"
            )
        first = int(blob.get("min_exit_layer", 1))  # its candidates come from this exit on
        if first != self.min_exit_layer:
            raise EexitError(
                f"the predictor at {path} was fitted with --min-exit-layer {first}, not "
                f"{self.min_exit_layer}; refit with --fit predictor --min-exit-layer "
                f"{self.min_exit_layer}"
            )
        self.shortlist = check_shortlist(fitted, model.vocab_size)
        self.clf = clf.to(model.device)

    def features(self, view: ExitView) -> torch.Tensor:
        """[N, len(FEATURES)] at this exit; updates the token's state."""
        state = view.state
        ids = state.get("predictor_ids")
        if ids is None:  # the first scored exit: one full head, its top-K kept
            full = view.logits
            ids = full.topk(min(self.shortlist, full.shape[-1]), dim=-1).indices
            state["predictor_ids"] = ids
            logits = full.gather(1, ids)
        else:
            logits = candidate_logits(view.model, view.hidden, view.layer, ids)
        p = torch.softmax(logits.float(), -1)
        top = p.topk(min(2, p.shape[-1]), dim=-1)
        p1 = top.values[:, 0]
        margin = p1 - top.values[:, 1] if p.shape[-1] > 1 else p1
        top1 = ids.gather(1, top.indices[:, :1]).squeeze(1)
        prev_top1, prev_p1 = state.get("predictor_top1"), state.get("predictor_p1")
        zero = torch.zeros_like(p1)
        changed = (top1 != prev_top1).float() if prev_top1 is not None else zero
        dp1 = p1 - prev_p1 if prev_p1 is not None else zero
        state["predictor_top1"], state["predictor_p1"] = top1, p1
        cos = F.cosine_similarity(view.hidden.float(), view.prev_hidden.float(), dim=-1)
        depth = torch.full_like(p1, view.layer / view.num_layers)
        return torch.stack([p1, margin, changed, dp1, cos, depth], dim=-1)

    def score(self, view: ExitView) -> torch.Tensor:
        if self.clf is None:
            raise EexitError(
                "policy 'predictor' has no fitted predictor loaded (bind it to a model first)"
            )
        if view.layer < self.min_exit_layer:  # not scored: the state starts at the first exit
            return torch.zeros(view.hidden.shape[0], device=view.hidden.device)
        return torch.sigmoid(self.clf(self.features(view)))

    def decision_macs(self, hidden_size, vocab_size):
        k = self.shortlist
        return float(hidden_size * k + 4 * k + 3 * hidden_size) + PredictorMLP().macs()

    def first_decision_extra_macs(self, hidden_size, vocab_size):
        k = self.shortlist
        return float((hidden_size * vocab_size + 4 * vocab_size) - (hidden_size * k + 4 * k))


def fit_shortlist(request, vocab_size: int) -> int:
    """K to fit: `--param shortlist=K` of a predictor request, else the default; checked."""
    params = (request.policy_params or {}) if request.policy == PREDICTOR else {}
    k = positive_int("shortlist", params.get("shortlist", DEFAULT_SHORTLIST))
    return check_shortlist(k, vocab_size)


@dataclass
class PredictorData:
    feats: torch.Tensor  # [N, scored exits, F]
    top1: torch.Tensor  # [exits, N] top-1 at every exit (the labels)
    ids: torch.Tensor  # [N, K] each token's shortlist
    scored: list[int]  # indices into the exits where the predictor decides


@torch.no_grad()
def predictor_data(
    model,
    x,
    shortlist: int,
    batch_size: int = 8,
    runtime: Runtime | None = None,
    min_exit_layer: int = 1,
) -> PredictorData:
    """The predictor's training data from teacher-forced passes, through the policy's own
    `features` at the exits it scores. Several processes: each runs a contiguous block of the
    batches; all get all rows."""
    from eexit.evaluation.records import shard_forward_batches  # records imports the policies

    runtime = runtime or LOCAL
    chunk = logits_chunk_tokens(model.vocab_size, model.device)
    policy = Predictor(shortlist=shortlist, min_exit_layer=min_exit_layer)
    L = model.num_layers
    scored = [k for k, layer in enumerate(model.exit_layers) if policy.scored_at(layer, L)]
    if not scored:
        raise EexitError(
            "fitting the predictor needs an exit at or above --min-exit-layer and below the last "
            "layer (see --exit-layers)"
        )
    parts = []
    for flat, _, _ in shard_forward_batches(model, x, None, batch_size, runtime, "features"):
        for a in range(0, flat[0].shape[0], chunk):
            rows = [s[a : a + chunk] for s in flat]
            state: dict = {}
            feats, top1 = [], []
            for layer in model.exit_layers:
                view = ExitView(
                    layer,
                    L,
                    rows[: layer + 1],
                    lambda h=rows[layer], la=layer: model.exit_logits(h, la),
                    model,
                    state,
                )
                if policy.scored_at(layer, L):
                    feats.append(policy.features(view).cpu())
                top1.append(view.logits.argmax(-1).cpu())
                del view
            parts.append((torch.stack(feats, 1), torch.stack(top1), state["predictor_ids"].cpu()))
    parts = runtime.gather(parts)
    return PredictorData(
        torch.cat([f for f, _, _ in parts]),
        torch.cat([t for _, t, _ in parts], 1),
        torch.cat([i for _, _, i in parts]),
        scored,
    )


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (the Mann-Whitney statistic, ties counted half)."""
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = torch.empty(len(scores), dtype=torch.float64)
    order = scores.argsort()
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    for v in scores.unique():  # average ranks of ties
        tie = scores == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    r_pos = ranks[labels > 0.5].sum().item()
    return (r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def fit_predictor(
    feats: torch.Tensor,
    labels: torch.Tensor,
    seed: int = 0,
    max_epochs: int = 60,
    patience: int = 5,
    lr: float = 1e-2,
    batch: int = 256,
) -> tuple[PredictorMLP, dict]:
    """feats [N, E, F]; labels [N, E] (1 = exiting there keeps the final prediction). Plain
    binary cross-entropy, so the score estimates that probability; the tokens are split 90 / 10
    and training stops early on the held-out tenth."""
    torch.manual_seed(seed)
    n = feats.shape[0]
    idx = torch.randperm(n)
    n_val = max(1, n // 10)
    val, tr = idx[:n_val], idx[n_val:]
    pos = labels[tr].mean().item()
    if pos in (0.0, 1.0):
        raise EexitError(
            f"cannot fit the predictor: every calibration label is {int(pos)} (use more data or "
            "another label)"
        )
    clf = PredictorMLP()
    xs, ys = feats[tr].reshape(-1, feats.shape[-1]), labels[tr].reshape(-1)
    xv, yv = feats[val].reshape(-1, feats.shape[-1]), labels[val].reshape(-1)

    def loss_on(x, y):
        return F.binary_cross_entropy_with_logits(clf(x), y)

    best, epochs = train_with_early_stopping(
        clf,
        lambda b: loss_on(xs[b], ys[b]),
        lambda: loss_on(xv, yv),
        len(ys),
        max_epochs,
        patience,
        lr,
        batch,
    )
    with torch.no_grad():
        logit = clf(xv)
    acc = ((logit > 0).float() == yv).float().mean().item()
    share = yv.mean().item()
    return clf, {
        "heldout_loss": best,
        "heldout_accuracy": acc,
        "heldout_majority": max(share, 1 - share),
        "heldout_auc": auc(logit, yv),
        "positive_share": pos,
        "epochs": epochs,
        "train_tokens": len(tr),
    }


def fit_from_data(data: PredictorData, label: str) -> tuple[PredictorMLP, dict]:
    """Fit on `predictor_data`'s output with the given label; the metrics add how often the
    final top-1 is among the shortlist (the candidates' recall)."""
    labels = exit_labels(data.top1, label)[data.scored].T
    clf, metrics = fit_predictor(data.feats, labels)
    recall = (data.ids == data.top1[-1][:, None]).any(-1).float().mean().item()
    return clf, {**metrics, "final_top1_in_shortlist": recall}
