"""Learned exit classifiers and the policies that use them.

- `meta`  (CALM): a linear classifier on the current hidden state.
- `lstm`  (monotonic early exiting, seed 001): a two-layer LSTM over the token's hidden states
          from layer 1 up to the current layer, then 2 outputs (exit / continue).
- `mlp3`  (seed 001): a two-layer MLP on the last three hidden states (input 3d, ReLU, d hidden
          units, 2 outputs).

Inputs are the block outputs passed through the model's own final norm (the scale the LM head
sees). Labels per (token, exit layer): `consistent` = this layer's top-1 already equals the final
layer's top-1; `stable` = ... and it never changes after. `eexit calibrate --fit` trains them
(class-balanced, early stopping on a held-out part) and saves them beside the checkpoint in
`exit_classifiers/<name>.pt`; `--policy meta|lstm|mlp3` then loads them by name.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from eexit.errors import EexitError
from eexit.files import atomic_torch_save
from eexit.models.identity import check_identity
from eexit.policies.base import ExitPolicy, ExitView, register_policy
from eexit.registry import Registry

CLASSIFIERS: Registry[type[nn.Module]] = Registry("exit classifier")
CLASSIFIER_DIR = "exit_classifiers"
LABELS = ("consistent", "stable")


@CLASSIFIERS.register("meta")
class MetaClassifier(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.linear = nn.Linear(d, 1)

    def forward(
        self, seq: torch.Tensor
    ) -> torch.Tensor:  # seq [N, l, d] -> exit logit per step [N, l]
        return self.linear(seq).squeeze(-1)

    def macs(self, d: int) -> float:
        return float(d)


@CLASSIFIERS.register("lstm")
class LSTMClassifier(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.lstm = nn.LSTM(d, d, num_layers=2, batch_first=True)
        self.out = nn.Linear(d, 2)

    def forward(self, seq, hc=None):
        y, hc = self.lstm(seq, hc)
        o = self.out(y)
        return o[..., 1] - o[..., 0], hc  # log-odds of "exit"

    def macs(self, d: int) -> float:
        return 2 * 4 * (2 * d * d) + 2 * d  # one step of two LSTM layers + the output layer


@CLASSIFIERS.register("mlp3")
class MLP3Classifier(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3 * d, d), nn.ReLU(), nn.Linear(d, 2))

    def forward(self, seq):  # [N, l, d] -> logit per step [N, l] from (h_{t-2}, h_{t-1}, h_t)
        first = seq[:, :1]
        padded = torch.cat([first, first, seq], dim=1)  # layers before 1 repeat layer 1
        windows = torch.cat([padded[:, :-2], padded[:, 1:-1], padded[:, 2:]], dim=-1)
        o = self.net(windows)
        return o[..., 1] - o[..., 0]

    def macs(self, d: int) -> float:
        return 3 * d * d + 2 * d


def step_logits(clf: nn.Module, seq: torch.Tensor) -> torch.Tensor:
    out = clf(seq)
    return out[0] if isinstance(out, tuple) else out


def exit_labels(top1: torch.Tensor, kind: str) -> torch.Tensor:
    """[L, N] top-1 per layer -> [L, N] labels (1 = exiting here keeps the final prediction)."""
    if kind not in LABELS:
        raise EexitError(f"unknown label {kind!r}; valid: {', '.join(LABELS)}")
    same = (top1 == top1[-1:]).int()
    if kind == "consistent":
        return same.float()
    return torch.flip(torch.cumprod(torch.flip(same, [0]), 0), [0]).float()


def fit_classifier(
    name: str,
    feats: torch.Tensor,
    labels: torch.Tensor,
    layers: list[int],
    seed: int = 0,
    max_epochs: int = 40,
    patience: int = 5,
    lr: float = 3e-3,
    batch: int = 128,
) -> tuple[nn.Module, dict]:
    """feats [N, L, d] normed states of every layer; labels [L, N]; trained on the given exit
    layers."""
    torch.manual_seed(seed)
    n, L, d = feats.shape
    clf = CLASSIFIERS.get(name)(d)
    idx = torch.randperm(n)
    n_val = max(1, n // 10)
    val, tr = idx[:n_val], idx[n_val:]
    cols = torch.tensor([l - 1 for l in layers if l < L], dtype=torch.long)
    if len(cols) == 0:
        raise EexitError(
            "fitting exit classifiers needs an exit below the last layer (see --exit-layers)"
        )
    y = labels.T  # [N, L]
    pos = y[tr][:, cols].mean().item()
    if pos in (0.0, 1.0):
        raise EexitError(
            f"cannot fit {name}: every calibration label is {int(pos)} (use more data or another "
            "label)"
        )
    pos_weight = torch.tensor((1 - pos) / pos)

    def loss_on(rows):
        logit = step_logits(clf, feats[rows])[:, cols]
        return F.binary_cross_entropy_with_logits(logit, y[rows][:, cols], pos_weight=pos_weight)

    best, epochs = train_with_early_stopping(
        clf,
        lambda b: loss_on(tr[b]),
        lambda: loss_on(val),
        len(tr),
        max_epochs,
        patience,
        lr,
        batch,
    )
    with torch.no_grad():
        pred = (step_logits(clf, feats[val])[:, cols] > 0).float()
        acc = (pred == y[val][:, cols]).float().mean().item()
    return clf, {
        "heldout_loss": best,
        "heldout_accuracy": acc,
        "positive_share": pos,
        "epochs": epochs,
        "train_tokens": len(tr),
    }


def train_with_early_stopping(
    clf: nn.Module,
    train_loss,
    val_loss,
    n_train: int,
    max_epochs: int,
    patience: int,
    lr: float,
    batch: int,
) -> tuple[float, int]:
    """Adam over shuffled mini-batches of the n_train training rows (`train_loss(rows)`), stopped
    once the held-out loss (`val_loss()`) has not improved by 1e-4 for `patience` epochs; the
    best state is restored. Returns (best held-out loss, epochs run)."""
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    best, best_state, bad, epochs = float("inf"), None, 0, 0
    for epoch in range(1, max_epochs + 1):
        epochs = epoch
        clf.train()
        order = torch.randperm(n_train)
        for i in range(0, n_train, batch):
            opt.zero_grad()
            train_loss(order[i : i + batch]).backward()
            opt.step()
        clf.eval()
        with torch.no_grad():
            v = val_loss().item()
        if v < best - 1e-4:
            best, best_state, bad = v, {k: t.clone() for k, t in clf.state_dict().items()}, 0
        else:
            bad += 1
            if bad >= patience:
                break
    clf.load_state_dict(best_state)
    clf.eval()
    return best, epochs


def save_classifier(model_dir: str | Path, name: str, clf: nn.Module, meta: dict) -> Path:
    out = Path(model_dir) / CLASSIFIER_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.pt"
    atomic_torch_save({"kind": name, "state_dict": clf.state_dict(), **meta}, path)
    return path


def load_classifier(
    path: str | Path, hidden_size: int, kind: str | None = None, model=None
) -> tuple[nn.Module, dict]:
    """A fitted classifier; with `model`, refused unless it was fitted on that model."""
    p = Path(path)
    if not p.is_file():
        raise EexitError(
            f"no fitted exit classifier at {p}; fit one with: eexit calibrate --model <checkpoint> "
            f"--fit {p.stem}"
        )
    try:
        blob = torch.load(p, weights_only=False)
        clf = CLASSIFIERS.get(blob["kind"])(hidden_size)
        clf.load_state_dict(blob["state_dict"])
    except EexitError:
        raise
    except Exception as e:  # corrupt file, or fit on a model with another hidden size
        raise EexitError(
            f"cannot load exit classifier {p}: {str(e).splitlines()[0][:200]}"
        ) from None
    if kind is not None and blob["kind"] != kind:
        raise EexitError(f"{p} holds a {blob['kind']!r} classifier, not {kind!r}")
    if model is not None:
        check_identity(blob.get("model"), model, f"the {blob['kind']} classifier at {p}")
    return clf.eval(), blob


class LearnedPolicy(ExitPolicy):
    """Score = the classifier's probability that exiting here keeps the final prediction."""

    needs_logits = False
    needs_classifier = True
    kind = "?"

    def __init__(
        self,
        threshold: float = 0.9,
        min_exit_layer: int = 1,
        decay_tau: float = 0.0,
        classifier: str | None = None,
    ):
        super().__init__(threshold, min_exit_layer, decay_tau)
        self.classifier_path = classifier
        self.clf: nn.Module | None = None
        self.hidden_size = 0

    def bind(self, model, model_dir: str | Path | None) -> None:
        path = self.classifier_path or (
            Path(model_dir) / CLASSIFIER_DIR / f"{self.kind}.pt" if model_dir else None
        )
        if path is None:
            raise EexitError(
                f"policy {self.kind!r} needs a fitted classifier: --param classifier=PATH"
            )
        self.clf, _ = load_classifier(path, model.hidden_size, self.kind, model)
        self.clf.to(model.device)
        self.norm = model.parts.final_norm
        self.hidden_size = model.hidden_size

    def features(self, states) -> torch.Tensor:
        return torch.stack([self.norm(s) for s in states], dim=1).float()

    def score(self, view: ExitView) -> torch.Tensor:
        if self.clf is None:
            raise EexitError(
                f"policy {self.kind!r} has no classifier loaded (bind it to a model first)"
            )
        return torch.sigmoid(self.logit(view))

    def logit(self, view: ExitView) -> torch.Tensor:
        return step_logits(self.clf, self.features(view.states[1 : view.layer + 1]))[:, -1]

    def decision_macs(self, hidden_size, vocab_size):
        return self.clf.macs(hidden_size) + 2.0 * hidden_size if self.clf is not None else 0.0


@register_policy("meta")
class MetaPolicy(LearnedPolicy):
    """CALM: a linear classifier on the current hidden state (fit with `eexit calibrate --fit
    meta`)."""

    kind = "meta"

    def logit(self, view):
        return self.clf(self.features([view.hidden]))[:, -1]


@register_policy("lstm")
class LSTMPolicy(LearnedPolicy):
    """Seed 001: a two-layer LSTM over the token's hidden states so far (state carried across
    exits)."""

    kind = "lstm"
    stateful = True

    def logit(self, view):
        fed = view.state.get("lstm_fed", 0)
        new = self.features(view.states[fed + 1 : view.layer + 1])
        out, hc = self.clf(new, view.state.get("lstm_hc"))
        view.state["lstm_hc"], view.state["lstm_fed"] = hc, view.layer
        return out[:, -1]


@register_policy("mlp3")
class MLP3Policy(LearnedPolicy):
    """Seed 001: a two-layer MLP on the last three hidden states."""

    kind = "mlp3"

    def logit(self, view):
        lo = max(1, view.layer - 2)
        return self.clf(self.features(view.states[lo : view.layer + 1]))[:, -1]
