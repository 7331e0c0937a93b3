"""The `eexit` command line: each command parses its options, builds a request by keyword and
calls one library entry (`training.loop.run_training`, `evaluation.entry.evaluate`,
`calibration.calibrate.run_calibration`, `analysis.analyze.run_analysis`). Help texts list
the registered names; heavy imports (transformers, datasets) wait until a command runs. The options
the commands share, the request they build and the options a mode refuses are in `cli_options`."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer

from eexit.cli_options import (
    _BS,
    _DATASET,
    _DEVICE,
    _DTYPE,
    _EXAMPLES,
    _EXITS,
    _KV,
    _MAXTOK,
    _MIN,
    _MODEL,
    _NEW,
    _OVERWRITE,
    _PARAM,
    _POLICY,
    _SEQ,
    _SPLIT,
    model_or_newest,
    quiet_libraries,
    refuse_calibrate_ignored,
    refuse_ignored,
    request_from,
    task_options,
)
from eexit.errors import EexitError
from eexit.names import loss_names

app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="eexit: train, evaluate and sweep early-exit transformers.",
)


def _version(value: bool) -> None:
    if value:
        from eexit import __version__

        typer.echo(f"eexit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """eexit: train, evaluate and sweep early-exit transformers."""


@app.command()
def train(
    config: Optional[str] = typer.Option(
        None, "--config", "-c", help="YAML experiment config (experiments/*.yaml)."
    ),
    loss: Optional[str] = typer.Option(
        None, help=f"Training objective: {', '.join(loss_names())}."
    ),
    set_: List[str] = typer.Option(
        [], "--set", help="Override a config key: --set train.lr=3e-4 (repeatable)."
    ),
    out: Optional[str] = typer.Option(None, help="Output folder (default checkpoints/<run_name>)."),
    resume: bool = typer.Option(
        False, help="Continue from the newest checkpoint in the output folder."
    ),
    overwrite: bool = typer.Option(False, help="Start again in an existing output folder."),
    stop_after: Optional[int] = typer.Option(
        None, help="Stop after this many steps, as if killed (resume later)."
    ),
    device: str = _DEVICE,
    dtype: str = typer.Option(
        "auto",
        help="Mixed precision of training (weights stay float32): float32, bfloat16, float16 "
        "(GPU only); auto = accelerate's own setting (accelerate launch --mixed_precision).",
    ),
):
    """Train an early-exit LM (multi-process with `accelerate launch` or `torchrun`)."""
    quiet_libraries()
    from eexit.config import load_config
    from eexit.training.loop import run_training

    overrides = list(set_)
    if loss:
        from eexit.training.losses import LOSSES

        LOSSES.get(loss)
        overrides.append(f"loss.name={loss}")
    if out:
        overrides.append(f"out_dir={out}")
    cfg = load_config(config, overrides)
    result = run_training(
        cfg,
        resume=resume,
        overwrite=overwrite,
        stop_after=stop_after,
        device=device,
        dtype=dtype,
    )
    if not result["main_process"]:
        return
    keep = ("step", "processes")
    shown = {
        k: round(v, 4) if isinstance(v, float) else v
        for k, v in result.items()
        if k in keep or k.startswith(("loss", "val_ppl"))
    }
    state = "finished" if result["finished"] else "stopped"
    typer.echo(f"{state}: {cfg.output_dir}  {shown}")


@app.command()
def evaluate(
    ctx: typer.Context,
    model: Optional[str] = _MODEL,
    policy: str = _POLICY,
    threshold: float = typer.Option(
        0.9, help="Exit when the policy's score > threshold (in [0, 1]; 1.0 never exits early)."
    ),
    min_exit_layer: int = _MIN,
    param: List[str] = _PARAM,
    dataset: Optional[str] = _DATASET,
    split: str = _SPLIT,
    seq_len: Optional[int] = _SEQ,
    max_tokens: Optional[int] = _MAXTOK,
    batch_size: int = _BS,
    exit_layers: Optional[str] = _EXITS,
    out: Optional[str] = typer.Option(None, help="Write the table to this results folder."),
    overwrite: bool = _OVERWRITE,
    calibrated: Optional[str] = typer.Option(
        None, help="Use the policy and threshold chosen by `eexit calibrate --out DIR`."
    ),
    generate: bool = typer.Option(
        False,
        "--generate",
        help="Evaluate early-exit decoding against full-depth decoding instead of perplexity.",
    ),
    kv: str = _KV,
    prompts: Optional[int] = typer.Option(None, help="--generate: number of prompts (8)."),
    prompt_len: Optional[int] = typer.Option(None, help="--generate: tokens per prompt (32)."),
    mode: Optional[str] = typer.Option(
        None,
        help="--generate: early-exit (default: the policy decides per token) or self-spec "
        "(LayerSkip: draft with the first layers, verify with the rest; output = full-depth "
        "greedy).",
    ),
    draft_layer: Optional[int] = typer.Option(
        None, help="--mode self-spec: the exit that drafts (default: a quarter of the depth)."
    ),
    draft_length: Optional[int] = typer.Option(
        None, help="--mode self-spec: tokens drafted per verification (4)."
    ),
    draft_vocab: Optional[int] = typer.Option(
        None,
        help="--mode self-spec: draft over the K most frequent tokens of the dataset's train split "
        "(0, the default = every token); cheaper drafts, the same output.",
    ),
    rounds: Optional[int] = typer.Option(
        None,
        help="--generate: interleaved timing rounds (3): each decoder once per round, after a "
        "warm-up; speedups are ratios of medians, with a 95 % interval from 2 rounds on.",
    ),
    max_new_tokens: Optional[int] = _NEW,
    examples: int = _EXAMPLES,
    device: str = _DEVICE,
    dtype: str = _DTYPE,
):
    """Perplexity, compute % and exit shares of one policy at one threshold (or, with
    --generate, decoding speed and agreement). On a task dataset: the task metric of early-exit
    decoding."""
    if generate and mode == "self-spec":
        refuse_ignored(
            ctx, "evaluate", "--mode self-spec", "no policy decides: --draft-layer drafts and "
            "the full model verifies every token",
        )  # fmt: skip
    model = model_or_newest(model)
    quiet_libraries()
    from eexit.evaluation.entry import apply_calibrated
    from eexit.evaluation.entry import evaluate as run
    from eexit.evaluation.generation import generation_options
    from eexit.reporting import print_rows

    gen = generation_options(  # refuses decoding-only options without --generate
        generate,
        prompts=prompts,
        prompt_len=prompt_len,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        kv_mode=kv,
        mode=mode,
        draft_layer=draft_layer,
        draft_length=draft_length,
        draft_vocab=draft_vocab,
        rounds=rounds,
    )
    r = request_from(
        model,
        policy,
        [threshold],
        min_exit_layer,
        param,
        dataset,
        split,
        seq_len,
        max_tokens,
        batch_size,
        exit_layers,
        device,
        dtype,
    )
    if calibrated:
        apply_calibrated(r, calibrated)
    task = task_options(ctx, examples, max_new_tokens, kv, batch_size)
    res = run(r, out=out, overwrite=overwrite, generation=gen, task=task)
    if not res.main:  # several processes: the main one prints
        return
    at = f"{r.policy} @ {r.thresholds[0]}"
    if res.kind == "generation":
        if gen.mode == "self-spec":  # the policy and --kv play no part
            at = f"self-spec, draft layer {gen.draft_layer}, {gen.draft_length} drafts"
        else:
            at = f"{at}, kv {kv}"
        print_rows(res.rows, title=f"{at}: per sample")
        print_rows([res.total], title="total")
    elif res.kind == "task":
        print_rows(res.rows, title=f"{res.dataset}: full depth vs {at}, kv {kv}")
    else:
        print_rows(res.rows, title=at)


def sweep_threshold(
    ctx: typer.Context,
    model: Optional[str] = _MODEL,
    policy: str = _POLICY,
    thresholds: str = typer.Option("0.5:0.95", help="a:b (step 0.05), a:b:step, or a comma list."),
    min_exit_layer: int = _MIN,
    param: List[str] = _PARAM,
    dataset: Optional[str] = _DATASET,
    split: str = _SPLIT,
    seq_len: Optional[int] = _SEQ,
    max_tokens: Optional[int] = _MAXTOK,
    batch_size: int = _BS,
    exit_layers: Optional[str] = _EXITS,
    out: Optional[str] = typer.Option(
        None, help="Results folder (default results/sweep-<model>-<policy>)."
    ),
    overwrite: bool = _OVERWRITE,
    kv: str = _KV,
    max_new_tokens: Optional[int] = _NEW,
    examples: int = _EXAMPLES,
    device: str = _DEVICE,
    dtype: str = _DTYPE,
):
    """One row per threshold: PPL (or, on a task dataset, the task metric of early-exit
    decoding), compute %, exit shares; Markdown/CSV/JSON + PNG in results/."""
    model = model_or_newest(model)
    quiet_libraries()
    from eexit.evaluation.entry import evaluate as run
    from eexit.policies import POLICIES
    from eexit.policies.thresholds import parse_thresholds
    from eexit.reporting import print_rows

    if POLICIES.get(policy).threshold_free:  # every row would be the same
        refuse_ignored(
            ctx, "sweep", "a threshold-free policy", f"{policy!r} exits without a threshold"
        )

    values = parse_thresholds(thresholds)
    out = out or f"results/sweep-{Path(model).name}-{policy}"
    r = request_from(
        model,
        policy,
        values,
        min_exit_layer,
        param,
        dataset,
        split,
        seq_len,
        max_tokens,
        batch_size,
        exit_layers,
        device,
        dtype,
    )
    task = task_options(ctx, examples, max_new_tokens, kv, batch_size)
    res = run(r, out=out, overwrite=overwrite, sweep=True, task=task)
    if not res.main:
        return
    where = f" on {res.dataset}" if res.kind == "task" else ""
    print_rows(res.rows, title=f"{policy} sweep{where} -> {out}")


app.command("sweep-threshold")(sweep_threshold)
app.command("sweep", help="Alias of sweep-threshold.")(sweep_threshold)


@app.command("analyze-monotonicity")
def analyze_monotonicity(
    model: List[str] = typer.Option(
        ..., "--model", "-m", help="Model(s) to analyse; repeat to overlay several."
    ),
    label: List[str] = typer.Option([], "--label", help="Legend name per --model."),
    dataset: Optional[str] = _DATASET,
    split: str = _SPLIT,
    seq_len: Optional[int] = _SEQ,
    max_tokens: int = typer.Option(
        8192, "--max-tokens", help="Analyse at most this many tokens per model."
    ),
    batch_size: int = _BS,
    top_k: int = typer.Option(5, "--top-k", help="Ranks followed for top-k saturation."),
    examples: int = typer.Option(3, help="Example tokens for figure 3."),
    sublayers: bool = typer.Option(
        True, help="Also read the residual stream after attention (sub-layer exits)."
    ),
    out: Optional[str] = typer.Option(
        None, help="Results folder (default results/monotonicity-<first model>)."
    ),
    overwrite: bool = _OVERWRITE,
    device: str = _DEVICE,
    dtype: str = _DTYPE,
):
    """Seed 001 figures 1-3, top-k saturation order (seed 003), sub-word / sub-layer exits
    (seed 004)."""
    from eexit.model_source import model_source

    for m in model:  # nothing behind a --model: refused before torch is imported
        model_source(m)
    quiet_libraries()
    from eexit.analysis.analyze import AnalyzeSetup, run_analysis
    from eexit.reporting import print_rows

    out = out or f"results/monotonicity-{Path(model[0]).stem}"
    s = AnalyzeSetup(
        models=list(model),
        labels=list(label) or None,
        dataset=dataset,
        split=split,
        seq_len=seq_len,
        max_tokens=max_tokens,
        batch_size=batch_size,
        top_k=top_k,
        examples=examples,
        sublayers=sublayers,
        device=device,
        dtype=dtype,
    )
    res = run_analysis(s, out, overwrite)
    if not res["main"]:
        return
    keep = (
        "model",
        "peak_before_last_pct",
        "monotone_everywhere_pct",
        "topk_ordered_all_ranks_pct",
        "word_start_mean_exit",
        "continuation_mean_exit",
    )
    rows = [{k: r[k] for k in keep if k in r} for r in res["summary"]]
    print_rows(rows, title=f"monotonicity -> {out}")


@app.command()
def calibrate(
    ctx: typer.Context,
    model: Optional[str] = _MODEL,
    fit: Optional[str] = typer.Option(
        None, help="Fit exit classifiers first: comma list of meta, lstm, mlp3, predictor."
    ),
    label: Optional[str] = typer.Option(
        None,
        help="Classifier label: consistent (top-1 = final) or stable (... and never changes); "
        "default: stable for predictor, consistent for the others.",
    ),
    policy: Optional[str] = typer.Option(
        None, help="Policy whose threshold to calibrate (Learn-then-Test)."
    ),
    epsilon: float = typer.Option(0.05, help="Tolerated risk."),
    delta: float = typer.Option(0.1, help="Allowed failure probability (confidence 1 - delta)."),
    risk: str = typer.Option(
        "consistency",
        help="consistency (top-1 differs from the full model), loss (relative drop of "
        "p(correct)), or per decoded prompt against full-depth decoding: sequence-mismatch "
        "(share of differing tokens) or sequence-rouge (1 - ROUGE-L).",
    ),
    grid: str = typer.Option("0:1:0.01", help="Thresholds to test (tested from the largest down)."),
    method: str = typer.Option(
        "ltt",
        help="Threshold kept: ltt (Learn-then-Test) or free (FREE's Beta mixture); the table "
        "shows both.",
    ),
    zeta: float = typer.Option(
        0.4, help="FREE: the high-mean component's posterior must exceed this (0 < zeta < 1)."
    ),
    free_grid: Optional[str] = typer.Option(
        None, help="FREE: candidate thresholds (default 10 values evenly spaced on [0.3, 0.9])."
    ),
    free_fit: str = typer.Option(
        "labels",
        help="FREE: labels (each component fitted to its labelled tokens) or em (EM started from "
        "the labels).",
    ),
    prompts: int = typer.Option(32, help="sequence-*: calibration prompts (each one unit)."),
    test_prompts: Optional[int] = typer.Option(
        None, help="sequence-*: held-out prompts from --test-split (default: --prompts)."
    ),
    prompt_len: int = typer.Option(32, help="sequence-*: tokens per prompt."),
    max_new_tokens: int = typer.Option(32, help="sequence-*: tokens decoded per prompt."),
    kv: str = _KV,
    repeats: int = typer.Option(
        0,
        help="sequence-*: re-split the pooled prompts R times (seeds 0..R-1) and count the "
        "held-out risks <= epsilon.",
    ),
    min_exit_layer: int = _MIN,
    param: List[str] = _PARAM,
    dataset: Optional[str] = _DATASET,
    split: str = typer.Option("validation", help="Calibration split."),
    test_split: str = typer.Option(
        "test", help="Split on which the chosen threshold's risk is reported."
    ),
    seq_len: Optional[int] = _SEQ,
    max_tokens: Optional[int] = _MAXTOK,
    batch_size: int = _BS,
    exit_layers: Optional[str] = _EXITS,
    out: Optional[str] = typer.Option(
        None, help="Results folder (default results/calibrate-<model>-<policy>)."
    ),
    overwrite: bool = _OVERWRITE,
    device: str = _DEVICE,
    dtype: str = _DTYPE,
):
    """Fit learned exit classifiers and/or pick a threshold with a Learn-then-Test guarantee."""
    refuse_calibrate_ignored(ctx, fit, policy, risk)
    quiet_libraries()
    model = model_or_newest(model)
    from eexit.calibration.calibrate import (
        CalibrateOptions,
        CalibrationRun,
        run_calibration,
        summary_line,
    )
    from eexit.calibration.sequence import SequenceOptions
    from eexit.policies.thresholds import parse_thresholds

    names = [n.strip() for n in fit.split(",") if n.strip()] if fit else []
    ltt = None
    if policy:
        ltt = CalibrateOptions(
            epsilon=epsilon,
            delta=delta,
            risk=risk,
            grid=parse_thresholds(grid),
            test_split=test_split,
            method=method,
            zeta=zeta,
            free_grid=parse_thresholds(free_grid) if free_grid else None,
            free_fit=free_fit,
            sequence=SequenceOptions(
                prompts=prompts,
                test_prompts=test_prompts,
                prompt_len=prompt_len,
                max_new_tokens=max_new_tokens,
                kv_mode=kv,
                repeats=repeats,
            ),
        )
    out = out or f"results/calibrate-{Path(model).name}-{policy or 'fit'}"
    # without --policy, --param reaches the predictor being fitted (its shortlist=K)
    r = request_from(
        model,
        policy or ("predictor" if "predictor" in names else "max-prob"),
        [],
        min_exit_layer,
        param,
        dataset,
        split,
        seq_len,
        max_tokens,
        batch_size,
        exit_layers,
        device,
        dtype,
    )
    res = run_calibration(r, CalibrationRun(fit=names, label=label, ltt=ltt), out, overwrite)
    if not res["main"]:
        return
    for row in res["fit"]:
        typer.echo(
            f"{row['classifier']}: held-out accuracy {row['heldout_accuracy']:.3f}, "
            f"saved {row['saved']}"
        )
    summary = res.get("summary")
    if summary is not None:
        typer.echo(f"{policy}: {summary_line(summary)} -> {out}")


@app.command("lm-eval")
def lm_eval_command(
    model: str = typer.Option(..., "--model", "-m", help="eexit checkpoint, HF folder or .gguf."),
    tasks: str = typer.Option(..., help="lm-eval task names, comma separated."),
    include_path: Optional[str] = typer.Option(None, help="A folder of your own task YAMLs."),
    policy: str = _POLICY,
    threshold: float = typer.Option(1.0, help="Exit threshold (1.0: never exit = plain model)."),
    min_exit_layer: int = _MIN,
    kv: str = _KV,
    batch_size: int = typer.Option(
        1, "--batch-size", help="Requests per forward pass (loglikelihoods, generations)."
    ),
    max_length: Optional[int] = typer.Option(
        None, "--max-length", help="Longest input in tokens (default: the model's positions)."
    ),
    device: str = _DEVICE,
    dtype: str = _DTYPE,
    limit: Optional[int] = typer.Option(None, help="Examples per task (all by default)."),
    out: Optional[str] = typer.Option(None, help="Write the table to this results folder."),
    overwrite: bool = _OVERWRITE,
):
    """lm-evaluation-harness tasks with early exit: the harness's metrics beside compute % and
    exit shares (loglikelihood and generation run through eexit's exit rule). Every option and
    task is checked before the model loads."""
    from eexit.model_source import model_source

    model_source(model)  # nothing behind --model: refused before torch is imported
    quiet_libraries()
    try:
        from eexit.integrations.lm_eval_harness import EexitLM, check_settings, run_harness
        from eexit.integrations.lm_eval_tasks import prepare_tasks
    except ImportError:
        raise EexitError("lm-eval is not installed: pip install 'eexit[lmeval]'") from None
    from eexit.files import check_output_path, output_folder
    from eexit.reporting import print_rows, provenance, write_results

    if out:
        check_output_path(Path(out), overwrite)
    if limit is not None and limit < 1:
        raise EexitError(f"--limit must be >= 1; got {limit}")
    settings = dict(
        policy=policy,
        threshold=threshold,
        min_exit_layer=min_exit_layer,
        kv=kv,
        max_length=max_length,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
    )
    check_settings(**settings)
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    prepared = prepare_tasks(names, include_path)
    lm = EexitLM(pretrained=model, **settings)  # the depth-dependent checks right after the load
    rows, stats, _ = run_harness(lm, prepared, include_path, limit)
    if not lm.runtime.is_main:  # several processes: the main one prints and writes
        return
    rows = [{**r, "policy": policy, "threshold": threshold, **stats} for r in rows]
    print_rows(rows, title=f"lm-eval {', '.join(names)}: {policy} @ {threshold}")
    if out:
        config = {
            "model": model,
            "tasks": names,
            "include_path": include_path,
            "limit": limit,
            **{k: v for k, v in settings.items() if k not in ("device", "dtype")},
            "max_length": lm.max_length,
            "runtime": lm.runtime.describe(),
        }
        with output_folder(out, overwrite) as folder:
            write_results(
                folder,
                "lm_eval",
                f"lm-eval with early exit: {policy} @ {threshold}",
                rows,
                provenance(config),
            )


def _stop_on_sigint() -> None:
    """Ctrl-C / `kill -INT` stops every command cleanly however it was started: a process started
    in the background of a non-interactive shell (`cmd &`, a CI job, a test runner launched that
    way) inherits SIGINT as ignored, and Python then installs no KeyboardInterrupt handler."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main() -> None:
    _stop_on_sigint()
    try:
        app()
    except EexitError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except OSError as e:  # a write that failed outside the guarded paths: one line, no traceback
        from eexit.files import WRITE_ERRNOS, write_error

        if e.errno not in WRITE_ERRNOS:
            raise
        typer.echo(f"error: {write_error(e)}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
