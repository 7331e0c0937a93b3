"""`eexit calibrate`: fit learned exit classifiers, and choose thresholds with a statistical
guarantee by Learn-then-Test (CALM, Schuster et al. 2022).

Data: the calibration split (default `validation`) is cut into windows; with `--fit` the even
windows train the classifiers and the odd windows calibrate the threshold, so the two never
share tokens. The guarantee is checked on a separate split (default `test`).

Risks per token at a threshold (both in [0, 1]):
- `consistency` (CALM's textual consistency): 1 if the early-exit top-1 differs from the full model's;
  tested with binomial-tail p-values.
- `loss` (risk consistency): the relative drop of the probability of the correct next token,
  max(0, 1 - p_exit(y) / p_full(y)); tested with Hoeffding-Bentkus p-values.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from eexit.errors import EexitError
from eexit.evaluation.records import ExitTable, collect_exit_table, exit_indices, exit_metrics
from eexit.policies.learned import LABELS, exit_labels, fit_classifier, save_classifier
from eexit.evaluation.lm import EvalSetup, setup
from eexit.calibration.ltt import fixed_sequence_test, no_threshold_message
from eexit.reporting import markdown_table, provenance, write_results

RISKS = {"consistency": "binomial", "loss": "hoeffding-bentkus"}
CALIBRATED_FILE = "calibrated.json"


@dataclass
class CalibrateOptions:
    epsilon: float = 0.05  # tolerated risk
    delta: float = 0.1  # 1 - confidence
    risk: str = "consistency"  # consistency | loss
    grid: list[float] | None = None  # thresholds to test (default 1.00, 0.99, ..., 0.00)
    test_split: str = "test"


def token_risks(table: ExitTable, policy, thresholds: list[float], risk: str) -> torch.Tensor:
    """[n_thresholds, N] per-token risk of exiting with each threshold."""
    cols = torch.arange(table.tokens)
    rows = []
    for t in thresholds:
        idx = exit_indices(table, policy, t)
        if risk == "consistency":
            rows.append((table.top1[idx, cols] != table.top1[-1]).float())
        else:
            rows.append((1 - torch.exp(table.nll[-1] - table.nll[idx, cols])).clamp(0.0, 1.0))
    return torch.stack(rows)


@torch.no_grad()
def layer_features(model, x: torch.Tensor, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Normed hidden state of every layer [N, L, d] and top-1 per layer [L, N]."""
    from eexit.evaluation.records import forward_batches

    feats, tops = [], []
    norm = model.parts.final_norm
    for states, _, _ in forward_batches(model, x, None, batch_size, with_inputs=False):
        feats.append(torch.stack([norm(s) for s in states], 1).float().cpu())
        tops.append(torch.stack([model.exit_logits(s, l + 1).argmax(-1) for l, s in enumerate(states)]).cpu())
    return torch.cat(feats), torch.cat(tops, 1)


def fit(model_spec: str, names: list[str], label: str, s: EvalSetup) -> list[dict]:
    if label not in LABELS:
        raise EexitError(f"unknown label {label!r}; valid: {', '.join(LABELS)}")
    model_dir = Path(model_spec)
    if not model_dir.is_dir():
        raise EexitError(f"--fit saves classifiers beside the checkpoint, so --model must be a local folder; got {model_spec}")
    model, _, x, _, resolved = setup(s, bind=False)
    feats, top1 = layer_features(model, x[0::2], s.batch_size)
    labels = exit_labels(top1, label)
    rows = []
    for name in names:
        clf, metrics = fit_classifier(name, feats, labels, model.exit_layers)
        path = save_classifier(model_dir, name, clf, {"label": label, "hidden_size": model.hidden_size,
                                                       "exit_layers": model.exit_layers, "metrics": metrics, "data": resolved})
        rows.append({"classifier": name, "label": label, **metrics, "saved": str(path)})
    return rows


