"""Compute % of `evaluate --generate`: in self-spec mode the per-sample rows and the total are
one measure (the total is the token-weighted mean of the samples) and count the work done:
every drafted position through all layers plus its draft head, and a verifier head at every
rejected position."""

import pytest
import torch

from eexit.evaluation.generation import GenerationOptions, compare
from eexit.evaluation.records import layer_macs
from eexit.models.decoding import EarlyExitDecoder
from eexit.models.speculative import SelfSpeculativeDecoder
from tests.helpers import tiny


@pytest.mark.parametrize("draft_vocab", [None, 10])
def test_self_spec_compute_per_sample_and_total_count_the_work_done(draft_vocab):
    model = tiny(layers=4)
    torch.manual_seed(1)
    prompts = torch.randint(1, 97, (3, 8))
    new, D, k = 12, 3, 1
    g = GenerationOptions(
        prompts=3, prompt_len=8, max_new_tokens=new, batch_size=3, mode="self-spec", rounds=3
    )
    vocab = torch.arange(draft_vocab) if draft_vocab else None
    decoder = SelfSpeculativeDecoder(model, k, D, vocab)
    rows, total = compare(
        model, decoder, EarlyExitDecoder(model, None, "full"), prompts, g, None, 0
    )

    L, d, V = model.num_layers, model.hidden_size, model.vocab_size
    lm = layer_macs(model, 8 + new / 2)
    draft_head, full_head = d * (draft_vocab or V) / lm, d * V / lm
    cycles = decoder.row_cycles.float()  # one batch: every row's cycles of the last round
    # the statistics count the 3 timed rounds (the same greedy decoding), not the warm-up
    assert int(cycles.sum()) * 3 == decoder.stats.cycles
    positions, emitted = cycles * D, new - 1  # the first token comes from the prefill
    work = positions * (L + draft_head) + (positions - emitted) * full_head
    expected = (100 * work / (emitted * L)).tolist()
    assert [r["compute_pct"] for r in rows] == pytest.approx(expected, rel=1e-6)
    assert all(e > 100 for e in expected)  # more arithmetic than full depth, never 100 % flat
    assert total["compute_pct"] == pytest.approx(sum(expected) / 3, rel=1e-6)
    assert total["agreement_pct"] == 100.0  # greedy self-speculation is lossless
    accepted_all = [r for r in rows if r["mean_exit_layer"] == k]  # every draft kept
    for r in accepted_all:  # 11 tokens in cycles of 3: 4 cycles, 12 positions, 1 spare head
        assert r["compute_pct"] == pytest.approx(
            100 * (12 * (L + draft_head) + full_head) / (11 * L), rel=1e-6
        )


def test_early_exit_compute_is_the_same_measure_per_sample_and_in_total():
    from eexit.policies import make_policy

    model = tiny(layers=4)
    torch.manual_seed(2)
    prompts = torch.randint(1, 97, (4, 8))
    g = GenerationOptions(prompts=4, prompt_len=8, max_new_tokens=10, batch_size=2)
    decoder = EarlyExitDecoder(model, make_policy("static", layer=2), "propagate")
    rows, total = compare(
        model, decoder, EarlyExitDecoder(model, None, "full"), prompts, g, None, 0
    )
    mean = sum(r["compute_pct"] for r in rows) / len(rows)
    assert total["compute_pct"] == pytest.approx(mean, rel=1e-6)
    assert 50 < total["compute_pct"] < 100  # layers 1-2, then the K/V projections of 3-4


def test_early_exit_is_timed_against_full_depth_and_transformers_with_the_cost_models_prediction(
    tmp_path, monkeypatch
):
    from eexit.policies import make_policy

    monkeypatch.setenv("EEXIT_CACHE", str(tmp_path))  # the cost model's cache: this test's own
    model = tiny(arch="llama", layers=4)
    torch.manual_seed(3)
    prompts = torch.randint(1, 97, (2, 6))
    g = GenerationOptions(prompts=2, prompt_len=6, max_new_tokens=6, rounds=2)
    decoder = EarlyExitDecoder(model, make_policy("max-prob", 0.02, shortlist=8), "propagate")
    rows, total = compare(
        model, decoder, EarlyExitDecoder(model, None, "full"), prompts, g, None, 0
    )
    for key in ("speedup", "speedup_vs_transformers", "predicted_speedup"):
        assert total[key] > 0, key
    assert total["speedup_ci95_low"] is not None  # 2 rounds: an interval
    assert total["predicted_over_measured"] == pytest.approx(
        total["predicted_speedup"] / total["speedup"]
    )
    assert total["mean_exit_layer"] < 4  # it did exit early
    assert list(tmp_path.rglob("*.json"))  # the measured costs were cached
    g1 = GenerationOptions(prompts=2, prompt_len=6, max_new_tokens=6, rounds=1)
    _, one = compare(model, decoder, EarlyExitDecoder(model, None, "full"), prompts, g1, None, 0)
    assert one["speedup_ci95_low"] is None and one["agreement_pct"] == total["agreement_pct"]
