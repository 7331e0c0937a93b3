"""Early-exit language-model evaluation.

`collect_exit_table` runs the model once per batch with every layer's hidden state, and
records per token and per exit: the loss of the exit's prediction, its top-1 and the policy's
confidence score. `exit_metrics` then applies a threshold: each token exits at the first exit
whose score passes (and whose layer >= min exit layer) and its loss is taken there.

Semantics: in this teacher-forced evaluation the later tokens attend to full-depth states of
earlier tokens (the `full` KV mode of decoding); each token's own compute is the layers up to
its exit. Compute % counts transformer layers; the exit-decision overhead (LM-head matmuls of
softmax-based measures, classifiers, ...) is reported separately in layer-equivalents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from eexit.evaluation.frontier import policy_headroom
from eexit.policies.base import ExitPolicy, ExitView
from eexit.reporting import track
from eexit.runtime import LOCAL, Runtime, logits_chunk_tokens


@dataclass
class ExitTable:
    exit_layers: list[int]  # 1-based layers with an exit (last = model depth)
    num_layers: int
    nll: torch.Tensor  # [K, N] negative log-likelihood of the target at each exit
    top1: torch.Tensor  # [K, N] top-1 prediction at each exit
    score: torch.Tensor  # [K, N] policy confidence at each exit
    decision_cost: float  # one decision, in layer-equivalents
    # an exit's decision logits are also its output (no extra head at the exit)
    reuses_logits: bool
    positions: torch.Tensor | None = (
        None  # [N] position of each token in its window (decaying threshold)
    )
    max_steps: int | None = None  # window length
    first_decision_extra: float = 0.0  # what a token's first decision costs beyond the others
    head_cost: float = 0.0  # the LM head (d x V) in layer-equivalents, paid once per token
    # the decoding cost model measured on the run's device (evaluation/costs.py), for the
    # predicted_speedup columns (None: not measured)
    costs: object = None

    @property
    def tokens(self) -> int:
        return self.nll.shape[1]


def layer_macs(model, context: float) -> float:
    """Multiply-accumulates of one transformer block for one token with `context` visible tokens."""
    block = model.parts.layers[0]
    params = sum(p.numel() for p in block.parameters() if p.dim() > 1)
    return params + 2.0 * context * model.hidden_size


def forward_batches(
    model, inputs, targets: torch.Tensor | None, batch_size: int, with_inputs: bool = True
):
    """Teacher-forced passes: yield (states [each n x d], targets [n], positions [n]) per batch.
    `inputs`: LM windows [N, T] with `targets`, or `EncodedPairs` of a task (labelled positions
    only)."""
    from eexit.data.pairs import IGNORE, EncodedPairs, batches, keep_labelled

    dev, d = model.device, model.hidden_size
    if isinstance(inputs, EncodedPairs):
        for batch, y in batches(inputs, batch_size):
            states = model(**{k: v.to(dev) for k, v in batch.items()}, with_inputs=with_inputs)
            pos = torch.arange(y.shape[1]).repeat(y.shape[0])[y.reshape(-1) != IGNORE]
            states, y = keep_labelled(states, y)
            yield [s.reshape(-1, d) for s in states], y.to(dev).reshape(-1), pos.to(dev)
        return
    for start in range(0, len(inputs), batch_size):
        x = inputs[start : start + batch_size].to(dev)
        y = targets[start : start + batch_size] if targets is not None else x
        states = model(x, with_inputs=with_inputs)
        pos = torch.arange(x.shape[1]).repeat(x.shape[0])
        yield [s.reshape(-1, d) for s in states], y.to(dev).reshape(-1), pos.to(dev)


def shard_forward_batches(
    model, inputs, targets, batch_size: int, runtime: Runtime | None, what: str, with_inputs=True
):
    """`forward_batches` over this process's contiguous block of whole batches (all of them in
    one process), with progress: what every teacher-forced pass that gathers runs."""
    shard = (runtime or LOCAL).shard(-(-len(inputs) // batch_size))
    start, stop = shard.start * batch_size, min(len(inputs), shard.stop * batch_size)
    part_targets = targets[start:stop] if targets is not None else None
    batches = forward_batches(model, inputs[start:stop], part_targets, batch_size, with_inputs)
    return track(batches, len(shard), what)


def window_length(inputs) -> int:
    from eexit.data.pairs import EncodedPairs

    return inputs.longest_target if isinstance(inputs, EncodedPairs) else inputs.shape[1]


@torch.no_grad()
def collect_exit_table(
    model,
    inputs,
    targets: torch.Tensor | None,
    policy: ExitPolicy,
    batch_size: int = 8,
    runtime: Runtime | None = None,
    chunk_tokens: int | None = None,
) -> ExitTable:
    """The exit table of `inputs` (LM windows [N, T] with `targets`, or task pairs). With a
    `runtime` of several processes each process runs a contiguous block of the batches and the
    records are gathered in order: every process gets the one-process table. Each exit's logits
    exist for at most `chunk_tokens` tokens at a time (default: what the device's free memory
    allows, `logits_chunk_tokens`); only NLL, top-1 and the score are kept, in float32."""
    model.eval()
    runtime = runtime or LOCAL
    exits = model.exit_layers
    T = window_length(inputs)
    chunk = chunk_tokens or logits_chunk_tokens(model.vocab_size, model.device)
    batches = shard_forward_batches(model, inputs, targets, batch_size, runtime, "exit records")
    records = []  # per chunk: (nll [K, n], top1 [K, n], score [K, n] or None, positions [n])
    # flat: [input of block 1, output of block 1, ...]
    for flat, y, positions in batches:
        for a in range(0, len(y), chunk):
            rows = slice(a, a + chunk)
            records.append(
                exit_records(model, policy, [h[rows] for h in flat], y[rows], positions[rows], T)
            )
    records = runtime.gather(records)
    nll, top1, score, positions = (list(parts) for parts in zip(*records)) if records else ([],) * 4
    top1_t = torch.cat(top1, 1)
    score_t = policy.scores_from_top1(top1_t) if policy.needs_future else torch.cat(score, 1)
    per_layer = layer_macs(model, (T + 1) / 2.0)
    return ExitTable(
        exits,
        model.num_layers,
        torch.cat(nll, 1),
        top1_t,
        score_t,
        model.decision_macs(policy) / per_layer,
        policy.reuses_exit_logits,
        torch.cat(positions),
        T,
        first_decision_extra=model.first_decision_extra_macs(policy) / per_layer,
        head_cost=model.hidden_size * model.vocab_size / per_layer,
    )


def exit_records(model, policy: ExitPolicy, flat, y, positions, T: int) -> tuple:
    """(nll [K, n], top1 [K, n], score [K, n] or None, positions [n]) of n tokens at every exit,
    on the CPU in float32 (the exit logits are cast once, in `ExitView.logits`)."""
    state: dict = {}
    nll, top1, score = [], [], []
    for layer in model.exit_layers:
        h = flat[layer]
        view = ExitView(
            layer,
            model.num_layers,
            flat[: layer + 1],
            lambda h=h, layer=layer: model.exit_logits(h, layer),
            model,
            state,
            positions,
            T,
        )
        logits = view.logits
        nll.append(torch.logsumexp(logits, -1) - logits.gather(1, y[:, None]).squeeze(1))
        top1.append(logits.argmax(-1))
        if not policy.needs_future:
            score.append(policy.score(view).float())
        del view, logits
    return (
        torch.stack(nll).cpu(),
        torch.stack(top1).cpu(),
        None if policy.needs_future else torch.stack(score).cpu(),
        positions.cpu(),
    )


def exit_indices(table: ExitTable, policy: ExitPolicy) -> torch.Tensor:
    """Index (into exit_layers) of the exit each token takes: the first exit where the policy's
    `exit_rule` passes (the last exit always does)."""
    layers = torch.tensor(table.exit_layers)[:, None]
    ok = policy.exit_rule(table.score, layers, table.positions, table.max_steps)
    ok[-1] = True
    return ok.int().argmax(0)


def exit_metrics(table: ExitTable, policy: ExitPolicy) -> dict:
    """One table row for `policy` at its threshold (a sweep passes `policy.at(t)` per threshold)."""
    idx = exit_indices(table, policy)
    n = table.tokens
    cols = torch.arange(n)
    layers = torch.tensor(table.exit_layers, dtype=torch.float)
    L = table.num_layers
    used = layers[idx]
    # decisions taken up to the exit taken, where the policy is asked (as in decoding)
    asked = [1.0 if policy.scored_at(layer, L) else 0.0 for layer in table.exit_layers]
    decisions = torch.cumsum(torch.tensor(asked), 0)[idx]
    exited_early = (used < L).float()
    reused = exited_early * table.decision_cost if table.reuses_logits else 0.0
    first = (decisions > 0).float() * table.first_decision_extra
    overhead = decisions * table.decision_cost + first - reused
    chosen_nll = table.nll[idx, cols]
    row = {
        "threshold": None if policy.threshold_free else policy.threshold,
        "ppl": math.exp(chosen_nll.mean().item()),
        "full_ppl": math.exp(table.nll[-1].mean().item()),
        "compute_pct": 100.0 * used.mean().item() / L,
        "overhead_pct": 100.0 * overhead.mean().item() / L,
        "agreement_pct": 100.0 * (table.top1[idx, cols] == table.top1[-1]).float().mean().item(),
        "tokens": n,
    }
    # cost %: layers run plus what deciding costs, in layer-equivalents (one name everywhere)
    row["cost_pct"] = row["compute_pct"] + row["overhead_pct"]
    # beside the oracle frontier: efficiency, exit-location accuracy, ideal speedup
    row.update(policy_headroom(table, idx, row, policy.min_exit_layer))
    if table.costs is not None:  # the measured parts for these exits and decisions (batch 1)
        scored = [layer for layer, a in zip(table.exit_layers, asked) if a]
        row["predicted_speedup"] = table.costs.predicted_speedup_tokens(used, decisions, scored)
    for k, layer in enumerate(table.exit_layers):
        row[f"exit@{layer}_pct"] = 100.0 * (idx == k).float().mean().item()
    return row


def per_exit_ppl(table: ExitTable) -> dict[int, float]:
    """PPL if every token exited at the given exit (the static baselines)."""
    return {
        layer: math.exp(table.nll[k].mean().item()) for k, layer in enumerate(table.exit_layers)
    }
