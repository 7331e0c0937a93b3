"""The measured decoding cost model (eexit/evaluation/costs.py): predicted step time is the sum
of its measured parts for a given exit pattern, the full-depth pattern predicts the measured
full step (overhead is what the parts do not explain), and the cache is keyed on content (device,
dtype, batch, weights). No timing is asserted: only how the measured numbers are combined."""

from __future__ import annotations

import pytest
import torch

from eexit.evaluation.costs import DecodeCosts, cache_key, measure_costs
from eexit.policies import make_policy
from tests.helpers import tiny


def costs_of(seconds: dict[str, dict[int, float]], L=4, batch=4, reads_head=True) -> DecodeCosts:
    return DecodeCosts(L, batch, 16, 8, "max-prob", reads_head, "cpu", "float32", seconds)


SECONDS = {
    "block": {1: 1.0, 4: 1.6},
    "head": {1: 2.0, 4: 2.6},
    "shortlist_head": {1: 0.1, 4: 0.2},
    "kv_fill": {1: 0.25, 4: 0.4},
    "kv_fill_layer": {1: 0.05, 4: 0.08},
    "decision_first": {1: 0.5, 4: 0.8},
    "decision": {1: 0.5, 4: 0.8},
    "step_full": {1: 7.0, 4: 10.0},
    "overhead": {1: 1.0, 4: 1.0},
}


def test_predicted_step_is_the_sum_of_its_measured_parts():
    c = costs_of(SECONDS)
    # batch 1, exit at layer 2 of 4 after decisions at layers 1 and 2 (the decision's logits
    # are the output: no extra head), two skipped layers' KV filled at once
    assert c.predict_step([2], [2], [1, 2, 3]) == pytest.approx(
        1.0 + 2 * 1.0 + 2 * 0.5 + 0.25 + 0.05
    )
    # full depth: every block, the decisions at the three scored exits, the final head
    assert c.predict_step([4], [3], [1, 2, 3]) == pytest.approx(1.0 + 4 * 1.0 + 3 * 0.5 + 2.0)
    # a decision that does not read the head pays a head on exit
    c2 = costs_of(SECONDS, reads_head=False)
    assert c2.predict_step([2], [2], [1, 2, 3]) == pytest.approx(4.3 + 2.0)
    # batch 4 (rows at 1, 2, 4, 4): blocks at 4, 3, 2, 2 active rows, interpolated linearly
    block = {n: 1.0 + 0.2 * (n - 1) for n in range(1, 5)}
    kv = {n: 0.25 + 0.05 * (n - 1) for n in range(1, 5)}
    kv_layer = {n: 0.05 + 0.01 * (n - 1) for n in range(1, 5)}
    dec = {n: 0.5 + 0.1 * (n - 1) for n in range(1, 5)}
    head = {n: 2.0 + 0.2 * (n - 1) for n in range(1, 5)}
    expected = (
        1.0
        + block[4] + block[3] + block[2] + block[2]
        + dec[4] + dec[3] + dec[2]  # decisions 1, 2, 3, 3 taken at layers 1, 2, 3
        + kv[1] + 2 * kv_layer[1]  # the row at layer 1 skips 3 layers
        + kv[1] + kv_layer[1]  # the row at layer 2 skips 2
        + head[2]
    )  # fmt: skip
    assert c.predict_step([1, 2, 4, 4], [1, 2, 3, 3], [1, 2, 3]) == pytest.approx(expected)


def test_predicted_speedup_sets_full_steps_against_the_exit_pattern():
    c = costs_of(SECONDS, batch=1)
    c.seconds = {k: {1: v[1]} for k, v in SECONDS.items()}
    exits = torch.tensor([[4, 2, 2, 1]])
    decisions = torch.tensor([[3, 2, 2, 1]])
    steps = [c.predict_step([int(e)], [int(d)], [1, 2, 3]) for e, d in zip(exits[0], decisions[0])]
    assert c.predicted_speedup(exits, decisions, [1, 2, 3]) == pytest.approx(4 * 7.0 / sum(steps))


