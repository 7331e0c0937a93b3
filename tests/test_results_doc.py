"""docs/results.md is generated from results/ by scripts/results_doc.py: the committed file must
be what the script writes (so a results change without `make results-doc` fails), and the
script must really read the tables (editing one changes the output)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "results_doc.py"


@pytest.fixture(scope="module")
def results_doc():
    spec = importlib.util.spec_from_file_location("results_doc", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_results_doc_is_up_to_date(results_doc):
    committed = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    generated = results_doc.render(ROOT / "results", ROOT / "docs")
    assert generated == committed, "docs/results.md is stale: run `make results-doc`"


def test_editing_a_table_changes_the_doc(results_doc, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(ROOT / "results" / "demo", results / "demo")
    before = results_doc.render(results)
    table = results / "demo" / "sweep.md"
    row = next(ln for ln in table.read_text().splitlines() if ln.startswith("| 0.05 |"))
    cell = row.split("|")[2].strip()  # the PPL at threshold 0.05, as committed
    assert f"| 0.05 | {cell} |" in before
    assert "![sweep](../results/demo/sweep.png)" in before
    assert "eexit sweep --model checkpoints/demo" in before

    table.write_text(table.read_text().replace(f"| 0.05 | {cell} |", "| 0.05 | 999.99 |"))
    after = results_doc.render(results)
    assert after != before
    assert "| 0.05 | 999.99 |" in after and f"| 0.05 | {cell} |" not in after


def test_check_and_atomic_write(results_doc, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(ROOT / "results" / "demo", results / "demo")
    out = tmp_path / "docs" / "results.md"
    args = ["--results", str(results), "--out", str(out)]

    assert results_doc.main([*args, "--check"]) == 1  # missing
    assert results_doc.main(args) == 0
    assert results_doc.main([*args, "--check"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["results.md"]  # no temp file left

    out.write_text(out.read_text() + "hand edit\n")
    capsys.readouterr()
    assert results_doc.main([*args, "--check"]) == 1
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "out of date" in message
