"""Convert results tables written before the tidy-JSON schema to it, numbers unchanged.

Old: <name>.json = {"title", "rows", ...provenance}. New: <name>.json = the rows as a list of
records (`pandas.read_json` reads it), its title, command, commit and config under "tables" in
the folder's provenance.json (written from the old file's provenance when the folder has none).
Each converted folder's provenance records the conversion ("converted_by"), so a table never
claims a command it was not made by. Idempotent: files already in the new schema are left alone.

    python scripts/tidy_results.py [results]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from eexit.files import atomic_write
from eexit.reporting import table_provenance

SKIP = {"provenance.json", "complete.json"}
COMMAND = "python scripts/tidy_results.py"


def convert(path: Path) -> bool:
    data = json.loads(path.read_text())
    if not (isinstance(data, dict) and "rows" in data and "title" in data):
        return False
    rows, title = data.pop("rows"), data.pop("title")
    prov_path = path.parent / "provenance.json"
    prov = json.loads(prov_path.read_text()) if prov_path.is_file() else data
    prov.setdefault("tables", {})[path.stem] = table_provenance(title, data)
    prov["converted_by"] = COMMAND
    # provenance first: a run killed in between leaves the old file, which holds it all and is
    # converted again on the next run
    atomic_write(prov_path, json.dumps(prov, indent=2, default=str))
    atomic_write(path, json.dumps(rows, indent=2, default=str))
    return True


def main(root: str = "results") -> None:
    done = [p for p in sorted(Path(root).rglob("*.json")) if p.name not in SKIP and convert(p)]
    for p in done:
        print(f"converted {p}")
    print(f"{len(done)} table(s) converted")


if __name__ == "__main__":
    main(*sys.argv[1:])
