"""Results as tidy data: one schema across commands, provenance with relative paths, versions,
the commit of the eexit install and the command that trained the model."""

import json
import math
import shutil

import pandas
import pytest

from eexit.errors import EexitError
from eexit.reporting import check_finite, environment, relative
from tests.conftest import run_cli


def test_provenance_is_relative_versioned_and_names_the_training_command(
    tiny_checkpoint, tmp_path, monkeypatch
):
    shutil.copytree(tiny_checkpoint, tmp_path / "checkpoints" / "tiny")
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(
        "sweep",
        "-m",
        str(tmp_path / "checkpoints" / "tiny"),
        "--thresholds",
        "0.5,0.9",
        "--max-tokens",
        "256",
        "--out",
        str(tmp_path / "results" / "s"),
    )
    assert code == 0, err
    data = json.loads((tmp_path / "results" / "s" / "provenance.json").read_text())
    assert data["config"]["model"] == "checkpoints/tiny"  # relative to the project
    assert str(tmp_path) not in data["command"] and "--out results/s" in data["command"]
    assert data["config"]["trained_by"].startswith("eexit train")
    env = data["environment"]
    assert all(env[k] for k in ("eexit", "torch", "transformers", "accelerate", "datasets"))
    assert data["commit"] != "unknown"  # the repository of the eexit install, not of cwd
    rows = pandas.read_json(tmp_path / "results" / "s" / "sweep.json")  # tidy: records
    assert len(rows) == 2 and rows["threshold"].tolist() == [0.5, 0.9]
    assert rows["threshold"].dtype == float and rows["cost_pct"].notna().all()
    row = rows.iloc[0]
    assert row["threshold"] == 0.5 and row["policy"] == "max-prob"
    assert row["dataset"] == "wiki-gensim" and "cost_pct" in row
    assert set(environment()) >= {"eexit", "accelerate", "datasets"}


def test_relative_keeps_paths_outside_the_project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert relative({"a": [f"{tmp_path}/x/y", "/elsewhere/z"]}) == {"a": ["x/y", "/elsewhere/z"]}


def test_nan_rows_are_errors_never_tables():
    check_finite([{"ppl": 3.0}], "t")
    with pytest.raises(EexitError, match="ppl is nan"):
        check_finite([{"threshold": 0.5, "ppl": math.nan}], "sweep")


def test_old_result_tables_convert_to_records_with_their_provenance(tmp_path):
    """scripts/tidy_results.py: {"title", "rows", ...provenance} -> records + provenance.json,
    numbers unchanged, each table's own command kept; running it again changes nothing."""
    from scripts.tidy_results import main as tidy

    folder = tmp_path / "bench"
    folder.mkdir()
    rows = [{"threshold": 0.5, "ppl": 12.25}, {"threshold": 0.9, "ppl": 11.5}]
    for name, cmd in (("a", "bench.py"), ("b", "bench_generation.py")):
        old = {"title": f"table {name}", "rows": rows, "command": cmd, "config": {"k": name}}
        (folder / f"{name}.json").write_text(json.dumps(old))
    (folder / "provenance.json").write_text(json.dumps({"command": "bench_generation.py"}))
    tidy(str(tmp_path))
    assert pandas.read_json(folder / "a.json")["ppl"].tolist() == [12.25, 11.5]
    prov = json.loads((folder / "provenance.json").read_text())
    assert prov["tables"]["a"] == {"title": "table a", "command": "bench.py", "config": {"k": "a"}}
    assert prov["tables"]["b"]["command"] == "bench_generation.py"
    assert prov["converted_by"] == "python scripts/tidy_results.py"
    before = {p.name: p.read_text() for p in folder.iterdir()}
    tidy(str(tmp_path))
    assert {p.name: p.read_text() for p in folder.iterdir()} == before


def test_thresholds_are_shown_with_the_digits_they_were_given():
    from eexit.reporting import markdown_table

    rows = [{"threshold": 0.9995, "ppl": 12.3456}, {"threshold": 0.5, "ppl": 1.0}]
    table = markdown_table(rows)
    assert "| 0.9995 | 12.35 |" in table  # not "1": the rows would look identical
    assert "| 0.5 | 1.00 |" in table
