"""How long the command line takes to answer before any work: `eexit --version`, `eexit --help`
and a command's `--help`, each run as a fresh process, as a user types them.

They must answer in well under a second, so the CLI imports torch, transformers and datasets only
inside the commands that run something (help texts read the registered names from the source,
`eexit.names`). This row is the measurement behind that promise; a timed unit test would flake
on a busy machine, a benchmark row says what it measured, where and when.

    python benchmarks/cli_startup.py --out results/bench --runs 10
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from eexit.reporting import provenance, write_results

COMMANDS = [
    ["--version"],
    ["--help"],
    ["evaluate", "--help"],
    ["train", "--help"],
]
PROBE = "import sys, eexit.cli; print(any(m in sys.modules for m in ('torch', 'transformers')))"


def eexit_command() -> list[str]:
    """The installed `eexit` script beside this interpreter (what a user runs), else the module."""
    script = Path(sys.executable).parent / "eexit"
    if script.is_file():
        return [str(script)]
    found = shutil.which("eexit")
    return [found] if found else [sys.executable, "-m", "eexit.cli"]


def time_once(argv: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.strip()[:300]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/bench")
    ap.add_argument("--runs", type=int, default=10, help="Fresh processes per command.")
    args = ap.parse_args()
    if args.runs < 1:
        raise SystemExit("--runs must be >= 1")
    exe = eexit_command()
    time_once([sys.executable, "-c", "pass"])  # warm the file cache once, untimed
    rows = []
    baseline = [time_once([sys.executable, "-c", "pass"]) for _ in range(args.runs)]
    rows.append(row("python -c pass (interpreter start)", baseline))
    for cmd in COMMANDS:
        times = [time_once(exe + cmd) for _ in range(args.runs)]
        rows.append(row("eexit " + " ".join(cmd), times))
    heavy = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    notes = (
        f"Wall-clock seconds of {args.runs} fresh processes per command (median, min, max), "
        "on this machine as it was (other work running makes them longer, never shorter). "
        "Importing eexit.cli imports torch or transformers: "
        f"{heavy.stdout.strip() or heavy.stderr.strip()[:200]}.\n"
    )
    config = {"runs": args.runs, "executable": Path(exe[0]).name, "commands": COMMANDS}
    title = "CLI start-up: --version and --help before any heavy import"
    write_results(args.out, "cli_startup", title, rows, provenance(config), notes=notes)
    for r in rows:
        print(f"{r['command']:<40} median {r['median_s']:.3f} s  max {r['max_s']:.3f} s")


def row(command: str, times: list[float]) -> dict:
    return {
        "command": command,
        "runs": len(times),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "under_1s": max(times) < 1.0,
    }


if __name__ == "__main__":
    main()
