#!/usr/bin/env python3
"""Generate docs/results.md from the committed results/ folder, so that no result table in the
docs is ever copied by hand.

    python scripts/results_doc.py            # (re)write docs/results.md     (make results-doc)
    python scripts/results_doc.py --check    # exit 1 if docs/results.md is out of date
                                             # (the "Run at" commit / versions lines aside)

Every folder under results/ that holds Markdown tables becomes one section: the make target and
the command that wrote it (its provenance.json), its path, the tables with the notes under them
copied from its *.md files, and links to its plots (*.png). The output depends only on the
contents of results/ (sorted, no timestamps), and the file is replaced atomically.
Pure standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = ROOT / "results"
DEFAULT_OUT = ROOT / "docs" / "results.md"

# Top-level results folders in reading order: (folder, section title, what it is).
GROUPS = [
    (
        "demo",
        "Demo: train, calibrate, decode",
        "4-layer weighted-CE GPT-2-style model: CALM's linear exit classifier fitted on it, its "
        "threshold sweep beside the oracle frontier, its Learn-then-Test threshold, and that "
        "threshold decoded against eexit full depth and transformers' generate.",
    ),
    (
        "headroom",
        "Headroom model: train, calibrate, decode",
        "A 12-layer Llama-family LM trained here (weighted CE and LayerSkip compared by their "
        "oracle frontier), the kept one LTT-calibrated and decoded side by side with "
        "transformers, with the measured cost model's prediction.",
    ),
    (
        "seed002",
        "Seed 002, experiments 3 and 4",
        "Auxiliary loss and deep supervision (3 layers, exits after layers 1 and 3) against "
        "3-layer and 1-layer baselines.",
    ),
    (
        "calm_vs_monotonic",
        "CALM vs monotonic confidence measures",
        "Seed 001: CALM's three confidence measures against the three monotonic ones, each at "
        "its Learn-then-Test threshold.",
    ),
    (
        "monotonicity",
        "Monotonicity",
        "Seeds 001, 003 and 004: how the top-1 prediction and its probability evolve layer by "
        "layer.",
    ),
    (
        "t5_translation",
        "T5 EN-FR translation",
        "A small T5 trained here on EN->FR verses; BLEU / compute / tokens/s for CALM's and the "
        "monotonic confidence measures.",
    ),
    (
        "smollm2_tasks",
        "SmolLM2 tasks",
        "Prompted SmolLM2-135M-Instruct (no extra heads) on summarization and open-book QA.",
    ),
    (
        "policy_frontier",
        "Policies against the oracle frontier",
        "Every exit policy calibrated at one epsilon (LTT and FREE's threshold) beside the oracle "
        "frontier: efficiency, exit-location accuracy, ideal and realized speedup.",
    ),
    ("bench", "Benchmarks", "Speed ratios measured side by side in one run."),
]

# The make target that writes each folder (the longest matching prefix wins).
MAKE_TARGETS = {
    "demo": "make demo",
    "headroom": "make headroom",
    "seed002": "make seed002",
    "calm_vs_monotonic": "make calm-vs-monotonic",
    "monotonicity": "make monotonicity",
    "monotonicity/t5-trained": "make monotonicity-t5",
    "monotonicity/t5-en-fr": "make t5-translation",
    "t5_translation": "make t5-translation",
    "smollm2_tasks": "make smollm2-tasks",
    "policy_frontier": "make policy-frontier",
    "bench": "make bench",
}

# Sub-folders shown first within a group, in this order; the rest follow by name.
FIRST_FOLDERS = {
    "demo": ["sweep", "calibration", "decoding"],
    "headroom": ["weighted_ce", "layerskip", "calibration", "calibration-meta", "decoding"],
    "seed002": ["aux", "deep_supervision", "standard_3l", "standard_1l"],
    "monotonicity": ["trained-8l", "smollm2-135m", "t5-trained", "t5-en-fr"],
    "smollm2_tasks": [
        "summarization-saturation",
        "summarization-max-prob",
        "qa-saturation",
        "qa-max-prob",
    ],
}
# Tables shown first in a folder; the rest follow by name.
FIRST_STEMS = ("summary", "comparison", "sweep")
# Suffixes that are not listed as "other files" (tables, their CSV / JSON twins, plots).
KNOWN_SUFFIXES = {".md", ".png", ".csv", ".json"}
WIDTH = 100  # line width of prose and commands (tables keep their own width)
MAX_NOTE_CHARS = 1200  # a longer note paragraph is left in its file
# A wrapped line must not start with a word that Markdown would read as markup (a list marker,
# a heading, a quote, a table row, a setext underline).
# The line naming a folder's commit and versions: a rerun with another commit or package version
# changes it and nothing else, so the staleness check (`--check`) does not compare it.
ENV_PREFIX = "Run at "
RISKY_START = re.compile(r"^([-+*]|#{1,6}|\d{1,9}[.)]|-+|=+)$|^[>|]")


# -- reading --------------------------------------------------------------------------------------


def split_md(text: str) -> tuple[str, list[str], list[str]]:
    """A results .md file -> (title, body lines, provenance lines)."""
    lines = text.splitlines()
    title = ""
    if lines and lines[0].startswith("# "):
        title, lines = lines[0][2:].strip(), lines[1:]
    body, prov = lines, []
    for i, line in enumerate(lines):
        if line.strip() == "## Provenance":
            body, prov = lines[:i], lines[i + 1 :]
            break
    return title, body, prov


def md_command(prov: list[str]) -> str | None:
    """The command recorded in a .md file's own provenance section, if any."""
    for line in prov:
        m = re.match(r"^- (command|made by): `([^`]*)`", line.strip())
        if m:
            return m.group(2)
    return None


