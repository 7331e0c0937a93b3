"""Every exit policy against the oracle frontier of one model (issue: decisions that reach the
model's headroom).

    python experiments/policy_frontier/run.py --model checkpoints/smollm2-135m \\
        --exit-layers 8,12,16,20,22,24,26,28,30 --out results/policy_frontier/smollm2-135m

Each policy's threshold is chosen by Learn-then-Test (and, with `--free`, by FREE's Beta
mixture) at the same epsilon / delta on the odd windows of the validation split (the even
windows fit the learned classifiers), and reported on the test split beside the oracle: compute
%, decision overhead %, agreement, efficiency (layers saved / layers the frontier saves at the
same agreement), exit-location accuracy (hits and distance to the oracle exit, seed 004), ideal
speedup with the head counted. With `--decode-prompts N` each calibrated policy also decodes N
prompts at batch 1 against full-depth decoding of the same model: the realized speedup and
realized / ideal.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project root: experiments.*

from eexit import quiet  # noqa: E402
from eexit.calibration.calibrate import CalibrateOptions, fit  # noqa: E402
from eexit.errors import EexitError  # noqa: E402
from eexit.evaluation.context import EvalRequest, open_context, teacher_forced_inputs  # noqa: E402
from eexit.evaluation.frontier import frontier_rows  # noqa: E402
from eexit.evaluation.generation import GenerationOptions, compare, prompts_from  # noqa: E402
from eexit.evaluation.records import collect_exit_table  # noqa: E402
from eexit.files import output_folder  # noqa: E402
from eexit.models.decoding import EarlyExitDecoder  # noqa: E402
from eexit.policies import POLICIES  # noqa: E402
from eexit.reporting import plot_tradeoff, prepare_dir, provenance, write_results  # noqa: E402
from experiments.common import LTT_GRID as GRID  # noqa: E402
from experiments.common import calibrate_policy  # noqa: E402

CHEAP = ["max-prob", "margin", "entropy", "saturation"]
LEARNED = ["meta", "mlp3", "lstm"]
KEEP = (
    "compute_pct",
    "overhead_pct",
    "cost_pct",
    "agreement_pct",
    "ppl",
    "oracle_compute_pct",
    "efficiency",
    "oracle_hit_pct",
    "oracle_distance",
    "ideal_speedup",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="checkpoints/smollm2-135m")
    ap.add_argument("--exit-layers", default=None, help="e.g. 8,12,...,30 (default: all)")
    ap.add_argument("--dataset", default="wiki-gensim")
    ap.add_argument("--policies", default=",".join(CHEAP + LEARNED))
    ap.add_argument("--param", action="append", default=[], help="POLICY:key=value")
    ap.add_argument("--label", default="stable", help="classifier label: stable or consistent")
    ap.add_argument("--epsilon", type=float, default=0.02)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--min-exit-layer", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--free", action="store_true", help="also FREE's Beta-mixture threshold")
    ap.add_argument("--decode-prompts", type=int, default=0)
    ap.add_argument("--decode-tokens", type=int, default=24)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", default="results/policy_frontier")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args()
    quiet()
    names = [p.strip() for p in a.policies.split(",") if p.strip()]
    for name in names:
        POLICIES.get(name)  # unknown names: one line with "did you mean", before any work
    params: dict[str, dict] = {}
    for item in a.param:
        policy, _, kv = item.partition(":")
        key, eq, value = kv.partition("=")
        if not (policy and key and eq):
            raise EexitError(f"--param {item!r}: give POLICY:key=value, e.g. predictor:shortlist=8")
        params.setdefault(policy, {})[key] = int(value) if value.isdigit() else value
    prepare_dir(a.out, a.overwrite)
    base = dict(
        model=a.model,
        dataset=a.dataset,
        min_exit_layer=a.min_exit_layer,
        split="validation",
        seq_len=a.seq_len,
        max_tokens=a.max_tokens,
        batch_size=a.batch_size,
        exit_layers=a.exit_layers,
        device=a.device,
        dtype=a.dtype,
    )
    ctx = open_context(EvalRequest(**base), bind=False)
    model, tok = ctx.model, ctx.tokenizer
    learned = [n for n in names if POLICIES.get(n).needs_classifier]
    fit_rows = fit(ctx, learned, a.label) if learned else []
    opts = CalibrateOptions(epsilon=a.epsilon, delta=a.delta, grid=GRID, test_split="test")

    # the oracle on the test split: any policy's table has the same top-1s
    xt, yt, _ = teacher_forced_inputs(ctx, "test")
    test_table = collect_exit_table(model, xt, yt, ctx.policy, a.batch_size, ctx.runtime)
    oracle = frontier_rows(test_table, a.min_exit_layer)
    rows = [{"policy": "oracle", "threshold_by": "-", "threshold": None, **_oracle_row(oracle[0])}]
    prompts = (
        prompts_from(tok, a.dataset, "test", a.decode_prompts, 32) if a.decode_prompts else None
    )
    for name in names:
        request = EvalRequest(**{**base, "policy": name, "policy_params": params.get(name, {})})
        summary = calibrate_policy(request, opts, model, tok)
        # LTT's threshold, then FREE's (Beta mixture) from the same calibration tables
        for found in summary["compared"] if a.free else summary["compared"][:1]:
            by = found.get("threshold_by", "ltt")
            row = {"policy": name, "threshold_by": by, "threshold": found["threshold"]}
            if found["threshold"] is None:
                row["note"] = found.get("message", "no threshold")
            else:
                row.update({k: found[f"test_{k}"] for k in KEEP})
                row["test_risk"] = found["test_risk"]
                if prompts is not None:
                    row.update(_decode(model, request, found["threshold"], prompts, a, tok))
            rows.append(row)
            print(row, flush=True)
    _write(a, rows, oracle, fit_rows, ctx)


def _oracle_row(f: dict) -> dict:
    return {
        "compute_pct": f["compute_pct"],
        "overhead_pct": 0.0,
        "cost_pct": f["compute_pct"],
        "agreement_pct": 100.0,
        "oracle_compute_pct": f["compute_pct"],
        "efficiency": 1.0,
        "oracle_hit_pct": 100.0,
        "oracle_distance": 0.0,
        "ideal_speedup": f["ideal_speedup"],
    }


def _decode(model, request: EvalRequest, threshold: float, prompts, a, tok) -> dict:
    """Free-running decoding at batch 1 at the calibrated threshold vs full depth."""
    from eexit.policies import make_policy

    policy = make_policy(
        request.policy, threshold, request.min_exit_layer, **(request.policy_params or {})
    )
    policy.bind(model, Path(a.model) if Path(a.model).is_dir() else None)
    g = GenerationOptions(
        prompts=len(prompts), prompt_len=prompts.shape[1], max_new_tokens=a.decode_tokens
    )
    decoder = EarlyExitDecoder(model, policy, "propagate")
    reference = EarlyExitDecoder(model, None, "full")
    _, total = compare(model, decoder, reference, prompts, g, None, tok.pad_token_id)
    return {
        "decode_speedup": total["speedup"],
        "decode_compute_pct": total["compute_pct"],
        "decode_agreement_pct": total["agreement_pct"],
        "realized_over_ideal": total["realized_over_ideal"],
    }


def _write(a, rows: list[dict], oracle: list[dict], fit_rows: list[dict], ctx) -> None:
    cols = ["policy", "threshold_by", "threshold", *KEEP, "test_risk"]
    if a.decode_prompts:
        cols += ["decode_speedup", "decode_agreement_pct", "realized_over_ideal"]
    heads = {
        "compute_pct": "Compute%",
        "overhead_pct": "Decision overhead%",
        "cost_pct": "Cost%",
        "agreement_pct": "Top-1 = full%",
        "ppl": "PPL",
        "oracle_compute_pct": "Oracle compute% (same agreement)",
        "efficiency": "Efficiency",
        "oracle_hit_pct": "At oracle exit%",
        "oracle_distance": "Distance to oracle",
        "ideal_speedup": "Ideal speedup",
        "test_risk": "Test risk",
        "decode_speedup": "Decoding speedup (batch 1)",
        "decode_agreement_pct": "Decoding agreement%",
        "realized_over_ideal": "Realized / ideal",
    }
    fit_md = "\n".join(
        f"- {r['classifier']}: held-out accuracy {r['heldout_accuracy']:.3f} (positives "
        f"{r['positive_share']:.2f})"
        for r in fit_rows
    )
    notes = (
        f"LTT at epsilon {a.epsilon}, delta {a.delta} (token disagreement with the full model's "
        f"top-1), min exit layer {a.min_exit_layer}; calibrated on odd validation windows, "
        "reported on the test split. Efficiency = layers saved / layers the oracle frontier "
        "saves at the same agreement. The oracle row: the frontier at 100 % agreement, "
        "decisions free.\n\n"
        f"Classifiers (label {a.label}, fit on even validation windows):\n{fit_md}\n\n"
    )
    config = {**vars(a), "runtime": ctx.runtime.describe(), "exit_layers": ctx.model.exit_layers}
    prov = provenance(config)
    title = f"Policies against the oracle frontier ({Path(a.model).name})"
    done = [r for r in rows if r.get("threshold") is not None]
    series = {
        f"{r['policy']} ({r['threshold_by']})": [(r["cost_pct"], r["agreement_pct"], None)]
        for r in done
    }
    series["oracle frontier"] = [(f["compute_pct"], f["agreement_pct"], None) for f in oracle]
    # staged and swapped in whole: a run that dies leaves the previous folder as it was
    with output_folder(a.out, a.overwrite) as folder:
        write_results(folder, "policies", title, rows, prov, cols, heads, notes)
        write_results(folder, "frontier", "Oracle frontier (test split)", oracle, prov)
        plot_tradeoff(
            folder / "policies.png",
            series,
            "cost % (layers + decisions)",
            "top-1 agreement with the full model (%)",
            f"LTT at epsilon={a.epsilon}: policies vs the oracle frontier",
        )


if __name__ == "__main__":
    try:
        main()
    except EexitError as e:  # bad input: one line, exit code 2 (as the eexit commands)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
