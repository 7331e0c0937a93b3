import json

import pytest
import torch

from eexit.analysis import monotonicity as mono
from tests.conftest import run_cli


def records(top1_rows, p_rows, k2_rows=None):
    """Hand-made records: top1 [L, N], p_final [L, N], optional rank-2 ids [L, N]."""
    top1 = torch.tensor(top1_rows)
    k2 = torch.tensor(k2_rows) if k2_rows is not None else top1 + 100
    ids = torch.stack([top1, k2], -1)
    probs = torch.stack([torch.tensor(p_rows), torch.tensor(p_rows) / 2], -1)
    return mono.LayerRecords(
        ids, probs, torch.tensor(p_rows), torch.zeros(top1.shape[1], dtype=torch.long)
    )


def test_never_changes_and_equals_final():
    r = records([[1, 5, 7], [2, 5, 8], [2, 6, 7], [2, 6, 7]], [[0.1, 0.2, 0.3]] * 4)
    rows = mono.per_layer_stats(r)
    assert [row["top1_equals_final"] for row in rows] == pytest.approx([100 / 3, 100 / 3, 100, 100])
    # token 0 fixed from layer 2, token 1 from 3, token 2 from 3 (7 -> 8 -> 7)
    assert [row["top1_never_changes_after"] for row in rows] == pytest.approx(
        [0, 100 / 3, 100, 100]
    )
    assert mono.saturation_layer(r.top1 == r.top1[-1:]).tolist() == [2, 3, 3]


def test_probability_curves_and_non_monotonic_tokens():
    p = [
        [0.1, 0.5],
        [0.4, 0.9],
        [0.8, 0.6],
        [0.9, 0.62],
    ]  # token 0 rises; token 1 peaks at layer 2 then drops 0.28
    r = records([[0, 0]] * 4, p)
    rows = mono.per_layer_stats(r)
    assert rows[0]["p_final_mean"] == pytest.approx(0.3)
    assert rows[1]["p_final_std"] == pytest.approx(torch.tensor([0.4, 0.9]).std().item())
    assert [row["monotone_from_here"] for row in rows] == pytest.approx([50, 50, 100, 100])
    nm = mono.non_monotonic_share(r)
    assert nm["peak_before_last_pct"] == 50 and nm["drop_after_peak_gt_0.05_pct"] == 50
    assert nm["monotone_everywhere_pct"] == 50
    assert nm["mean_drop_after_peak"] == pytest.approx(0.14)


def test_topk_saturation_order():
    # token 0: rank 1 fixed at layer 1, rank 2 at layer 3 (in order); token 1: rank 2 fixed before
    # rank 1
    top1 = [[3, 9], [3, 8], [3, 4], [3, 4]]
    k2 = [[5, 6], [6, 6], [7, 6], [7, 6]]
    rows, summary = mono.topk_saturation(records(top1, [[0.5, 0.5]] * 4, k2))
    assert [r["mean_saturation_layer"] for r in rows] == [
        2.0,
        2.0,
    ]  # rank 1: (1 + 3) / 2; rank 2: (3 + 1) / 2
    assert summary["ordered_all_ranks_pct"] == 50.0 and summary["ordered_pairs_pct"] == 50.0


def test_word_start_mask():
    class Tok:
        def convert_ids_to_tokens(self, ids):
            table = {0: "Ġthe", 1: "vable", 2: ",", 3: "▁word", 4: "##ing", 5: "Ċ"}
            return [table[i] for i in ids]

    assert mono.word_start_mask(Tok(), torch.tensor([0, 1, 2, 3, 4, 5])).tolist() == [
        True,
        False,
        True,
        True,
        False,
        True,
    ]


def test_analyze_command_on_a_trained_checkpoint(tiny_checkpoint, tmp_path):
    out = tmp_path / "mono"
    code, stdout, err = run_cli(
        "analyze-monotonicity",
        "--model",
        str(tiny_checkpoint),
        "--model",
        str(tiny_checkpoint),
        "--label",
        "a",
        "--label",
        "b",
        "--max-tokens",
        "1024",
        "--out",
        str(out),
    )
    assert code == 0, err
    for f in (
        "fig1_fraction_no_change.png",
        "fig2_mean_top1.png",
        "fig3_examples.png",
        "topk_saturation.png",
        "subword_exits.png",
        "sublayer.png",
        "per_layer.csv",
        "summary.md",
        "examples.json",
    ):
        assert (out / f).is_file(), f
    per_layer = json.loads((out / "per_layer.json").read_text())
    a = [r for r in per_layer if r["model"] == "a"]
    b = [r for r in per_layer if r["model"] == "b"]
    assert len(a) == 3 and a == [{**r, "model": "a"} for r in b]  # same model twice -> same numbers
    assert a[-1]["top1_equals_final"] == 100.0 and a[-1]["top1_never_changes_after"] == 100.0
    assert all(x["top1_never_changes_after"] <= x["top1_equals_final"] + 1e-9 for x in a)
    sub = json.loads((out / "sublayer.json").read_text())
    assert [r["point"] for r in sub if r["model"] == "a"][:6] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    ex = json.loads((out / "examples.json").read_text())["a"]
    assert len(ex) == 3 and len(ex[0]["layers"]) == 3 and len(ex[0]["layers"][0]["top"]) == 3


def test_sublayer_attention_point_matches_a_manual_split(tiny_checkpoint):
    from eexit.models.loading import load_model

    model, _, _ = load_model(str(tiny_checkpoint))
    x = torch.randint(0, 200, (1, 12))
    rec = mono.forward_records(model, x, x, 3)
    block = model.parts.layers[0]
    with torch.no_grad():
        h0 = model.parts.base.wte(x) + model.parts.base.wpe(torch.arange(12))[None]
        mid = h0 + block.attn(block.ln_1(h0))[0]
        top = model.exit_logits(mid, 1).argmax(-1).reshape(-1)
    assert torch.equal(rec.sub_top1[0], top)


def test_analyze_bad_input(tiny_checkpoint, tmp_path):
    code, _, err = run_cli(
        "analyze-monotonicity",
        "--model",
        str(tiny_checkpoint),
        "--label",
        "a",
        "--label",
        "b",
        "--out",
        str(tmp_path / "x"),
    )
    assert code == 2 and "one per --model" in err