def read_provenance(folder: Path) -> dict:
    path = folder / "provenance.json"
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def result_folders(results: Path) -> list[Path]:
    """Every folder under `results` holding a .md table, in reading order."""
    folders = {p.parent for p in results.rglob("*.md") if p.is_file()}
    order = {name: i for i, (name, _, _) in enumerate(GROUPS)}

    def key(folder: Path):
        parts = folder.relative_to(results).parts
        first = FIRST_FOLDERS.get(parts[0], [])
        sub = "/".join(parts[1:])
        rank = -1 if not sub else first.index(sub) if sub in first else len(first)
        return (order.get(parts[0], len(GROUPS)), parts[0], rank, parts)

    return sorted((f for f in folders if f != results), key=key)


def md_files(folder: Path) -> list[Path]:
    files = [p for p in folder.glob("*.md") if p.is_file()]
    first = {stem: i for i, stem in enumerate(FIRST_STEMS)}
    return sorted(files, key=lambda p: (first.get(p.stem, len(FIRST_STEMS)), p.name))


# -- formatting -----------------------------------------------------------------------------------


def wrap(line: str, width: int = WIDTH) -> list[str]:
    """Greedy word wrap of one Markdown prose line (a list item keeps a hanging indent)."""
    indent = "  " if line.startswith("- ") else ""
    words: list[str] = []
    for word in line.split():
        if words and RISKY_START.match(word):
            words[-1] += " " + word  # never break before it
        else:
            words.append(word)
    if not words:
        return []
    out, cur = [], words[0]
    for word in words[1:]:
        if len(cur) + 1 + len(word) <= width:
            cur += " " + word
        else:
            out.append(cur)
            cur = indent + word
    out.append(cur)
    return out


