"""Whether this process runs on the tested versions of eexit's dependencies.

`constraints.txt` at the project root lists the version of every package the tests passed with
(`make lock` writes it from the venv; `make install` installs it by default). Provenance records
whether the running environment matches it, so a table made on other versions says so."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def read_constraints(path: Path = CONSTRAINTS) -> dict[str, str]:
    """name -> pinned version of every `name==version` line (comments and blanks skipped)."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = PIN.match(line.strip())
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def mismatches(pins: dict[str, str]) -> dict[str, tuple[str, str | None]]:
    """name -> (pinned, installed) for every pinned package installed at another version (None:
    not installed)."""
    out = {}
    for name, want in pins.items():
        try:
            have = version(name)
        except PackageNotFoundError:
            have = None
        if have != want:
            out[name] = (want, have)
    return out


def pinned_state(path: Path = CONSTRAINTS) -> dict:
    """For provenance: {"pinned": True / False / None (no constraints file), "differs": {...}}."""
    if not path.is_file():
        return {"pinned": None}
    differs = mismatches(read_constraints(path))
    state: dict = {"pinned": not differs}
    if differs:
        state["differs"] = {
            n: f"{w} pinned, {h or 'absent'} installed" for n, (w, h) in differs.items()
        }
    return state