def test_step_depth_bound_counts_the_deepest_running_row_of_each_step():
    c = costs_of(SECONDS)  # L = 4
    exits = torch.tensor([[4, 1, 2], [1, 1, 0], [2, 3, 1], [1, 1, 1]])
    # batch 1: every row on its own, the finished slot (0) skipped: 4 * 11 / (7 + 2 + 6 + 3)
    assert c.step_depth_bound(exits, 1) == pytest.approx(4 * 11 / 18)
    # batch 2: steps of rows (0, 1) run 4, 1, 2 layers; rows (2, 3) run 2, 3, 1
    assert c.step_depth_bound(exits, 2) == pytest.approx(4 * 6 / (7 + 6))
    # one batch of 4: the deepest row of each step, 4, 3, 2
    assert c.step_depth_bound(exits) == pytest.approx(4 * 3 / 9)


def test_measured_costs_on_a_tiny_model_and_their_content_keyed_cache(tmp_path):
    model = tiny(arch="llama", layers=3)
    policy = make_policy("max-prob", 0.5, 1)
    cache = tmp_path / "costs"  # made by the first measurement
    c = measure_costs(model, policy, batch=2, context=8, shortlist=4, repeats=2, cache=cache)
    parts = ("block", "head", "kv_fill", "kv_fill_layer", "decision_first", "decision")
    for part in (*parts, "step_full", "overhead"):
        assert set(c.seconds[part]) == {1, 2} and all(v >= 0 for v in c.seconds[part].values())
    assert c.decision_reads_head  # max-prob reads the exit logits
    # overhead is what the full step's parts do not explain (clamped at 0)
    for n in (1, 2):
        s = {p: c.seconds[p][n] for p in c.seconds}
        assert s["overhead"] == pytest.approx(max(0.0, s["step_full"] - 3 * s["block"] - s["head"]))
    # the full-depth pattern predicts overhead + L blocks + decisions + head
    full = c.predict_step([3], [2], [1, 2])
    s1 = {p: c.seconds[p][1] for p in c.seconds}
    assert full == pytest.approx(
        s1["overhead"] + 3 * s1["block"] + s1["decision_first"] + s1["decision"] + s1["head"]
    )
    # cached: a second call reads the file (same numbers, no new measurement)
    files = list(cache.glob("*.json"))
    assert len(files) == 1
    again = measure_costs(model, policy, batch=2, context=8, shortlist=4, repeats=2, cache=cache)
    assert again.seconds == c.seconds
    # the key changes with batch, dtype, weights and policy
    k = cache_key(model, 2, 8, 4, policy)
    assert k != cache_key(model, 1, 8, 4, policy)
    assert k != cache_key(model, 2, 8, 4, make_policy("max-prob", 0.9, 1))
    half = tiny(arch="llama", layers=3).to(torch.bfloat16)
    assert cache_key(half, 2, 8, 4, policy) != k
    other = tiny(arch="llama", layers=3, seed=1)
    assert cache_key(other, 2, 8, 4, policy) != k
    assert cache_key(tiny(arch="llama", layers=3), 2, 8, 4, policy) == k  # same content


def test_a_shortlist_pays_the_full_head_once_and_a_head_on_a_later_exit():
    """A shortlisted measure computes the full vocabulary at a token's first decision only (that
    exit's output is those logits); a later decision scores K candidates, so leaving there costs
    a full head."""
    seconds = {**SECONDS, "decision_first": {1: 3.0, 4: 3.0}, "decision": {1: 0.5, 4: 0.5}}
    c = DecodeCosts(4, 1, 16, 8, "max-prob", False, "cpu", "float32", seconds, True)
    c.seconds = {k: {1: v[1]} for k, v in seconds.items()}
    # exit at the first scored exit: its decision's logits are the output
    assert c.predict_step([1], [1], [1, 2, 3]) == pytest.approx(1.0 + 1.0 + 3.0 + 0.25 + 2 * 0.05)
    # exit at the second: the cheap decision, then a full head for the output
    assert c.predict_step([2], [2], [1, 2, 3]) == pytest.approx(
        1.0 + 2 * 1.0 + 3.0 + 0.5 + 0.25 + 0.05 + 2.0
    )
    # measured on a tiny model: the shortlisted decision reads the full logits first only
    model = tiny(arch="llama", layers=3)
    m = measure_costs(model, make_policy("max-prob", 0.5, 1, shortlist=4), context=8, repeats=2)
    assert m.first_decision_reads_head and not m.decision_reads_head


