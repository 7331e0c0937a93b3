"""The oracle frontier: how much any exit rule could save on this model and data, set beside
every policy so that a weak policy can be told from a model with no headroom.

A token's oracle exit is the earliest exit (at or after the minimum exit layer) whose top-1
equals the final top-1 and never changes at later exits (the `oracle` policy; BRIEF "Headroom").
At 100 % agreement the frontier is the mean oracle exit. At agreement a < 100 %, (1 - a) of the
tokens may disagree with the full model: the cheapest way to spend that allowance sends the
tokens whose oracle exit is deepest to the first allowed exit, so the frontier's mean exit is
(sum of oracle exits - the k largest savings) / N with k = floor((1 - a) N).

Cost model (the tables'): compute counts transformer layers; the LM head costs `head` layer-
equivalents (d x V over one block's multiply-adds) and is paid once per token at its exit
whatever the exit; decisions cost the policy's overhead. Ideal speedup = (L + head) /
(mean exit + head), the oracle deciding for free; a policy's is (L + head) / (mean exit +
decision overhead + head).

Efficiency = layers the policy saves / layers the frontier saves at the policy's agreement
(1.0: the policy is as good as any rule could be at that agreement). Exit-location accuracy
(seed 004): the share of tokens that exit exactly at their oracle exit, and the mean distance
in layers between the exit taken and the oracle exit.
"""

from __future__ import annotations

import math

import torch

AGREEMENTS = (100.0, 99.0, 98.0, 95.0)  # the frontier rows written beside every sweep


def oracle_indices(top1: torch.Tensor, exit_layers: list[int], min_exit_layer: int = 1):
    """[N] index (into exit_layers) of each token's oracle exit, and the first allowed index."""
    same = top1 == top1[-1:]
    stable = torch.flip(torch.cumprod(torch.flip(same.int(), [0]), 0), [0]).bool()
    allowed = torch.tensor([layer >= min_exit_layer for layer in exit_layers])
    allowed[-1] = True
    first = int(allowed.int().argmax())
    stable &= allowed[:, None]
    stable[-1] = True
    return stable.int().argmax(0), first


def frontier_exits(oracle_layers: torch.Tensor, first_layer: int, agreement_pct: float):
    """Each token's exit under the cheapest rule with at least `agreement_pct` % agreement: its
    oracle exit, except the tokens allowed to disagree (those with the most to save), which leave
    at the first allowed exit."""
    n = oracle_layers.numel()
    k = min(max(math.floor((1 - agreement_pct / 100.0) * n + 1e-9), 0), n)
    exits = oracle_layers.clone()
    if k > 0:  # oracle exits are never below the first allowed one
        savings = (oracle_layers.double() - first_layer).clamp_min(0)
        exits[savings.topk(k).indices] = first_layer
    return exits


def frontier_mean_layer(
    oracle_layers: torch.Tensor, first_layer: int, agreement_pct: float
) -> float:
    """Mean exit layer of that cheapest rule."""
    return float(frontier_exits(oracle_layers, first_layer, agreement_pct).double().mean())


def ideal_speedup(num_layers: int, head: float, mean_layers: float) -> float:
    return (num_layers + head) / (mean_layers + head)


def frontier_rows(table, min_exit_layer: int = 1, agreements=AGREEMENTS) -> list[dict]:
    """The oracle rows of a table: mean exit, compute % and ideal speedup per agreement."""
    idx, first = oracle_indices(table.top1, table.exit_layers, min_exit_layer)
    layers = torch.tensor(table.exit_layers, dtype=torch.float64)[idx]
    L = table.num_layers
    rows = []
    for a in agreements:
        mean = frontier_mean_layer(layers, table.exit_layers[first], a)
        rows.append(
            {
                "agreement_pct": a,
                "mean_exit_layer": mean,
                "compute_pct": 100.0 * mean / L,
                "ideal_speedup": ideal_speedup(L, table.head_cost, mean),
                "head_layers": table.head_cost,
                "tokens": table.tokens,
            }
        )
        if table.costs is not None:  # the measured parts for these exits, decisions free
            exits = frontier_exits(layers, table.exit_layers[first], a)
            rows[-1]["predicted_speedup"] = table.costs.predicted_speedup_tokens(
                exits.long(), torch.zeros(len(exits), dtype=torch.long), []
            )
    return rows


def policy_headroom(table, idx: torch.Tensor, row: dict, min_exit_layer: int) -> dict:
    """Efficiency, exit-location accuracy and ideal speedup of a policy's exits `idx` (a row of
    `exit_metrics` gives its agreement, compute and overhead)."""
    oracle, first = oracle_indices(table.top1, table.exit_layers, min_exit_layer)
    exit_layers = torch.tensor(table.exit_layers, dtype=torch.float64)
    oracle_layers, used = exit_layers[oracle], exit_layers[idx]
    L = table.num_layers
    frontier = frontier_mean_layer(oracle_layers, table.exit_layers[first], row["agreement_pct"])
    policy_mean = float(used.mean())
    saved_by_oracle = L - frontier
    overhead_layers = row["overhead_pct"] * L / 100.0
    return {
        "oracle_compute_pct": 100.0 * frontier / L,
        # no headroom at this agreement: nothing to save, efficiency undefined
        "efficiency": (L - policy_mean) / saved_by_oracle if saved_by_oracle > 1e-9 else None,
        "oracle_hit_pct": 100.0 * float((idx == oracle).double().mean()),
        "oracle_distance": float((used - oracle_layers).abs().mean()),
        "ideal_speedup": ideal_speedup(L, table.head_cost, policy_mean + overhead_layers),
    }
