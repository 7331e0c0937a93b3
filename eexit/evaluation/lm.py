"""Language-modelling evaluation (`eexit evaluate` / `eexit sweep` on text): collect the exit
table once (teacher-forced, every exit's loss, top-1 and policy score), then one row per
threshold, then the tables and the compute / perplexity plot."""

from __future__ import annotations

from pathlib import Path

from eexit.evaluation.context import EvalContext, lm_windows
from eexit.evaluation.costs import table_costs
from eexit.evaluation.frontier import frontier_rows
from eexit.evaluation.records import ExitTable, collect_exit_table, exit_metrics, per_exit_ppl
from eexit.reporting import log, plot_tradeoff, provenance, write_results
from eexit.runtime import now

HEADROOM = [
    "oracle_compute_pct",
    "efficiency",
    "oracle_hit_pct",
    "oracle_distance",
    "ideal_speedup",
]


def table_columns(exit_layers: list[int]) -> tuple[list[str], dict[str, str]]:
    shares = [f"exit@{layer}_pct" for layer in exit_layers]
    cols = ["threshold", "ppl", "compute_pct", "overhead_pct", "agreement_pct"] + HEADROOM
    cols += ["predicted_speedup"] + shares
    headers = {
        "threshold": "Threshold",
        "ppl": "PPL",
        "compute_pct": "Compute%",
        "overhead_pct": "Decision overhead%",
        "agreement_pct": "Top-1 agreement%",
        "oracle_compute_pct": "Oracle compute% (same agreement)",
        "efficiency": "Efficiency",
        "oracle_hit_pct": "At oracle exit%",
        "oracle_distance": "Distance to oracle (layers)",
        "ideal_speedup": "Ideal speedup",
        "predicted_speedup": "Predicted speedup (measured costs)",
        **{f"exit@{layer}_pct": f"Exit@{layer}%" for layer in exit_layers},
    }
    return cols, headers


def flat_sweep_note(table: ExitTable, policy, rows: list[dict]) -> str:
    """One line when every threshold of a sweep took the same exits (the thresholds lie outside
    the policy's scores on this data), with the range its scores do span; "" otherwise."""
    if len(rows) < 2 or policy.threshold_free:
        return ""
    if len({round(r["compute_pct"], 9) for r in rows}) > 1:
        return ""
    L = table.num_layers
    decided = [k for k, layer in enumerate(table.exit_layers) if policy.min_exit_layer <= layer < L]
    if not decided:
        return ""
    scores = table.score[decided].flatten().float().sort().values  # (quantile caps its input)
    lo, hi = (float(scores[int(q * (len(scores) - 1))]) for q in (0.1, 0.9))
    step = max((hi - lo) / 10, 1e-4)
    return (
        f"Every threshold of this sweep took the same exits (compute {rows[0]['compute_pct']:.1f} "
        f"%): {policy.registered_name}'s scores here lie mostly in [{lo:.3g}, {hi:.3g}] (10th to "
        f"90th percentile where it decides); try --thresholds {lo:.3g}:{hi:.3g}:{step:.2g}.\n\n"
    )


def per_exit_notes(table: ExitTable) -> str:
    ppl = per_exit_ppl(table)
    rows = " | ".join(f"layer {layer}: {p:.2f}" for layer, p in ppl.items())
    return (
        f"Static exits (every token at one layer), PPL — {rows}. "
        f"Full-model PPL: {ppl[table.num_layers]:.2f}. Tokens: {table.tokens}.\n\n"
    )


def write_frontier(out, table: ExitTable, policy: str, rows, min_exit_layer: int, resolved):
    """The oracle frontier beside the sweep: its table (agreements 100 / 99 / 98 / 95 %) and the
    compute / cost vs agreement plot with the frontier drawn."""
    title = f"Oracle frontier ({table.tokens} tokens, head = {table.head_cost:.1f} layers)"
    notes = (
        "The cheapest exits at each agreement with the full model: the oracle exit (earliest exit "
        "whose top-1 equals the final one and never changes after), with (1 - agreement) of the "
        "tokens, those with the deepest oracle exits, sent to the first allowed exit. Ideal "
        "speedup = (layers + head) / (mean exit + head), decisions free. Predicted speedup: the "
        "decoding cost model measured on this device (eexit/evaluation/costs.py: blocks, head, "
        "KV fill of skipped layers, per-token overhead; batch 1) for these exits, decisions "
        "free: what early exit can gain here in wall-clock at this agreement.\n\n"
    )
    frontier = frontier_rows(table, min_exit_layer)
    write_results(out, "frontier", title, frontier, provenance(resolved), notes=notes)
    grid = [100.0 - 0.5 * i for i in range(41)]  # 100 % down to 80 %
    curve = frontier_rows(table, min_exit_layer, grid)
    series = {
        f"{policy} (compute)": [
            (x["compute_pct"], x["agreement_pct"], x["threshold"]) for x in rows
        ],
        f"{policy} (cost)": [(x["cost_pct"], x["agreement_pct"], None) for x in rows],
        "oracle frontier": [(x["compute_pct"], x["agreement_pct"], None) for x in curve],
    }
    plot_tradeoff(
        Path(out) / "frontier.png",
        series,
        "compute % (cost %: decisions counted)",
        "top-1 agreement with the full model (%)",
        f"{policy} against the oracle frontier",
    )


def run_lm(ctx: EvalContext, out: str | None, sweep: bool) -> list[dict]:
    """One row per threshold of the request; written to `out` as a sweep (with plot) or as a
    single evaluation."""
    r = ctx.request
    x, y, resolved = lm_windows(ctx)
    t0 = now(ctx.model.device)
    table = collect_exit_table(ctx.model, x, y, ctx.policy, r.batch_size, ctx.runtime)
    seconds = now(ctx.model.device) - t0
    # the measured decoding costs on this device (batch 1, half a window of context), for the
    # predicted_speedup columns
    table.costs = table_costs(ctx.model, ctx.policy, max(1, x.shape[-1] // 2))
    rows = [{**exit_metrics(table, ctx.policy.at(t)), **ctx.identity()} for t in r.thresholds]
    flat = flat_sweep_note(table, ctx.policy, rows) if sweep else ""
    if flat and ctx.runtime.is_main:
        log(flat.strip())
    if not sweep:
        rows[0]["eval_tokens_per_s"] = table.tokens / seconds
    if not out:
        return rows
    cols, headers = table_columns(table.exit_layers)
    where = f"{ctx.dataset}/{r.split}"
    if sweep:
        title = f"Threshold sweep: {r.policy} on {where} ({Path(r.model).name})"
        write_results(
            out,
            "sweep",
            title,
            rows,
            provenance(resolved),
            cols,
            headers,
            flat + per_exit_notes(table),
        )
        L = table.num_layers
        statics = {
            f"exit at layer {layer}": (100.0 * layer / L, p)
            for layer, p in per_exit_ppl(table).items()
        }
        points = [(row["compute_pct"], row["ppl"], row["threshold"]) for row in rows]
        plot_tradeoff(
            Path(out) / "sweep.png",
            {r.policy: points},
            "compute % (layers used / layers)",
            "perplexity",
            title,
            statics,
        )
        write_frontier(out, table, r.policy, rows, ctx.policy.min_exit_layer, resolved)
    else:
        title = f"Early-exit evaluation: {r.policy} on {where}"
        write_results(
            out,
            "evaluate",
            title,
            rows,
            provenance(resolved),
            cols + ["full_ppl"],
            headers | {"full_ppl": "Full PPL"},
            per_exit_notes(table),
        )
    return rows