def test_tokens_one_at_a_time_predict_as_batch_one_decoding():
    """The sweep's teacher-forced tokens are predicted as batch-1 steps: the grouped shortcut
    equals stepping through every token."""
    c = costs_of(SECONDS, batch=1)
    c.seconds = {k: {1: v[1]} for k, v in SECONDS.items()}
    gen = torch.Generator().manual_seed(0)
    exits = torch.randint(1, 5, (50,), generator=gen)
    decisions = exits.clamp(max=3)  # one decision per scored exit (1, 2, 3) up to the exit
    stepped = c.predicted_speedup(exits[:, None], decisions[:, None], [1, 2, 3], batch=1)
    assert c.predicted_speedup_tokens(exits, decisions, [1, 2, 3]) == pytest.approx(stepped)


def test_frontier_exits_are_the_frontiers_mean_layer_token_by_token():
    from eexit.evaluation.frontier import frontier_exits, frontier_mean_layer

    gen = torch.Generator().manual_seed(1)
    oracle = torch.randint(2, 9, (200,), generator=gen).double()
    for agreement in (100.0, 98.0, 90.0):
        exits = frontier_exits(oracle, 2, agreement)
        assert float(exits.mean()) == pytest.approx(frontier_mean_layer(oracle, 2, agreement))
        moved = int((exits != oracle).sum())
        assert moved <= round((1 - agreement / 100) * 200)  # only the allowed disagreements
    assert torch.equal(frontier_exits(oracle, 2, 100.0), oracle)


def test_self_spec_prediction_is_its_cycles_parts_and_the_draft_choice_its_maximum(tmp_path):
    from eexit.evaluation.costs import (
        choose_draft,
        expected_tokens_per_cycle,
        measure_verify,
        predict_self_spec,
    )

    assert expected_tokens_per_cycle(0.0, 4) == 1.0  # every first draft rejected
    assert expected_tokens_per_cycle(1.0, 4) == 4.0  # every draft kept, nothing more
    assert expected_tokens_per_cycle(0.5, 2) == pytest.approx(1.5)  # 1 w.p. .5, 2 w.p. .5
    c = costs_of(SECONDS, batch=1)
    c.seconds = {k: {1: v[1]} for k, v in SECONDS.items()}
    verify = {2: {"block": 1.5, "head": 2.5}, 4: {"block": 2.0, "head": 3.0}}
    # draft layer 1 of 4, 2 drafts: 2 x (overhead 1 + 1 block + head 2), then 3 blocks over the
    # 2 tokens and their heads; 1.5 tokens per cycle against 7.0 per full step
    cycle = 2 * (1.0 + 1.0 + 2.0) + 3 * 1.5 + 2.5
    assert predict_self_spec(c, verify, 1, 2, 1.5) == pytest.approx(1.5 * 7.0 / cycle)
    acceptance = {1: 0.5, 2: 0.9}
    k, D, best = choose_draft(c, verify, acceptance, [2, 4])
    every = {
        (k2, D2): predict_self_spec(c, verify, k2, D2, expected_tokens_per_cycle(a, D2))
        for k2, a in acceptance.items()
        for D2 in (2, 4)
    }
    assert (k, D) == max(every, key=every.get) and best == pytest.approx(max(every.values()))
    model = tiny(arch="llama", layers=3)
    parts = measure_verify(model, [2, 3], context=8, repeats=2, cache=tmp_path)
    assert set(parts) == {2, 3} and all(v["block"] > 0 and v["head"] > 0 for v in parts.values())
    assert measure_verify(model, [2, 3], context=8, repeats=2, cache=tmp_path) == parts  # cached
