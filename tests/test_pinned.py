"""constraints.txt (the tested versions) and the provenance's "pinned" flag: a venv installed by
`make install` (PIN=1, the default: it leaves .eexit-pinned in the venv) runs exactly the pinned
set, and a version that differs is named."""

from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from eexit.pinned import CONSTRAINTS, mismatches, pinned_state, read_constraints

ROOT = Path(__file__).resolve().parents[1]


def test_the_constraints_pin_every_dependency_of_the_project():
    pins = read_constraints()
    assert CONSTRAINTS == ROOT / "constraints.txt"
    for name in ("torch", "transformers", "accelerate", "datasets", "typer", "peft", "gensim"):
        assert name in pins, name


@pytest.mark.skipif(
    not (Path(sys.prefix) / ".eexit-pinned").is_file(),
    reason="this venv was not installed by `make install` with PIN=1",
)
def test_a_pinned_install_runs_the_pinned_versions():
    assert mismatches(read_constraints()) == {}
    assert pinned_state() == {"pinned": True}


def test_a_different_version_is_named(tmp_path):
    path = tmp_path / "constraints.txt"
    path.write_text(
        f"# comment\ntorch=={version('torch')}\npyyaml==0.0.1\nno-such-package-x==1.0\n"
    )
    state = pinned_state(path)
    assert state["pinned"] is False
    assert set(state["differs"]) == {"pyyaml", "no-such-package-x"}
    assert state["differs"]["no-such-package-x"] == "1.0 pinned, absent installed"
    assert pinned_state(tmp_path / "missing.txt") == {"pinned": None}