def command_block(command: str, width: int = WIDTH - 4) -> list[str]:
    """A shell command as a fenced block, broken before options with backslash continuations."""
    chunks: list[str] = []  # the program and its arguments, then each option with its values
    for token in command.split():
        if not chunks or token.startswith("-"):
            chunks.append(token)
        else:
            chunks[-1] += " " + token
    lines, cur = [], ""
    for chunk in chunks:
        if cur and len(chunk) + 2 > width:  # an option with a long value: value on its own line
            option, _, value = chunk.partition(" ")
            lines += [cur + " \\", f"  {option} \\"]
            cur = "    " + value
        elif not cur:
            cur = chunk
        elif len(cur) + 1 + len(chunk) <= width:
            cur += " " + chunk
        else:
            lines.append(cur + " \\")
            cur = "  " + chunk
    lines.append(cur)
    return ["```sh", *lines, "```"]


def blocks(lines: list[str]) -> list[tuple[str, list[str]]]:
    """Body lines -> ('table' | 'heading' | 'text', lines) blocks, blank lines dropped."""
    out: list[tuple[str, list[str]]] = []
    for line in lines:
        s = line.rstrip()
        if not s.strip():
            out.append(("blank", []))
            continue
        kind = "table" if s.lstrip().startswith("|") else "heading" if s.startswith("#") else "text"
        if out and out[-1][0] == kind and kind != "heading":
            out[-1][1].append(s)
        else:
            out.append((kind, [s]))
    return [(k, ls) for k, ls in out if k != "blank"]


