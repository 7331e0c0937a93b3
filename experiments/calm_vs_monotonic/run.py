"""Seed 001's comparison: CALM's three confidence measures against the three monotonic ones,
all with min exit layer 4, each at the threshold Learn-then-Test picks for the same epsilon, delta.

    eexit train --config experiments/monotonicity/weighted_ce_8l.yaml
    python experiments/calm_vs_monotonic/run.py            (both: make calm-vs-monotonic)

Calibration data: the validation split; its even windows fit the learned classifiers (meta,
LSTM, 3-state MLP), its odd windows calibrate every threshold. Reported on the test split.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project root: experiments.*

from eexit import quiet  # noqa: E402
from eexit.calibration.calibrate import CalibrateOptions, fit  # noqa: E402
from eexit.evaluation.context import EvalRequest, open_context  # noqa: E402
from eexit.reporting import plot_tradeoff, prepare_dir, provenance, write_results  # noqa: E402
from experiments.common import LTT_GRID as GRID  # noqa: E402
from experiments.common import calibrate_policy  # noqa: E402

GROUPS = {
    "margin": "CALM",
    "saturation": "CALM",
    "meta": "CALM",
    "lstm": "monotonic",
    "mlp3": "monotonic",
    "heuristic": "monotonic",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="checkpoints/mono-weighted_ce-8l")
    ap.add_argument("--epsilon", type=float, default=0.05)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--min-exit-layer", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--out", default="results/calm_vs_monotonic")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args()
    quiet()
    prepare_dir(a.out, a.overwrite)
    base = dict(
        model=a.model, min_exit_layer=a.min_exit_layer, split="validation", max_tokens=a.max_tokens
    )
    ctx = open_context(EvalRequest(**base), bind=False)
    fit_rows = fit(ctx, ["meta", "lstm", "mlp3"], "consistent")
    rows = []
    opts = CalibrateOptions(
        epsilon=a.epsilon, delta=a.delta, risk="consistency", grid=GRID, test_split="test"
    )
    for policy, group in GROUPS.items():
        summary = calibrate_policy(
            EvalRequest(policy=policy, **base), opts, ctx.model, ctx.tokenizer
        )
        row = {"group": group, "policy": policy, "threshold": summary["threshold"]}
        if summary["threshold"] is None:
            row["note"] = summary["message"]
        else:
            row.update(
                {
                    k: summary[f"test_{k}"]
                    for k in (
                        "compute_pct",
                        "overhead_pct",
                        "cost_pct",
                        "ppl",
                        "full_ppl",
                        "agreement_pct",
                    )
                }
            )
            row["test_risk"] = summary["test_risk"]
            row["calibration_risk"] = summary["calibration_risk"]
        rows.append(row)
        print(row, flush=True)
    cols = [
        "group",
        "policy",
        "threshold",
        "compute_pct",
        "overhead_pct",
        "cost_pct",
        "ppl",
        "full_ppl",
        "agreement_pct",
        "test_risk",
        "calibration_risk",
    ]
    heads = {
        "compute_pct": "Compute%",
        "overhead_pct": "Decision overhead%",
        "cost_pct": "Cost%",
        "ppl": "PPL",
        "full_ppl": "Full PPL",
        "agreement_pct": "Top-1 = full%",
        "test_risk": "Test risk",
        "calibration_risk": "Calibration risk",
    }
    fit_md = "\n".join(
        f"- {r['classifier']}: held-out accuracy {r['heldout_accuracy']:.3f} (positives "
        f"{r['positive_share']:.2f}), {r['epochs']} epochs"
        for r in fit_rows
    )
    notes = (
        "Learn-then-Test, risk = token-level disagreement with the full model's top-1, epsilon = "
        f"{a.epsilon}, delta = {a.delta} "
        f"(binomial tail, fixed-sequence test over {len(GRID)} thresholds), min exit layer "
        f"{a.min_exit_layer}; "
        "calibrated on odd validation windows, reported on the test split. Decision overhead: "
        "LM-head matmuls or classifier "
        "cost per decision, in layer-equivalents.\n\nClassifiers (fit on even validation "
        f"windows):\n{fit_md}\n\n"
    )
    write_results(
        a.out,
        "comparison",
        f"CALM vs monotonic confidence measures ({Path(a.model).name})",
        rows,
        provenance(
            {
                "model": a.model,
                "epsilon": a.epsilon,
                "delta": a.delta,
                "min_exit_layer": a.min_exit_layer,
                "grid": [GRID[0], GRID[-1], len(GRID)],
            }
        ),
        cols,
        heads,
        notes,
        overwrite=True,
    )
    done = [r for r in rows if r["threshold"] is not None]
    plot_tradeoff(
        Path(a.out) / "comparison.png",
        {r["policy"]: [(r["cost_pct"], r["ppl"], None)] for r in done},
        "compute % incl. decision overhead",
        "test perplexity",
        f"Calibrated at epsilon={a.epsilon}, delta={a.delta}",
    )


if __name__ == "__main__":
    main()
