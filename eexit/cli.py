"""The `eexit` command line: thin wrappers over the recipes in `eexit.training.loop` and `eexit.evaluation.lm`."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from eexit.errors import EexitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="eexit: train, evaluate and sweep early-exit transformers.")


def _quiet() -> None:
    from eexit import quiet

    quiet()


def _params(items: List[str]) -> dict:
    from eexit.config import parse_override

    return dict(parse_override(i) for i in items)


@app.command()
def train(
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML experiment config (experiments/*.yaml)."),
    loss: Optional[str] = typer.Option(None, help="Training objective, e.g. final, weighted-ce, aux, deep-supervision, free-kd, ponder."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key: --set train.lr=3e-4 (repeatable)."),
    out: Optional[str] = typer.Option(None, help="Output folder (default checkpoints/<run_name>)."),
    resume: bool = typer.Option(False, help="Continue from the newest checkpoint in the output folder."),
    overwrite: bool = typer.Option(False, help="Start again in an existing output folder."),
    stop_after: Optional[int] = typer.Option(None, help="Stop after this many steps, as if killed (resume later)."),
):
    """Train an early-exit LM (multi-process with `accelerate launch` or `torchrun`)."""
    _quiet()
    from eexit.config import load_config
    from eexit.training.losses import LOSSES
    from eexit.training.loop import run_training

    overrides = list(set_)
    if loss:
        LOSSES.get(loss)
        overrides.append(f"loss.name={loss}")
    if out:
        overrides.append(f"out_dir={out}")
    cfg = load_config(config, overrides)
    LOSSES.get(cfg.loss.name)
    result = run_training(cfg, resume=resume, overwrite=overwrite, stop_after=stop_after)
    if not result["main_process"]:
        return
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items() if k in ("step", "processes") or k.startswith(("loss", "val_ppl"))}
    typer.echo(f"{'finished' if result['finished'] else 'stopped'}: {cfg.output_dir}  {shown}")


def _setup(model, policy, threshold, min_exit_layer, param, dataset, split, seq_len, max_tokens, batch_size, exit_layers):
    from eexit.evaluation.lm import EvalSetup

    return EvalSetup(model, policy, threshold, min_exit_layer, _params(param), dataset, split, seq_len, max_tokens, batch_size, exit_layers)


_MODEL = typer.Option(..., "--model", "-m", help="eexit checkpoint folder, HF folder / hub name, or .gguf file.")
_POLICY = typer.Option("max-prob", help="Exit policy: max-prob, margin, entropy, saturation, static, oracle, halting-cdf.")
_MIN = typer.Option(1, "--min-exit-layer", help="No exit below this layer.")
_PARAM = typer.Option([], "--param", help="Policy parameter key=value, e.g. --param layer=2 for static.")
_DATASET = typer.Option(None, help="Dataset (default: the checkpoint's training corpus).")
_SPLIT = typer.Option("test", help="train, validation or test.")
_SEQ = typer.Option(None, "--seq-len", help="Window length (default: the training one).")
_MAXTOK = typer.Option(None, "--max-tokens", help="Evaluate at most this many tokens.")
_BS = typer.Option(8, "--batch-size", help="Windows (or, with --generate, prompts) per batch.")
_EXITS = typer.Option(None, "--exit-layers", help="Override the exits: all, or e.g. 1,3.")
_EXAMPLES = typer.Option(32, "--examples", help="Task datasets: test examples decoded per threshold.")


def _task_rows(s, examples, max_new_tokens, kv, batch_size, thresholds, out, overwrite):
    from eexit.reporting import prepare_dir
    from eexit.evaluation.tasks import TaskOptions, run_task_sweep

    if out:
        prepare_dir(out, overwrite)
    rows = run_task_sweep(s, TaskOptions(examples, max_new_tokens, None, kv, batch_size), thresholds, out)
    many = sum(k.startswith("exit@") for k in rows[0]) > 8  # per-exit shares of deep models: in the files only
    return [{k: v for k, v in r.items() if not (many and k.startswith("exit@"))} for r in rows]


@app.command()
def evaluate(
    model: str = _MODEL, policy: str = _POLICY,
    threshold: float = typer.Option(0.9, help="Exit when the policy's score > threshold (in [0, 1]; 1.0 never exits early)."),
    min_exit_layer: int = _MIN, param: List[str] = _PARAM, dataset: Optional[str] = _DATASET, split: str = _SPLIT,
    seq_len: Optional[int] = _SEQ, max_tokens: Optional[int] = _MAXTOK, batch_size: int = _BS, exit_layers: Optional[str] = _EXITS,
    out: Optional[str] = typer.Option(None, help="Write the table to this results folder."),
    overwrite: bool = typer.Option(False, help="Replace an existing results folder."),
    calibrated: Optional[str] = typer.Option(None, help="Use the policy and threshold chosen by `eexit calibrate --out DIR`."),
    generate: bool = typer.Option(False, "--generate", help="Evaluate early-exit decoding against full-depth decoding instead of LM perplexity."),
    kv: str = typer.Option("propagate", "--kv", help="KV of skipped layers when decoding: propagate, recompute or full."),
    prompts: int = typer.Option(8, help="--generate: number of prompts."),
    prompt_len: int = typer.Option(32, help="--generate: tokens per prompt."),
    max_new_tokens: Optional[int] = typer.Option(None, help="--generate: tokens per prompt (32); task datasets: longest answer (the training max_target_len)."),
    examples: int = _EXAMPLES,
):
    """Perplexity, compute % and exit shares of one policy at one threshold (or, with --generate, decoding speed and agreement).
    On a task dataset (bible-en-fr, aclsum, wiki-cloze-qa, wmt15, cnn_dailymail, squad): the task metric of early-exit decoding."""
    _quiet()
    from eexit.evaluation.lm import is_task, print_rows, run_evaluate

    s = _setup(model, policy, threshold, min_exit_layer, param, dataset, split, seq_len, max_tokens, batch_size, exit_layers)
    if calibrated:
        from eexit.calibration.calibrate import read_calibrated

        c = read_calibrated(calibrated)
        if c.get("model") and Path(c["model"]).resolve() != Path(model).resolve():
            raise EexitError(f"{calibrated} was calibrated for model {c['model']}, not {model}")
        s.policy, s.threshold, s.min_exit_layer, s.policy_params = c["policy"], c["threshold"], c["min_exit_layer"], c["policy_params"]
        s.exit_layers = s.exit_layers or ",".join(str(l) for l in c.get("exit_layers", [])) or None
        policy, threshold = s.policy, s.threshold
    if is_task(s) and not generate:
        rows = _task_rows(s, examples, max_new_tokens, kv, batch_size, [s.threshold], out, overwrite)
        print_rows(rows, title=f"{s.dataset}: full depth vs {policy} @ {threshold}, kv {kv}")
        return
    if generate:
        from eexit.evaluation.generation import GenSetup
        from eexit.evaluation.lm import run_generation

        rows, total = run_generation(s, GenSetup(prompts, prompt_len, max_new_tokens or 32, batch_size, kv), out, overwrite)
        print_rows(rows, title=f"{policy} @ {threshold}, kv {kv}: per sample")
        print_rows([total], title="total")
        return
    row = run_evaluate(s, out, overwrite)
    print_rows([row], title=f"{policy} @ {threshold}")


def sweep_threshold(
    model: str = _MODEL, policy: str = _POLICY,
    thresholds: str = typer.Option("0.5:0.95", help="a:b (step 0.05), a:b:step, or a comma list."),
    min_exit_layer: int = _MIN, param: List[str] = _PARAM, dataset: Optional[str] = _DATASET, split: str = _SPLIT,
    seq_len: Optional[int] = _SEQ, max_tokens: Optional[int] = _MAXTOK, batch_size: int = _BS, exit_layers: Optional[str] = _EXITS,
    out: Optional[str] = typer.Option(None, help="Results folder (default results/sweep-<model>-<policy>)."),
    overwrite: bool = typer.Option(False, help="Replace an existing results folder."),
    kv: str = typer.Option("propagate", "--kv", help="Task datasets: KV of skipped layers when decoding (propagate, recompute, full)."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Task datasets: longest answer (default: the training max_target_len)."),
    examples: int = _EXAMPLES,
):
    """One row per threshold: PPL (or, on a task dataset, the task metric of early-exit decoding), compute %, exit shares;
    Markdown/CSV/JSON + PNG in results/."""
    _quiet()
    from eexit.evaluation.lm import is_task, print_rows, run_sweep
    from eexit.policies.thresholds import parse_thresholds

    values = parse_thresholds(thresholds)
    out = out or f"results/sweep-{Path(model).name}-{policy}"
    s = _setup(model, policy, values[0], min_exit_layer, param, dataset, split, seq_len, max_tokens, batch_size, exit_layers)
    if is_task(s):
        rows = _task_rows(s, examples, max_new_tokens, kv, batch_size, values, out, overwrite)
        print_rows(rows, title=f"{policy} sweep on {s.dataset} -> {out}")
        return
    rows = run_sweep(s, values, out, overwrite)
    print_rows(rows, title=f"{policy} sweep -> {out}")


app.command("sweep-threshold")(sweep_threshold)


@app.command("analyze-monotonicity")
def analyze_monotonicity(
    model: List[str] = typer.Option(..., "--model", "-m", help="Model(s) to analyse; repeat to overlay several."),
    label: List[str] = typer.Option([], "--label", help="Legend name per --model."),
    dataset: Optional[str] = _DATASET, split: str = _SPLIT, seq_len: Optional[int] = _SEQ,
    max_tokens: int = typer.Option(8192, "--max-tokens", help="Analyse at most this many tokens per model."),
    batch_size: int = _BS,
    top_k: int = typer.Option(5, "--top-k", help="Ranks followed for top-k saturation."),
    examples: int = typer.Option(3, help="Example tokens for figure 3."),
    sublayers: bool = typer.Option(True, help="Also read the residual stream after attention (sub-layer exits)."),
    out: Optional[str] = typer.Option(None, help="Results folder (default results/monotonicity-<first model>)."),
    overwrite: bool = typer.Option(False, help="Replace an existing results folder."),
):
    """Seed 001 figures 1-3, top-k saturation order (seed 003), sub-word / sub-layer exits (seed 004)."""
    _quiet()
    from eexit.analysis.analyze import AnalyzeSetup, run_analysis
    from eexit.evaluation.lm import print_rows

    out = out or f"results/monotonicity-{Path(model[0]).stem}"
    s = AnalyzeSetup(list(model), list(label) or None, dataset, split, seq_len, max_tokens, batch_size, top_k, examples, sublayers)
    res = run_analysis(s, out, overwrite)
    keep = ("model", "peak_before_last_pct", "monotone_everywhere_pct", "topk_ordered_all_ranks_pct", "word_start_mean_exit", "continuation_mean_exit")
    print_rows([{k: r[k] for k in keep if k in r} for r in res["summary"]], title=f"monotonicity -> {out}")


@app.command()
def calibrate(
    model: str = _MODEL,
    fit: Optional[str] = typer.Option(None, help="Fit exit classifiers first: comma list of meta, lstm, mlp3."),
    label: str = typer.Option("consistent", help="Classifier label: consistent (top-1 = final) or stable (... and never changes)."),
    policy: Optional[str] = typer.Option(None, help="Policy whose threshold to calibrate (Learn-then-Test)."),
    epsilon: float = typer.Option(0.05, help="Tolerated risk."),
    delta: float = typer.Option(0.1, help="Allowed failure probability (confidence 1 - delta)."),
    risk: str = typer.Option("consistency", help="consistency (top-1 differs from the full model) or loss (relative drop of p(correct))."),
    grid: str = typer.Option("0:1:0.01", help="Thresholds to test (tested from the largest down)."),
    min_exit_layer: int = _MIN, param: List[str] = _PARAM, dataset: Optional[str] = _DATASET,
    split: str = typer.Option("validation", help="Calibration split."),
    test_split: str = typer.Option("test", help="Split on which the chosen threshold's risk is reported."),
    seq_len: Optional[int] = _SEQ, max_tokens: Optional[int] = _MAXTOK, batch_size: int = _BS, exit_layers: Optional[str] = _EXITS,
    out: Optional[str] = typer.Option(None, help="Results folder (default results/calibrate-<model>-<policy>)."),
    overwrite: bool = typer.Option(False, help="Replace an existing results folder."),
):
    """Fit learned exit classifiers and/or pick a threshold with a Learn-then-Test guarantee."""
    _quiet()
    from eexit.calibration.calibrate import CalibrateOptions, calibrate as run_ltt, check_options, fit as run_fit, write_calibration
    from eexit.policies.learned import CLASSIFIERS
    from eexit.reporting import prepare_dir
    from eexit.policies.thresholds import parse_thresholds

    names = [n.strip() for n in fit.split(",") if n.strip()] if fit else []
    for n in names:
        CLASSIFIERS.get(n)
    if not names and not policy:
        raise EexitError("nothing to do: give --fit meta,lstm,mlp3 and/or --policy NAME")
    values = parse_thresholds(grid)
    opts = CalibrateOptions(epsilon, delta, risk, values, test_split)
    if policy:
        check_options(opts, policy)
    out = out or f"results/calibrate-{Path(model).name}-{policy or 'fit'}"
    prepare_dir(out, overwrite)
    s = _setup(model, policy or "max-prob", 0.5, min_exit_layer, param, dataset, split, seq_len, max_tokens, batch_size, exit_layers)
    fit_rows = run_fit(model, names, label, s) if names else []
    if policy:
        summary, tested = run_ltt(s, opts, slice(1, None, 2) if names else slice(None))
        write_calibration(out, summary, tested, fit_rows)
        msg = summary.get("message") or (f"threshold {summary['threshold']:.2f}: test risk {summary['test_risk']:.4f} "
                                         f"(epsilon {epsilon}), compute {summary['test_compute_pct']:.1f}%, PPL {summary['test_ppl']:.2f}")
        typer.echo(f"{policy}: {msg} -> {out}")
    else:
        from eexit.reporting import provenance, write_results

        write_results(out, "classifiers", f"Exit classifiers fitted on {split}", fit_rows, provenance({"model": model, "fit": names, "label": label}))
        for r in fit_rows:
            typer.echo(f"{r['classifier']}: held-out accuracy {r['heldout_accuracy']:.3f}, saved {r['saved']}")
app.command("sweep", help="Alias of sweep-threshold.")(sweep_threshold)


def main() -> None:
    try:
        app()
    except EexitError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