def slug(title: str) -> str:
    """GitHub's heading anchor for a heading title."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def render_md(
    path: Path, level: int, link: str, folder_command: str | None, seen: set[str]
) -> list[str]:
    """One .md file: its title as a heading, its tables, its notes (each note once per group)."""
    title, body, prov = split_md(path.read_text(encoding="utf-8"))
    out = [f"{'#' * level} {title or path.stem}", ""]
    command = md_command(prov)
    if command and command != folder_command:
        out += [f"From [`{path.name}`]({link}), made by:", "", *command_block(command), ""]
    else:
        out += [f"From [`{path.name}`]({link}).", ""]
    for kind, lines in blocks(body):
        if kind == "table":
            out += [*lines, ""]
        elif kind == "heading":
            hashes, _, text = lines[0].partition(" ")
            out += [f"{'#' * min(6, level + len(hashes) - 1)} {text.strip()}", ""]
        else:
            text = "\n".join(lines)
            if text in seen:
                continue
            seen.add(text)
            if len(text) > MAX_NOTE_CHARS:
                out += [f"(A longer note is in [`{path.name}`]({link}).)", ""]
                continue
            for line in lines:
                out += wrap(line.strip())
            out.append("")
    return out


def environment(prov: dict) -> str | None:
    bits = []
    commit = prov.get("commit")
    if isinstance(commit, str) and commit:
        sha, dirty = commit.partition("+")[::2]
        bits.append(f"commit `{sha[:12]}{'+' + dirty if dirty else ''}`")
    env = prov.get("environment") if isinstance(prov.get("environment"), dict) else {}
    if env.get("torch"):
        bits.append(f"torch {env['torch']}")
    if env.get("transformers"):
        bits.append(f"transformers {env['transformers']}")
    if env.get("cpu_threads"):
        bits.append(f"{env['cpu_threads']} CPU threads")
    if "cuda" in env:
        bits.append(f"CUDA {env['cuda']}" if env["cuda"] else "no GPU")
    return ", ".join(bits) if bits else None


def make_target(rel: str) -> str | None:
    best = None
    for prefix, target in MAKE_TARGETS.items():
        if (rel == prefix or rel.startswith(prefix + "/")) and (
            best is None or len(prefix) > len(best[0])
        ):
            best = (prefix, target)
    return best[1] if best else None


def render(results: Path, out_dir: Path | None = None) -> str:
    """The whole of docs/results.md for the folder `results`; links are relative to `out_dir`
    (default: a `docs` folder beside `results`)."""
    results = Path(results)
    out_dir = Path(out_dir) if out_dir is not None else results.parent / "docs"
    base = Path(os.path.relpath(results, out_dir)).as_posix()
    name = results.name
    folders = result_folders(results)
    titles = {g: (t, d) for g, t, d in GROUPS}
    groups: dict[str, list[Path]] = {}
    for folder in folders:
        groups.setdefault(folder.relative_to(results).parts[0], []).append(folder)

    out = [
        "# Results",
        "",
        "<!-- Generated by scripts/results_doc.py from results/: do not edit by hand.",
        "     Regenerate with `make results-doc` (python scripts/results_doc.py). -->",
        "",
        *wrap(
            f"Every section below is one folder under `{name}/`, written by the command shown "
            "(the folder's `provenance.json`, which also holds the date, the resolved config and "
            "the environment). Each table is also in that folder as CSV and JSON. The tables "
            "and notes are copied from the folder's Markdown files by `scripts/results_doc.py`; "
            "the runs are small models on a 2-core CPU unless said otherwise, so compare rows "
            "within a table rather than absolute levels."
        ),
        "",
    ]
    out += [f"- [{titles.get(g, (g, ''))[0]}](#{slug(titles.get(g, (g, ''))[0])})" for g in groups]
    out.append("")

    for group, members in groups.items():
        title, description = titles.get(group, (group, ""))
        out += [f"## {title}", ""]
        if description:
            out += [*wrap(description), ""]
        seen: set[str] = set()
        for folder in members:
            rel = folder.relative_to(results).as_posix()
            prov = read_provenance(folder)
            command = prov.get("command") if isinstance(prov.get("command"), str) else None
            mds = md_files(folder)
            if command is None:  # no provenance.json: the command its tables name, if they agree
                found = {md_command(split_md(p.read_text(encoding="utf-8"))[2]) for p in mds}
                command = found.pop() if len(found) == 1 else None
            nested = len(members) > 1 or rel != group
            level = 4 if nested else 3
            if nested:
                out += [f"### `{name}/{rel}`", ""]
            intro = f"Folder `{name}/{rel}/`"
            target = make_target(rel)
            if target:
                intro += f", written by `{target}`"
            out += [*wrap(intro + (", command:" if command else ".")), ""]
            if command:
                out += [*command_block(command), ""]
            env = environment(prov)
            if env:  # one line, never wrapped: `--check` leaves it out of the comparison
                out += [f"{ENV_PREFIX}{env}.", ""]
            for md in mds:
                out += render_md(md, level, f"{base}/{rel}/{md.name}", command, seen)
            for png in sorted(folder.glob("*.png")):
                out += [f"![{png.stem}]({base}/{rel}/{png.name})", ""]
            others = sorted(
                p.name for p in folder.iterdir() if p.is_file() and p.suffix not in KNOWN_SUFFIXES
            )
            if others:
                links = ", ".join(f"[`{n}`]({base}/{rel}/{n})" for n in others)
                out += [*wrap(f"Also in this folder: {links}."), ""]
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


def comparable(text: str) -> list[str]:
    """`text` without its environment lines: what `--check` compares."""
    return [line for line in text.splitlines() if not line.startswith(ENV_PREFIX)]


# -- writing --------------------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temp file beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--results",
        type=Path,
        default=DEFAULT_RESULTS,
        help="results folder (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="Markdown file to write (default: %(default)s)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if --out differs from what would be generated",
    )
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        print(f"error: no results folder at {args.results}", file=sys.stderr)
        return 2
    text = render(args.results, args.out.parent)
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else None
        if current is None or comparable(current) != comparable(text):
            state = "is missing" if current is None else "is out of date"
            shown = args.out
            if shown.is_absolute() and shown.is_relative_to(Path.cwd()):
                shown = shown.relative_to(Path.cwd())
            print(
                f"{shown} {state}: run `python scripts/results_doc.py` (make results-doc)",
                file=sys.stderr,
            )
            return 1
        return 0
    write_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