def check_options(opts: CalibrateOptions, policy: str) -> None:
    """Validate before any work (the CLI calls it before fitting classifiers)."""
    from eexit.policies.base import POLICIES

    if POLICIES.get(policy).threshold_free:
        raise EexitError(f"policy {policy!r} has no threshold to calibrate")
    if opts.risk not in RISKS:
        raise EexitError(f"unknown risk {opts.risk!r}; valid: {', '.join(RISKS)}")
    if not 0 < opts.epsilon < 1 or not 0 < opts.delta < 1:
        raise EexitError(f"epsilon and delta must lie in (0, 1); got {opts.epsilon}, {opts.delta}")


def calibrate(s: EvalSetup, opts: CalibrateOptions, calibration_windows: slice = slice(None)) -> tuple[dict, list[dict]]:
    check_options(opts, s.policy)
    grid = sorted(opts.grid or [round(1 - i / 100, 2) for i in range(101)], reverse=True)
    model, policy, x, y, resolved = setup(s)
    cal = collect_exit_table(model, x[calibration_windows], None if y is None else y[calibration_windows], policy, s.batch_size)
    result = fixed_sequence_test(grid, token_risks(cal, policy, grid, opts.risk).numpy(), opts.epsilon, opts.delta, RISKS[opts.risk])
    test_setup = EvalSetup(**{**s.__dict__, "split": opts.test_split})
    _, _, xt, yt, _ = setup(test_setup, model=model)
    test = collect_exit_table(model, xt, yt, policy, s.batch_size)
    summary = {"policy": s.policy, "policy_params": s.policy_params or {}, "min_exit_layer": s.min_exit_layer,
               "risk": opts.risk, "method": RISKS[opts.risk], "epsilon": opts.epsilon, "delta": opts.delta,
               "calibration_tokens": cal.tokens, "test_tokens": test.tokens, "threshold": result.threshold}
    if result.threshold is None:
        summary["message"] = no_threshold_message(result)
    else:
        thr = result.threshold
        summary["calibration_risk"] = float(token_risks(cal, policy, [thr], opts.risk).mean())
        summary["test_risk"] = float(token_risks(test, policy, [thr], opts.risk).mean())
        summary.update({f"test_{k}": v for k, v in exit_metrics(test, policy, thr).items() if k != "threshold"})
    tested = [{"threshold": t, "risk": r, "p_value": p, "rejected": rej} for t, r, p, rej in result.tested]
    return {**summary, "resolved": resolved}, tested


def write_calibration(out: str, summary: dict, tested: list[dict], fit_rows: list[dict]) -> None:
    resolved = summary.pop("resolved", {})
    prov = provenance({**resolved, **{k: summary[k] for k in ("risk", "epsilon", "delta")}})
    notes = ""
    if fit_rows:
        notes += "## Fitted exit classifiers\n\n" + markdown_table(fit_rows) + "\n\n"
    notes += "## Fixed-sequence test (most conservative threshold first)\n\n" + markdown_table(tested) + "\n\n"
    write_results(out, "calibration", f"Learn-then-Test calibration: {summary['policy']}, risk {summary['risk']} <= "
                  f"{summary['epsilon']} with probability >= {1 - summary['delta']:.2f}", [summary], prov, notes=notes)
    if summary["threshold"] is not None:
        keep = {k: summary[k] for k in ("policy", "policy_params", "min_exit_layer", "threshold", "risk", "epsilon", "delta")}
        keep.update({k: resolved.get(k) for k in ("model", "exit_layers", "seq_len", "dataset")})
        (Path(out) / CALIBRATED_FILE).write_text(json.dumps(keep, indent=2))


def read_calibrated(folder: str) -> dict:
    p = Path(folder) / CALIBRATED_FILE
    if not p.is_file():
        raise EexitError(f"{folder} holds no {CALIBRATED_FILE} (make one with eexit calibrate ... --out {folder})")
    return json.loads(p.read_text())
