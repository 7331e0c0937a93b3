"""The headroom model, end to end (make headroom): train -> frontier -> calibrate -> decode.

    python experiments/headroom/run.py --out results/headroom --overwrite

1. Trains the two variants of experiments/headroom/ (a 12-layer Llama-family LM whose LM head
   costs 1.25 blocks; CALM's weighted CE, and LayerSkip's loss + layer dropout) side by side
   unless their checkpoints exist (`--retrain` trains again).
2. Sweeps each with `eexit sweep` (max-prob over a shortlist of the first scored exit's top-K
   tokens): the oracle frontier, the per-threshold table.
3. Compares the variants (comparison.md: final-layer perplexity, per-exit perplexity, the
   frontier at 100 / 98 % agreement) and keeps the one with the larger ideal speedup at 98 %
   agreement; training curves of both (training.png, per-exit validation CE against the step).
4. Calibrates the kept model's threshold by Learn-then-Test (`eexit calibrate`, token level,
   epsilon 0.05, delta 0.1) for two policies: max-prob over the shortlist, and CALM's linear
   classifier (meta, fitted first).
5. Decodes side by side (benchmarks/adapted_decoding.py): transformers greedy `generate`, eexit
   full depth, eexit early exit at each calibrated threshold (with the measured cost model's
   predicted speedup), self-speculative decoding and transformers `assistant_early_exit`, at
   batch 1 and 8.

Every step is an eexit command (shown in the log); the results folder is staged and swapped in
whole, so a run that dies leaves the previous one as it was. `--set KEY=VALUE` passes training
overrides (the tests' dry run: tiny sizes, a few steps)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from eexit.errors import EexitError  # noqa: E402
from eexit.files import atomic_write, output_folder, run_script  # noqa: E402
from eexit.reporting import log, provenance, save_figure, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
VARIANTS = ("weighted_ce", "layerskip")
POLICY = ["--policy", "max-prob", "--param", "shortlist=32"]  # the sweeps' policy
# the calibrated policies, each decoded: max-prob over a 32-token shortlist, and CALM's linear
# classifier on the hidden state (fitted first: no LM head in its decisions)
CALIBRATED = {
    "calibration": POLICY,
    "calibration-meta": ["--fit", "meta", "--policy", "meta"],
}


def eexit(*args: str) -> None:
    """One eexit command, as a user would type it; a failure ends the run with its message."""
    cmd = [sys.executable, "-m", "eexit.cli", *args]
    log("$ eexit " + shlex.join(args))
    done = subprocess.run(cmd, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise EexitError(f"`eexit {shlex.join(args)}` failed (exit {done.returncode})")


def train_side_by_side(runs: dict[str, list[str]]) -> None:
    """`eexit train` for each variant at once, the CPU threads split between them (two 1-thread
    trainings on 2 cores run faster together than one after the other at 2 threads); each one's
    output goes to <checkpoint>.log beside its checkpoint."""
    threads = max(1, (os.cpu_count() or 1) // max(1, len(runs)))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = {}
    for ckpt, args in runs.items():
        log(f"$ OMP_NUM_THREADS={threads} eexit " + shlex.join(args) + f"  (log: {ckpt}.log)")
        out = open(f"{ckpt}.log", "w", encoding="utf-8")  # noqa: SIM115 (closed below)
        cmd = [sys.executable, "-m", "eexit.cli", *args]
        procs[ckpt] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=out), out)
    shown: dict = {}
    while any(proc.poll() is None for proc, _ in procs.values()):
        time.sleep(2)
        for ckpt in procs:  # progress: each training's newest step line, as it changes
            lines = [ln for ln in last_lines(f"{ckpt}.log") if " step " in ln]
            if lines and shown.get(ckpt) != lines[-1]:
                shown[ckpt] = lines[-1]
                log(f"{Path(ckpt).name}: {lines[-1].split('] ', 1)[-1]}")
    failed = []
    for ckpt, (proc, out) in procs.items():
        if proc.returncode != 0:
            failed.append(f"{ckpt} (exit {proc.returncode}, see {ckpt}.log)")
        out.close()
    if failed:
        raise EexitError("training failed: " + ", ".join(failed))


def last_lines(path: str, size: int = 4096) -> list[str]:
    """The lines of the last `size` bytes of a log file."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - size))
        return f.read().decode("utf-8", "replace").splitlines()


