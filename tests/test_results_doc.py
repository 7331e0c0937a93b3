"""docs/results.md is generated from results/ by scripts/results_doc.py: the committed file must
be what the script writes from the committed results (so a results change committed without
`make results-doc` fails), and the script must really read the tables (editing one changes the
output).

What is compared is what git holds at HEAD, not the working tree: a `make` target that regenerates
a results folder (`make demo` rewrites results/demo) must not make the test command fail, so the
two set-up commands pass in either order. Outside a git checkout the working tree is compared."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import subprocess
import tarfile
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "results_doc.py"


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, check=False, timeout=60
    )


@pytest.fixture(scope="module")
def committed(tmp_path_factory) -> Path:
    """A folder holding HEAD's results/ and docs/results.md (the working tree's outside git)."""
    if _git("rev-parse", "--verify", "HEAD").returncode != 0:
        return ROOT
    changed = _git("status", "--porcelain", "--", "results", "docs/results.md").stdout.decode()
    if changed.strip():
        warnings.warn(
            "results/ or docs/results.md differ from HEAD (a make target regenerated them?): "
            "the doc is checked against the committed results; `make results-doc` refreshes it",
            stacklevel=1,
        )
    archive = _git("archive", "--format=tar", "HEAD", "results", "docs/results.md")
    assert archive.returncode == 0, archive.stderr.decode()
    out = tmp_path_factory.mktemp("committed")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(out, filter="data")
    return out


@pytest.fixture(scope="module")
def results_doc():
    spec = importlib.util.spec_from_file_location("results_doc", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_results_doc_is_up_to_date(results_doc, committed):
    doc = (committed / "docs" / "results.md").read_text(encoding="utf-8")
    generated = results_doc.render(committed / "results", committed / "docs")
    assert generated == doc, "docs/results.md is stale: run `make results-doc`"


def test_a_rerun_with_another_commit_or_version_is_not_stale(results_doc, committed, tmp_path):
    """The "Run at" line changes with every rerun; `--check` does not compare it, while any
    other change (a number) still makes the doc stale."""
    results = tmp_path / "results"
    shutil.copytree(committed / "results" / "demo", results / "demo")
    out = tmp_path / "docs" / "results.md"
    args = ["--results", str(results), "--out", str(out)]
    assert results_doc.main(args) == 0
    prov = results / "demo" / "provenance.json"
    text = prov.read_text()
    rerun = json.loads(text)
    rerun["commit"] = "0123456789abcdef"
    rerun.setdefault("environment", {})["transformers"] = "99.0.0"
    prov.write_text(json.dumps(rerun))
    assert results_doc.render(results, out.parent) != out.read_text()  # the line did change
    assert "Run at commit `0123456789ab`" in results_doc.render(results, out.parent)
    assert results_doc.main([*args, "--check"]) == 0
    table = results / "demo" / "sweep" / "sweep.md"
    table.write_text(table.read_text().replace("| 0.05 |", "| 0.05 | 1 |", 1))
    assert results_doc.main([*args, "--check"]) == 1


def test_editing_a_table_changes_the_doc(results_doc, committed, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(committed / "results" / "demo", results / "demo")
    before = results_doc.render(results)
    table = results / "demo" / "sweep" / "sweep.md"
    row = next(ln for ln in table.read_text().splitlines() if ln.startswith("| 0.05 |"))
    cell = row.split("|")[2].strip()  # the PPL at threshold 0.05, as committed
    assert f"| 0.05 | {cell} |" in before
    assert "![sweep](../results/demo/sweep/sweep.png)" in before
    assert "eexit sweep --model checkpoints/demo" in before

    table.write_text(table.read_text().replace(f"| 0.05 | {cell} |", "| 0.05 | 999.99 |"))
    after = results_doc.render(results)
    assert after != before
    assert "| 0.05 | 999.99 |" in after and f"| 0.05 | {cell} |" not in after


def test_check_and_atomic_write(results_doc, committed, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(committed / "results" / "demo", results / "demo")
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
