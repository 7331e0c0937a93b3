"""EN -> FR translation with a small early-exit T5: CALM's and the monotonic confidence measures,
BLEU / chrF against compute % and measured tokens/s.

    eexit train --config experiments/t5_translation/t5_en_fr.yaml
    python experiments/t5_translation/run.py          (both: make t5-translation)

1. Fit the learned exit classifiers (CALM's meta classifier; the monotonic LSTM and 3-state MLP) on
   the even validation pairs, teacher-forced (label: exit top-1 = final top-1).
2. Sweep: greedy early-exit decoding of the first N test verses at several thresholds per policy.
3. Calibrated: for each policy, the threshold Learn-then-Test picks on the odd validation pairs
   (token-level disagreement with the full model <= epsilon w.p. >= 1 - delta), then decode the test
   verses.
Every row decodes the same verses; "full" is full-depth decoding of the same model in the same run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project root: experiments.*

from eexit import quiet  # noqa: E402
from eexit.calibration.calibrate import CalibrateOptions, fit  # noqa: E402
from eexit.evaluation.context import EvalRequest, make_bound_policy, open_context  # noqa: E402
from eexit.evaluation.tasks import TaskOptions, decode_all, prepare, summarize  # noqa: E402
from eexit.models.decoding import EarlyExitDecoder  # noqa: E402
from eexit.reporting import plot_tradeoff, prepare_dir, provenance, write_results  # noqa: E402
from experiments.common import LTT_GRID as GRID  # noqa: E402
from experiments.common import calibrate_policy  # noqa: E402

GROUPS = {
    "margin": "CALM",
    "saturation": "CALM",
    "meta": "CALM",
    "heuristic": "monotonic",
    "lstm": "monotonic",
    "mlp3": "monotonic",
}
THRESHOLDS = {
    "margin": [0.1, 0.3, 0.5, 0.7, 0.9],
    "saturation": [0.9, 0.95, 0.99, 0.999],
    "meta": [0.3, 0.5, 0.7, 0.9],
    "heuristic": [0.1, 0.3, 0.5, 0.7],
    "lstm": [0.3, 0.5, 0.7, 0.9],
    "mlp3": [0.3, 0.5, 0.7, 0.9],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="checkpoints/t5-en-fr")
    ap.add_argument("--examples", type=int, default=200, help="test verses decoded per row")
    ap.add_argument("--kv", default="propagate")
    ap.add_argument("--epsilon", type=float, default=0.1)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--calibration-tokens", type=int, default=40000)
    ap.add_argument("--out", default="results/t5_translation")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args()
    quiet()
    prepare_dir(a.out, a.overwrite)
    val = dict(model=a.model, split="validation", max_tokens=a.calibration_tokens)
    val_ctx = open_context(EvalRequest(**val), bind=False)
    fit_rows = fit(val_ctx, ["meta", "lstm", "mlp3"], "consistent")

    o = TaskOptions(examples=a.examples, kv_mode=a.kv, batch_size=1)
    ctx = open_context(EvalRequest(model=a.model, split="test"), val_ctx.model, val_ctx.tokenizer)
    model, tok = ctx.model, ctx.tokenizer
    task, examples = prepare(ctx, o)
    L = model.num_layers

    def decode(pol):
        return decode_all(model, tok, task, examples, EarlyExitDecoder(model, pol, a.kv), o)

    decode_all(model, tok, task, examples[:2], EarlyExitDecoder(model, None, "full"), o)  # warm-up
    full = decode(None)
    full_row = {
        "group": "-",
        "policy": "full depth",
        "threshold": None,
        **summarize(task, examples, full, None, L, model.exit_layers),
        "speedup": 1.0,
        "agreement_pct": 100.0,
    }
    print(full_row, flush=True)
    sweep, calibrated = [full_row], [full_row]
    for policy, group in GROUPS.items():
        pol = make_bound_policy(EvalRequest(model=a.model, policy=policy), model, ctx.checkpoint)
        for t in THRESHOLDS[policy]:
            row = {
                "group": group,
                "policy": policy,
                "threshold": t,
                **summarize(task, examples, decode(pol.at(t)), full, L, model.exit_layers),
            }
            sweep.append(row)
            print(row, flush=True)
        opts = CalibrateOptions(
            epsilon=a.epsilon, delta=a.delta, risk="consistency", grid=GRID, test_split="validation"
        )
        summary = calibrate_policy(EvalRequest(policy=policy, **val), opts, model, tok)
        thr = summary["threshold"]
        row = {"group": group, "policy": policy, "threshold": thr}
        if thr is not None:
            row.update(summarize(task, examples, decode(pol.at(thr)), full, L, model.exit_layers))
            row["teacher_forced_risk"] = summary["calibration_risk"]
        calibrated.append(row)
        print("calibrated", row, flush=True)

    metric_cols = [
        "bleu",
        "chrf",
        "compute_pct",
        "cost_pct",
        "mean_exit_layer",
        "tokens_per_s",
        "speedup",
        "agreement_pct",
    ]
    cols = (
        ["group", "policy", "threshold"]
        + metric_cols
        + [f"exit@{l}_pct" for l in model.exit_layers]
    )
    sig = {k: v for k, v in task.score(full.texts, examples).items() if k.endswith("signature")}
    fit_md = "\n".join(
        f"- {r['classifier']}: held-out accuracy {r['heldout_accuracy']:.3f} (positives "
        f"{r['positive_share']:.2f})"
        for r in fit_rows
    )
    notes = (
        f"{len(examples)} test verses (bible-en-fr), greedy decoding at batch 1, KV of skipped "
        f"layers: {a.kv}. "
        f"BLEU signature `{sig['bleu_signature']}`; chrF `{sig['chrf_signature']}`.\n\n"
        "Compute% = decoder layers run per generated token / layers (first token always full "
        "depth); Cost% adds exit "
        "decisions and KV filling in layer-equivalents; Speedup = full-depth seconds per token / "
        "early-exit seconds per "
        "token, same run; Agreement = tokens equal to the full-depth output at the same "
        "position.\n\n"
        f"Classifiers (fit on even validation pairs, teacher-forced):\n{fit_md}\n\n"
    )
    prov = provenance(
        {
            "model": a.model,
            "examples": a.examples,
            "kv": a.kv,
            "thresholds": THRESHOLDS,
            "epsilon": a.epsilon,
            "delta": a.delta,
            "calibration_tokens": a.calibration_tokens,
        }
    )
    write_results(
        a.out,
        "sweep",
        f"EN->FR early-exit T5 ({Path(a.model).name}): BLEU vs compute",
        sweep,
        prov,
        cols,
        notes=notes,
    )
    cal_notes = (
        "Thresholds from Learn-then-Test on the odd validation pairs (teacher-forced): token "
        "disagreement with the full "
        f"model <= {a.epsilon} with probability >= {1 - a.delta:.2f} (binomial tail, "
        f"fixed-sequence over {len(GRID)} thresholds); "
        "teacher_forced_risk = the calibration risk at that threshold. Then free-running decoding "
        "of the test verses.\n\n" + notes
    )
    write_results(
        a.out,
        "calibrated",
        f"EN->FR early-exit T5: LTT-calibrated thresholds (epsilon {a.epsilon})",
        calibrated,
        prov,
        cols + ["teacher_forced_risk"],
        notes=cal_notes,
    )
    series = {}
    for r in sweep[1:]:
        series.setdefault(f"{r['policy']} ({r['group']})", []).append(
            (r["compute_pct"], r["bleu"], r["threshold"])
        )
    plot_tradeoff(
        Path(a.out) / "sweep.png",
        series,
        "compute % (decoder layers per generated token)",
        "BLEU",
        "EN->FR T5: BLEU vs compute",
        {"full depth": (100.0, full_row["bleu"])},
    )


if __name__ == "__main__":
    main()