def python(script: str, *args: str) -> None:
    log(f"$ python {script} " + shlex.join(args))
    done = subprocess.run([sys.executable, script, *args], cwd=ROOT, check=False)
    if done.returncode != 0:
        raise EexitError(f"`python {script}` failed (exit {done.returncode})")


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def training_log(ckpt: Path) -> list[dict]:
    lines = (ckpt / "train_log.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def comparison_rows(ckpts: dict[str, Path], sweeps: dict[str, Path]) -> list[dict]:
    rows = []
    for variant, ckpt in ckpts.items():
        metrics = read_json(ckpt / "metrics.json")
        ppl = {int(k.split("@")[1]): v for k, v in metrics.items() if k.startswith("val_ppl@")}
        frontier = {f["agreement_pct"]: f for f in read_json(sweeps[variant] / "frontier.json")}
        L = max(ppl)
        rows.append(
            {
                "variant": variant,
                "loss": read_json(ckpt / "eexit.json")["train_config"]["loss"]["name"],
                "val_ppl_last": ppl[L],
                "val_ppl_first": ppl[min(ppl)],
                "val_ppl_middle": ppl[max(1, L // 2)],
                "oracle_compute_pct_100": frontier[100.0]["compute_pct"],
                "oracle_speedup_100": frontier[100.0]["ideal_speedup"],
                "oracle_compute_pct_98": frontier[98.0]["compute_pct"],
                "oracle_speedup_98": frontier[98.0]["ideal_speedup"],
                "head_layers": frontier[100.0]["head_layers"],
            }
        )
    return rows


def exit_rows(ckpts: dict[str, Path]) -> list[dict]:
    """Validation perplexity at every exit of every variant (the end of training)."""
    rows = []
    for variant, ckpt in ckpts.items():
        metrics = read_json(ckpt / "metrics.json")
        for key, value in sorted(metrics.items(), key=lambda kv: kv[0]):
            if key.startswith("val_ppl@"):
                rows.append({"variant": variant, "exit": int(key.split("@")[1]), "val_ppl": value})
    return sorted(rows, key=lambda r: (r["variant"], r["exit"]))


def plot_training(ckpts: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ckpts), figsize=(6 * len(ckpts), 4), squeeze=False)
    for ax, (variant, ckpt) in zip(axes[0], ckpts.items()):
        records = [r for r in training_log(ckpt) if any(k.startswith("val_ce@") for k in r)]
        exits = sorted(
            {int(k.split("@")[1]) for r in records for k in r if k.startswith("val_ce@")}
        )
        for e in exits:
            pts = [(r["step"], r[f"val_ce@{e}"]) for r in records if f"val_ce@{e}" in r]
            ax.plot(*zip(*pts), marker="o", label=f"exit {e}")
        ax.set_title(variant)
        ax.set_xlabel("step")
        ax.set_ylabel("validation CE")
        ax.legend(fontsize=6, ncol=2)
    save_figure(fig, path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/headroom", help="results folder")
    ap.add_argument("--checkpoints", default="checkpoints", help="where the models are kept")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of the variants")
    ap.add_argument("--set", action="append", default=[], help="training override KEY=VALUE")
    ap.add_argument("--retrain", action="store_true", help="train even if a checkpoint exists")
    ap.add_argument("--thresholds", default="0.1:0.9:0.1", help="sweep thresholds")
    ap.add_argument("--max-tokens", type=int, default=0, help="sweep / calibrate token cap")
    ap.add_argument("--prompts", type=int, default=8, help="decoding prompts")
    ap.add_argument("--new", type=int, default=64, help="tokens decoded per prompt")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per decoder")
    ap.add_argument(
        "--drafts",
        default="auto,2:4",
        help="self-spec drafts layer:length,... (auto: chosen by the measured cost model)",
    )
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    a = ap.parse_args()

    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise EexitError(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    sets = [x for s in a.set for x in ("--set", s)]
    cap = ["--max-tokens", str(a.max_tokens)] if a.max_tokens else []
    ckpts = {v: Path(a.checkpoints) / f"headroom-{v}" for v in variants}

    with output_folder(a.out, a.overwrite) as stage:
        runs = {
            ckpt: ["train", "--config", (HERE / f"{v}.yaml").relative_to(ROOT).as_posix(),
                   "--out", str(ckpt), "--overwrite", *sets]
            for v, ckpt in ckpts.items()
            if a.retrain or not (ckpt / "model.safetensors").is_file()
        }  # fmt: skip
        if runs:
            Path(a.checkpoints).mkdir(parents=True, exist_ok=True)
            train_side_by_side(runs)
        sweeps = {v: stage / v for v in variants}
        for v, ckpt in ckpts.items():
            eexit("sweep", "--model", str(ckpt), *POLICY, "--thresholds", a.thresholds,
                  *cap, "--out", str(sweeps[v]), "--overwrite")  # fmt: skip

        rows = comparison_rows(ckpts, sweeps)
        best = max(rows, key=lambda r: r["oracle_speedup_98"])
        config = {
            **vars(a),
            "checkpoints": {v: str(p) for v, p in ckpts.items()},
            "chosen": best["variant"],
        }
        prov = provenance(config)
        write_results(
            stage,
            "comparison",
            "Headroom model: the two training recipes against their oracle frontier",
            rows,
            prov,
            notes=(
                f"Kept: **{best['variant']}** (the larger ideal speedup at 98 % agreement). "
                "Perplexities on the validation split at the end of training; the frontier on "
                "the test split (its sweep folder). Ideal speedup = (L + head) / (mean exit + "
                "head), head in block-equivalents.\n"
            ),
        )
        write_results(stage, "exits", "Validation perplexity at every exit", exit_rows(ckpts), prov)
        plot_training(ckpts, stage / "training.png")

        chosen = ckpts[best["variant"]]
        for folder, policy in CALIBRATED.items():
            eexit("calibrate", "--model", str(chosen), *policy, "--epsilon", "0.05",
                  "--delta", "0.1", *cap, "--out", str(stage / folder), "--overwrite")  # fmt: skip
        python("benchmarks/adapted_decoding.py", "--model", str(chosen),
               "--calibrated", ",".join(str(stage / f) for f in CALIBRATED),
               "--prompts", str(a.prompts),
               "--new", str(a.new), "--reps", str(a.reps), "--drafts", a.drafts,
               "--out", str(stage / "decoding"))  # fmt: skip
        name_the_destination(stage, Path(a.out))


def name_the_destination(stage: Path, out: Path) -> None:
    """The steps' own provenance names the staging folder they wrote into: name the folder the
    files end up in (`--out`) instead, before the swap."""
    for path in stage.rglob("*"):
        if path.suffix in (".md", ".json", ".csv") and path.is_file():
            text = path.read_text(encoding="utf-8")
            if str(stage) in text:
                atomic_write(path, text.replace(str(stage), str(out)))


if __name__ == "__main__":
    run_script(main)  # bad input or a failed step: one line, exit code 2
