"""`eexit calibrate`: fit learned exit classifiers, and choose thresholds with a statistical
guarantee by Learn-then-Test (CALM, Schuster et al. 2022).

Data: the calibration split (default `validation`) is cut into windows; with `--fit` the even
windows train the classifiers and the odd windows calibrate the threshold, so the two never
share tokens. The guarantee is checked on a separate split (default `test`).

Risks per token at a threshold (both in [0, 1]):
- `consistency` (CALM's textual consistency): 1 if the early-exit top-1 differs from the full
model's;
  tested with binomial-tail p-values.
- `loss` (risk consistency): the relative drop of the probability of the correct next token,
  max(0, 1 - p_exit(y) / p_full(y)); tested with Hoeffding-Bentkus p-values.
- `sequence-mismatch` / `sequence-rouge`: one unit is a prompt decoded free-running with early
  exit against full-depth decoding (`calibration/sequence.py`).

`--method free` takes FREE's Beta-mixture threshold (`calibration/beta_mixture.py`) instead of
LTT's; the table shows both thresholds on the same test split either way.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from eexit.calibration.beta_mixture import (
    DEFAULT_GRID,
    DEFAULT_ZETA,
    check_free_options,
    fit_beta_mixture,
    free_threshold,
)
from eexit.calibration.ltt import fixed_sequence_test, no_threshold_message
from eexit.calibration.sequence import SEQUENCE_RISKS, SequenceOptions, calibrate_sequences
from eexit.errors import EexitError
from eexit.evaluation.context import EvalContext, EvalRequest, open_context, teacher_forced_inputs
from eexit.evaluation.costs import table_costs
from eexit.evaluation.entry import CALIBRATED_FILE
from eexit.evaluation.records import (
    ExitTable,
    collect_exit_table,
    exit_indices,
    exit_metrics,
    shard_forward_batches,
)
from eexit.files import FolderLock, atomic_json, check_output_path, output_folder
from eexit.models.identity import model_identity
from eexit.names import TOKEN_RISKS
from eexit.policies import POLICIES
from eexit.policies.learned import (
    CLASSIFIER_DIR,
    CLASSIFIERS,
    LABELS,
    exit_labels,
    fit_classifier,
    save_classifier,
)
from eexit.policies.predictor import (
    DEFAULT_LABEL,
    PREDICTOR,
    fit_from_data,
    fit_shortlist,
    predictor_data,
)
from eexit.reporting import markdown_table, portable, provenance, write_results
from eexit.runtime import LOCAL, Runtime, logits_chunk_tokens

RISKS = {  # each risk's p-value (the names: eexit/names.py, readable without torch)
    **dict(zip(TOKEN_RISKS, ("binomial", "hoeffding-bentkus"))),
    **dict.fromkeys(SEQUENCE_RISKS, "hoeffding-bentkus"),
}
THRESHOLD_METHODS = ("ltt", "free")  # Learn-then-Test, or FREE's Beta-mixture threshold
FREE_FITS = ("labels", "em")  # the labels as responsibilities, or EM started from them


@dataclass(kw_only=True)
class CalibrateOptions:
    epsilon: float = 0.05  # tolerated risk
    delta: float = 0.1  # 1 - confidence
    risk: str = "consistency"  # consistency | loss
    grid: list[float] | None = None  # thresholds to test (default 1.00, 0.99, ..., 0.00)
    test_split: str = "test"
    method: str = "ltt"  # the threshold kept: ltt | free (both are reported)
    zeta: float = DEFAULT_ZETA  # FREE: posterior of the high-mean component to exceed
    free_grid: list[float] | None = None  # FREE: candidate thresholds (default 10 on [0.3, 0.9])
    free_fit: str = "labels"  # FREE: labels (responsibilities = labels) | em (EM from them)
    # sequence-* risks: prompts, lengths, KV mode, repeated splits
    sequence: SequenceOptions = field(default_factory=SequenceOptions)


def token_risks(table: ExitTable, policy, thresholds: list[float], risk: str) -> torch.Tensor:
    """[n_thresholds, N] per-token risk of exiting with each threshold (the policy's own rule)."""
    cols = torch.arange(table.tokens)
    rows = []
    for t in thresholds:
        idx = exit_indices(table, policy.at(t))
        if risk == "consistency":
            rows.append((table.top1[idx, cols] != table.top1[-1]).float())
        else:
            rows.append((1 - torch.exp(table.nll[-1] - table.nll[idx, cols])).clamp(0.0, 1.0))
    return torch.stack(rows)


@torch.no_grad()
def layer_features(
    model, x, batch_size: int = 8, runtime: Runtime | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normed hidden state of every layer [N, L, d] (float32) and top-1 per layer [L, N]. Several
    processes: each runs a contiguous block of the batches; every process gets all rows, in order.
    """
    runtime = runtime or LOCAL
    chunk = logits_chunk_tokens(model.vocab_size, model.device)
    norm = model.parts.final_norm
    parts = []
    batches = shard_forward_batches(model, x, None, batch_size, runtime, "layer features", False)
    for states, _, _ in batches:
        feats = torch.stack([norm(s) for s in states], 1).float().cpu()
        top = [
            torch.cat(
                [
                    model.exit_logits(s[a : a + chunk], i + 1).argmax(-1)
                    for a in range(0, len(s), chunk)
                ]
            )
            for i, s in enumerate(states)
        ]
        parts.append((feats, torch.stack(top).cpu()))
    parts = runtime.gather(parts)
    return torch.cat([f for f, _ in parts]), torch.cat([t for _, t in parts], 1)


def fit(ctx: EvalContext, names: list[str], label: str | None) -> list[dict]:
    """Fit the named exit classifiers on the even windows of the request's split; save each
    beside the checkpoint (`exit_classifiers/NAME.pt`). `label` None: `stable` for the
    predictor, `consistent` for the others."""
    if label is not None and label not in LABELS:
        raise EexitError(f"unknown label {label!r}; valid: {', '.join(LABELS)}")
    folder = ctx.checkpoint.folder
    if folder is None:
        raise EexitError(
            "--fit saves classifiers beside the checkpoint, so --model must be a local folder; "
            f"got {ctx.request.model}"
        )
    model = ctx.model
    k = fit_shortlist(ctx.request, model.vocab_size) if PREDICTOR in names else 0
    x, _, resolved = teacher_forced_inputs(ctx)
    bs = ctx.request.batch_size
    if set(names) - {PREDICTOR}:
        feats, top1 = layer_features(model, x[0::2], bs, ctx.runtime)
        labels = exit_labels(top1, label or "consistent")
    if k:  # the SpecEE-style predictor learns from its own shortlist features
        first = ctx.request.min_exit_layer  # its candidates come from the first scored exit
        data = predictor_data(model, x[0::2], k, bs, ctx.runtime, first)
    rows = []
    identity = model_identity(model) if ctx.runtime.is_main and names else None
    for name in names if ctx.runtime.is_main else []:  # the main process fits and saves
        lab = label or (DEFAULT_LABEL if name == PREDICTOR else "consistent")
        if name == PREDICTOR:
            clf, metrics = fit_from_data(data, lab)
        else:
            clf, metrics = fit_classifier(name, feats, labels, model.exit_layers)
        meta = {
            **({"shortlist": k, "min_exit_layer": first} if name == PREDICTOR else {}),
            "label": lab,
            "hidden_size": model.hidden_size,
            "exit_layers": model.exit_layers,
            "model": identity,  # refused on another model (eexit.models.identity)
            "metrics": metrics,
            "data": resolved,
        }
        path = save_classifier(folder, name, clf, meta)
        rows.append({"classifier": name, "label": lab, **metrics, "saved": str(path)})
    ctx.runtime.barrier()  # every process loads the saved classifiers after this
    return rows


def check_options(opts: CalibrateOptions, policy: str) -> None:
    """Validate before any work."""
    if POLICIES.get(policy).threshold_free:
        raise EexitError(f"policy {policy!r} has no threshold to calibrate")
    if opts.risk not in RISKS:
        raise EexitError(f"unknown risk {opts.risk!r}; valid: {', '.join(RISKS)}")
    if not 0 < opts.epsilon < 1 or not 0 < opts.delta < 1:
        raise EexitError(f"epsilon and delta must lie in (0, 1); got {opts.epsilon}, {opts.delta}")
    if opts.method not in THRESHOLD_METHODS:
        raise EexitError(f"unknown --method {opts.method!r}; valid: {', '.join(THRESHOLD_METHODS)}")
    if opts.free_fit not in FREE_FITS:
        raise EexitError(f"unknown --free-fit {opts.free_fit!r}; valid: {', '.join(FREE_FITS)}")
    check_free_options(opts.zeta, opts.free_grid or DEFAULT_GRID)
    if opts.risk in SEQUENCE_RISKS:
        if opts.method == "free":
            raise EexitError(
                "--method free fits teacher-forced token confidences; use it with --risk "
                "consistency or loss"
            )
        opts.sequence.check()
        need = min_calibration_tokens(opts.epsilon, opts.delta)
        if opts.sequence.prompts < need:
            raise EexitError(
                f"--prompts {opts.sequence.prompts} cannot certify a sequence risk <= "
                f"{opts.epsilon} with probability >= {1 - opts.delta:.2f}: that needs at least "
                f"{need} prompts (raise --prompts, or loosen --epsilon / --delta)"
            )


def min_calibration_tokens(epsilon: float, delta: float) -> int:
    """The fewest tokens with which any threshold can be certified: even with no error at all,
    the binomial tail (1 - epsilon)^n must fall to delta."""
    return math.ceil(math.log(delta) / math.log(1 - epsilon))


def check_provable(tokens: int, opts: CalibrateOptions) -> None:
    need = min_calibration_tokens(opts.epsilon, opts.delta)
    if tokens < need:
        raise EexitError(
            f"the calibration set has {tokens} tokens; certifying risk <= {opts.epsilon} with "
            f"probability >= {1 - opts.delta:.2f} needs at least {need} (raise --max-tokens, "
            "or loosen --epsilon / --delta)"
        )


def calibrate(
    ctx: EvalContext, opts: CalibrateOptions, calibration_windows: slice = slice(None)
) -> tuple[dict, list[dict]]:
    """Learn-then-Test on the request's split (its `calibration_windows`); the chosen
    threshold's risk and metrics on `opts.test_split`."""
    r, model = ctx.request, ctx.model
    check_options(opts, r.policy)
    grid = sorted(opts.grid or [round(1 - i / 100, 2) for i in range(101)], reverse=True)
    if opts.risk in SEQUENCE_RISKS:
        need = min_calibration_tokens(opts.epsilon, opts.delta)
        summary, tested, repeats = calibrate_sequences(ctx, opts, grid, need)
        resolved = ctx.resolved(**{k: v for k, v in opts.sequence.__dict__.items()})
        return {**summary, "resolved": resolved, "repeat_rows": repeats}, tested
    policy = ctx.policy
    x, y, resolved = teacher_forced_inputs(ctx)
    ys = None if y is None else y[calibration_windows]
    cal = collect_exit_table(model, x[calibration_windows], ys, policy, r.batch_size, ctx.runtime)
    check_provable(cal.tokens, opts)
    risks = token_risks(cal, policy, grid, opts.risk).numpy()
    result = fixed_sequence_test(grid, risks, opts.epsilon, opts.delta, RISKS[opts.risk])
    xt, yt, _ = teacher_forced_inputs(ctx, opts.test_split)
    test = collect_exit_table(model, xt, yt, policy, r.batch_size, ctx.runtime)
    if not ctx.is_task:  # the test rows' predicted_speedup: measured decoding costs, batch 1
        test.costs = table_costs(model, policy, max(1, xt.shape[-1] // 2))
    common = {
        "policy": r.policy,
        "policy_params": r.policy_params or {},
        "min_exit_layer": r.min_exit_layer,
        "risk": opts.risk,
        "epsilon": opts.epsilon,
        "delta": opts.delta,
        "calibration_tokens": cal.tokens,
        "test_tokens": test.tokens,
    }
    ltt = {**common, "threshold_by": "ltt", "method": RISKS[opts.risk]}
    ltt["threshold"] = result.threshold
    if result.threshold is None:
        ltt["message"] = no_threshold_message(result)
    else:
        ltt.update(threshold_row(cal, test, policy, result.threshold, opts.risk))
    free, free_rows = free_row(cal, test, policy, opts)
    free = {**common, **free}
    rows = [ltt, free] if opts.method == "ltt" else [free, ltt]
    tested = [
        {"threshold": t, "risk": risk, "p_value": p, "rejected": rej}
        for t, risk, p, rej in result.tested
    ]
    return {**rows[0], "resolved": resolved, "compared": rows, "free_fit": free_rows}, tested


def threshold_row(cal: ExitTable, test: ExitTable, policy, thr: float, risk: str) -> dict:
    """A threshold's risk on the calibration and test tables, and its test metrics."""
    row = {
        "calibration_risk": float(token_risks(cal, policy, [thr], risk).mean()),
        "test_risk": float(token_risks(test, policy, [thr], risk).mean()),
    }
    test_row = exit_metrics(test, policy.at(thr))
    row.update({f"test_{k}": v for k, v in test_row.items() if k != "threshold"})
    return row


def free_pairs(table: ExitTable, policy) -> tuple[torch.Tensor, torch.Tensor]:
    """FREE's (confidence, consistent) pairs: every token at every exit where the threshold
    decides (layer >= min exit layer, below the last layer). Teacher-forced, every token reaches
    every exit, and one threshold serves all of them, so all those exits describe it; FREE's
    single shallow exit is the case of one such exit."""
    keep = [
        k
        for k, layer in enumerate(table.exit_layers)
        if policy.min_exit_layer <= layer < table.num_layers
    ]
    score = table.score[keep]
    return score.flatten(), (table.top1[keep] == table.top1[-1]).flatten()


def free_row(cal: ExitTable, test: ExitTable, policy, opts: CalibrateOptions):
    """FREE's threshold from the calibration table (a row beside LTT's), and its fit: the
    mixture's components and the posterior at every grid value (rows for the notes)."""
    zeta, grid = opts.zeta, opts.free_grid or list(DEFAULT_GRID)
    row = {"threshold_by": "free", "method": f"beta-mixture ({opts.free_fit}, zeta {zeta:g})"}
    x, y = free_pairs(cal, policy)
    if len(x) == 0:
        return {**row, "threshold": None, "message": "no exit where the threshold decides"}, {}
    try:
        mix = fit_beta_mixture(x.numpy(), y.numpy(), em=opts.free_fit == "em")
    except EexitError as e:
        return {**row, "threshold": None, "message": str(e)}, {}
    thr, posterior = free_threshold(mix, grid, zeta)
    row["threshold"] = thr
    if thr is None:
        row["message"] = (
            f"the high-mean component's posterior never exceeds zeta {zeta:g} on FREE's grid "
            f"(at {max(grid):g}: {posterior[-1]['posterior_high']:.3g}); lower --zeta or extend "
            "--free-grid"
        )
    else:
        row.update(threshold_row(cal, test, policy, thr, opts.risk))
    parts = [
        {
            **c,
            "pairs": mix.points,
            "consistent_share": mix.positive_share,
            "m_steps": mix.iterations,
        }
        for c in mix.describe()
    ]
    return row, {"components": parts, "posterior": posterior}


def summary_line(summary: dict) -> str:
    """What `eexit calibrate` prints: the kept threshold on the test split (and the other
    method's beside it), or why there is none."""

    def one(row: dict) -> str:
        if row.get("threshold") is None:
            return row.get("message", "no threshold")
        eps = row["epsilon"]
        if row["risk"] in SEQUENCE_RISKS:
            return (
                f"threshold {row['threshold']:.2f}: held-out sequence risk {row['test_risk']:.4f} "
                f"(epsilon {eps}), agreement {row['test_agreement_pct']:.1f}%, compute "
                f"{row['test_compute_pct']:.1f}%"
            )
        return (
            f"threshold {row['threshold']:.2f}: test risk {row['test_risk']:.4f} "
            f"(epsilon {eps}), compute {row['test_compute_pct']:.1f}%, PPL {row['test_ppl']:.2f}"
        )

    rows = summary.get("compared") or [summary]
    line = one(rows[0])
    if len(rows) > 1:
        line = f"{rows[0]['threshold_by'].upper()} {line}; {rows[1]['threshold_by'].upper()} "
        line += one(rows[1])
    if summary.get("repeats"):
        line += (
            f"; held-out risk <= {summary['epsilon']} in {summary['repeats_within_epsilon']} of "
            f"{summary['repeats']} re-splits"
        )
    return line


def write_calibration(
    out: str, summary: dict, tested: list[dict], fit_rows: list[dict], identity: dict | None = None
) -> None:
    summary = dict(summary)  # the caller keeps its summary whole
    resolved = summary.pop("resolved", {})
    rows = summary.pop("compared", None) or [summary]  # the kept threshold first
    free_fit = summary.pop("free_fit", None)
    repeats = summary.pop("repeat_rows", None)
    prov = provenance({**resolved, **{k: summary[k] for k in ("risk", "epsilon", "delta")}})
    notes = ""
    if fit_rows:
        notes += "## Fitted exit classifiers\n\n" + markdown_table(fit_rows) + "\n\n"
    notes += "## Fixed-sequence test (most conservative threshold first)\n\n"
    notes += markdown_table(tested) + "\n\n"
    if free_fit:
        notes += (
            "## FREE's Beta mixture (confidence of consistent vs inconsistent tokens)\n\n"
            + markdown_table(free_fit["components"])
            + "\n\nPosterior of the high-mean component on FREE's grid:\n\n"
            + markdown_table(free_fit["posterior"])
            + "\n\n"
        )
    if repeats:
        kept = sum(row["within_epsilon"] for row in repeats)
        notes += (
            f"## Repeated splits: held-out risk <= {summary['epsilon']} in {kept} of "
            f"{len(repeats)} (LTT promises >= {1 - summary['delta']:.2f} of them)\n\n"
            + markdown_table(repeats)
            + "\n\n"
        )
    how = (
        "FREE's Beta-mixture threshold" if summary["threshold_by"] == "free" else "Learn-then-Test"
    )
    unit = " on decoded sequences" if summary["risk"] in SEQUENCE_RISKS else ""
    title = (
        f"{how} calibration{unit}: {summary['policy']}, risk {summary['risk']} <= "
        f"{summary['epsilon']} with probability >= {1 - summary['delta']:.2f}"
    )
    columns = list(dict.fromkeys(k for row in rows for k in row))
    write_results(out, "calibration", title, rows, prov, columns=columns, notes=notes)
    if summary["threshold"] is not None:
        keys = (
            "policy",
            "policy_params",
            "min_exit_layer",
            "threshold",
            "risk",
            "epsilon",
            "delta",
        )
        keep = {k: summary[k] for k in keys}
        keep["source"] = "FREE" if summary["threshold_by"] == "free" else "LTT"
        keep.update({k: resolved.get(k) for k in ("model", "exit_layers", "seq_len", "dataset")})
        # what the threshold was calibrated on (weights hash included): another model, or the
        # same folder retrained, is refused where the calibration is applied
        keep["model_identity"] = identity
        atomic_json(Path(out) / CALIBRATED_FILE, portable(keep))  # the model as in provenance


@dataclass(kw_only=True)
class CalibrationRun:
    fit: list[str]  # classifiers to fit first (meta, lstm, mlp3, predictor)
    label: str | None = None  # consistent | stable (None: stable for predictor, else consistent)
    ltt: CalibrateOptions | None = None  # calibrate the request's policy (None: fit only)


def run_calibration(request: EvalRequest, run: CalibrationRun, out: str, overwrite: bool) -> dict:
    """`eexit calibrate`: fit classifiers and/or choose the policy's threshold by LTT; with both,
    even windows fit the classifiers and odd windows calibrate."""
    for name in run.fit:
        CLASSIFIERS.get(name)
    if not run.fit and run.ltt is None:
        raise EexitError("nothing to do: give --fit meta,lstm,mlp3 and/or --policy NAME")
    if run.ltt is not None:
        check_options(run.ltt, request.policy)
        if run.fit and run.ltt.risk in SEQUENCE_RISKS:
            raise EexitError(
                "sequence risks calibrate on prompts of the split, which --fit would also train "
                "on; fit first (eexit calibrate --fit ...), then calibrate with --risk "
                f"{run.ltt.risk}"
            )
    check_output_path(Path(out), overwrite)
    ctx = open_context(request, bind=False)
    check_windows(ctx, run)
    if run.fit:
        check_classifiers_free(ctx, run.fit, overwrite)
    main = ctx.runtime.is_main  # several processes: each runs its shard, the main one writes
    with output_folder(out, overwrite) if main else nullcontext(None) as folder:
        lock = FolderLock(ctx.checkpoint.folder) if run.fit and main else nullcontext()
        with lock:  # classifiers are written beside the checkpoint: one writer there too
            fit_rows = fit(ctx, run.fit, run.label) if run.fit else []
        if run.ltt is None:
            if main:
                prov = provenance(
                    {"model": request.model, "fit": run.fit, "label": run.label}
                    | {"runtime": ctx.runtime.describe()}
                )
                title = f"Exit classifiers fitted on {request.split}"
                write_results(folder, "classifiers", title, fit_rows, prov)
            return {"fit": fit_rows, "main": main}
        ctx.policy.bind(ctx.model, ctx.checkpoint.folder)  # after fitting: the new classifier
        windows = slice(1, None, 2) if run.fit else slice(None)
        summary, tested = calibrate(ctx, run.ltt, windows)
        if main:
            write_calibration(str(folder), summary, tested, fit_rows, model_identity(ctx.model))
    ctx.runtime.barrier()
    return {"fit": fit_rows, "summary": summary, "main": main}


def check_classifiers_free(ctx: EvalContext, names: list[str], overwrite: bool) -> None:
    """Fitting never replaces a fitted classifier silently."""
    folder = ctx.checkpoint.folder
    if folder is None:
        raise EexitError(
            "--fit saves classifiers beside the checkpoint, so --model must be a local folder; "
            f"got {ctx.request.model}"
        )
    taken = [n for n in names if (folder / CLASSIFIER_DIR / f"{n}.pt").exists()]
    if taken and not overwrite:
        raise EexitError(
            f"{folder / CLASSIFIER_DIR} already holds fitted {', '.join(taken)}; pass --overwrite "
            "to fit them again"
        )


def check_windows(ctx: EvalContext, run: CalibrationRun) -> None:
    """--max-tokens below what the run needs is refused before any work, rather than rounded up
    to one window (eval_windows never returns none): fitting needs a whole window, a token risk
    at least `min_calibration_tokens` in its windows, and both together twice that (the even
    windows fit, the odd ones calibrate)."""
    r = ctx.request
    if ctx.is_task or r.max_tokens is None:
        return
    seq_len = r.seq_len if r.seq_len is not None else ctx.checkpoint.data.seq_len
    token_risk = run.ltt is not None and run.ltt.risk in ("consistency", "loss")
    need_tokens = min_calibration_tokens(run.ltt.epsilon, run.ltt.delta) if token_risk else 0
    cal_windows = max(1, math.ceil(need_tokens / seq_len)) if token_risk else 0
    need = (2 * cal_windows if run.fit else cal_windows) if token_risk else 1
    windows = r.max_tokens // seq_len
    if windows >= need or not (run.fit or token_risk):
        return
    if token_risk:
        why = (
            f"certifying risk <= {run.ltt.epsilon} with probability >= {1 - run.ltt.delta:.2f} "
            f"needs at least {need_tokens} tokens"
            + (" in the odd windows (the even ones fit the classifiers)" if run.fit else "")
        )
    else:
        why = "fitting exit classifiers needs at least one whole window"
    raise EexitError(
        f"--max-tokens {r.max_tokens} holds {windows} whole windows of {seq_len} tokens; {why}: "
        f"{need} windows (--max-tokens >= {need * seq_len})"
    )
