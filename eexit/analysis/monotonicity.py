"""Does confidence grow monotonically with depth? (seed 001, with seed 003's top-k saturation
order and seed 004's sub-word / sub-layer view.)

One forward pass per batch with every block's output (and, where the block is a pre-norm
residual block with an `attn` / `self_attn` child, the residual stream after attention); each
layer's state goes through the model's own final norm + LM head, and only per-token summaries
are kept (top-K ids and probabilities, the probability of the final prediction). All
statistics are tensor operations over tokens: no Python loop over tokens or the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from eexit.runtime import logits_chunk_tokens

MONOTONE_TOL = 1e-3  # a probability may dip by this much and still count as non-decreasing
DROP = 0.05  # "drops after its peak": the final-layer probability is > DROP below the peak


@dataclass
class LayerRecords:
    """Per-token records over L layers for N tokens."""

    topk_ids: torch.Tensor  # [L, N, K] top-K ids at each layer
    topk_probs: torch.Tensor  # [L, N, K]
    p_final: torch.Tensor  # [L, N] probability each layer gives the final layer's top-1
    targets: torch.Tensor  # [N] gold next token
    sub_top1: torch.Tensor | None = None  # [L, N] top-1 after the attention half of each block
    sub_p_final: torch.Tensor | None = None  # [L, N]
    extras: dict = field(default_factory=dict)

    @property
    def top1(self) -> torch.Tensor:
        return self.topk_ids[..., 0]

    def to_cpu(self) -> LayerRecords:
        def cpu(t):
            return None if t is None else t.cpu()

        return LayerRecords(
            cpu(self.topk_ids),
            cpu(self.topk_probs),
            cpu(self.p_final),
            cpu(self.targets),
            cpu(self.sub_top1),
            cpu(self.sub_p_final),
            self.extras,
        )


def attention_child(block):
    for name in ("attn", "self_attn", "attention"):
        if hasattr(block, name):
            return getattr(block, name)
    return None


@torch.no_grad()
def forward_records(model, x, y: torch.Tensor, k: int, sublayers: bool = True) -> LayerRecords:
    """x: LM windows [B, T] (targets y), or a dict of model inputs of task pairs (y: labels, -100 =
    ignored)."""
    layers = model.parts.layers
    mids: list[torch.Tensor] = []
    hooks = []
    can_split = sublayers and all(attention_child(b) is not None for b in layers)
    if can_split:
        inputs: list[torch.Tensor] = []

        def pre(_m, args, kwargs):
            inputs.append(args[0] if args else kwargs["hidden_states"])

        def attn_out(_m, _i, out):
            mids.append(inputs[-1] + (out[0] if isinstance(out, tuple) else out))

        for b in layers:
            hooks.append(b.register_forward_pre_hook(pre, with_kwargs=True))
            hooks.append(attention_child(b).register_forward_hook(attn_out))
    try:
        states = model(**x) if isinstance(x, dict) else model(x)
    finally:
        for h in hooks:
            h.remove()
    if isinstance(x, dict):  # task pairs: keep the labelled positions
        from eexit.data.pairs import keep_labelled

        states, y2 = keep_labelled(states, y)
        mids = keep_labelled(mids, y)[0] if len(mids) == len(states) else mids
        y = y2
    n, d = y.numel(), states[0].shape[-1]
    states = [h.reshape(n, d) for h in states]
    mids = [h.reshape(n, d) for h in mids] if can_split and len(mids) == len(states) else None
    chunk = logits_chunk_tokens(model.vocab_size, states[0].device)
    parts = []
    for a in range(0, n, chunk):  # at most one chunk of logits per layer in memory
        rows = slice(a, a + chunk)
        sub = [h[rows] for h in mids] if mids is not None else None
        parts.append(token_records(model, [h[rows] for h in states], sub, y.reshape(-1)[rows], k))
    return concat(parts)


def token_records(model, states, mids, y: torch.Tensor, k: int) -> LayerRecords:
    """The records of n tokens from their states [n, d] per layer (and after-attention states)."""
    n, L = y.numel(), len(states)
    final = model.exit_logits(states[-1], L).float().argmax(-1)
    ids, probs, pf = [], [], []
    for layer, h in enumerate(states, start=1):  # log-sum-exp once; no full log-softmax tensor
        logits = model.exit_logits(h, layer).reshape(n, -1).float()
        lse = torch.logsumexp(logits, -1, keepdim=True)
        top = logits.topk(k, dim=-1)
        ids.append(top.indices)
        probs.append((top.values - lse).exp())
        pf.append((logits.gather(1, final[:, None]) - lse).squeeze(1).exp())
    rec = LayerRecords(torch.stack(ids), torch.stack(probs), torch.stack(pf), y)
    if mids is not None:
        st, sp = [], []
        for layer, h in enumerate(mids, start=1):
            logits = model.exit_logits(h, layer).reshape(n, -1).float()
            st.append(logits.argmax(-1))
            sp.append(
                (logits.gather(1, final[:, None]).squeeze(1) - torch.logsumexp(logits, -1)).exp()
            )
        rec.sub_top1, rec.sub_p_final = torch.stack(st), torch.stack(sp)
    return rec.to_cpu()


def concat(records: list[LayerRecords]) -> LayerRecords:
    cat = lambda name, dim: torch.cat([getattr(r, name) for r in records], dim)  # noqa: E731
    out = LayerRecords(
        cat("topk_ids", 1), cat("topk_probs", 1), cat("p_final", 1), cat("targets", 0)
    )
    if all(r.sub_top1 is not None for r in records):
        out.sub_top1, out.sub_p_final = cat("sub_top1", 1), cat("sub_p_final", 1)
    return out


def fixed_from(same: torch.Tensor) -> torch.Tensor:
    """[L, ...] bool 'equals the final value' -> [L, ...] 'equals it at this layer and every later
    one'."""
    return torch.flip(torch.cumprod(torch.flip(same.int(), [0]), 0), [0]).bool()


def saturation_layer(same: torch.Tensor) -> torch.Tensor:
    """1-based layer from which the value never changes again (the last layer at worst)."""
    fixed = fixed_from(same)
    return fixed.int().argmax(0) + 1


def per_layer_stats(r: LayerRecords) -> list[dict]:
    L = r.top1.shape[0]
    same = r.top1 == r.top1[-1:]
    never = fixed_from(same).float().mean(1)
    p = r.p_final
    # non-decreasing from layer l on (within tolerance): no later step goes down by more than
    # MONOTONE_TOL
    down = p[1:] < p[:-1] - MONOTONE_TOL  # [L-1, N] step l -> l+1 goes down
    mono_from = torch.flip(torch.cumprod(torch.flip((~down).int(), [0]), 0), [0]).float().mean(1)
    mono_from = torch.cat([mono_from, torch.ones(1)])
    rows = []
    for l in range(L):
        rows.append(
            {
                "layer": l + 1,
                "top1_equals_final": 100 * same[l].float().mean().item(),
                "top1_never_changes_after": 100 * never[l].item(),
                "p_final_mean": p[l].mean().item(),
                "p_final_std": p[l].std().item(),
                "monotone_from_here": 100 * mono_from[l].item(),
            }
        )
    return rows


def non_monotonic_share(r: LayerRecords) -> dict:
    p = r.p_final
    peak, where = p.max(0)
    drop = peak - p[-1]
    return {
        "tokens": p.shape[1],
        "peak_before_last_pct": 100 * (where < p.shape[0] - 1).float().mean().item(),
        f"drop_after_peak_gt_{DROP}_pct": 100 * (drop > DROP).float().mean().item(),
        "mean_drop_after_peak": drop.mean().item(),
        "monotone_everywhere_pct": 100
        * (~(p[1:] < p[:-1] - MONOTONE_TOL)).all(0).float().mean().item(),
    }


def topk_saturation(r: LayerRecords) -> tuple[list[dict], dict]:
    """Seed 003: per rank k, the layer where the rank-k token becomes fixed, and whether ranks
    saturate in order."""
    K = r.topk_ids.shape[2]
    sat = torch.stack(
        [saturation_layer(r.topk_ids[:, :, k] == r.topk_ids[-1:, :, k]) for k in range(K)]
    )  # [K, N]
    rows = [
        {
            "rank": k + 1,
            "mean_saturation_layer": sat[k].float().mean().item(),
            "median_saturation_layer": sat[k].float().median().item(),
        }
        for k in range(K)
    ]
    pairs = sat[1:] >= sat[:-1]
    strict = sat[1:] > sat[:-1]
    L = r.topk_ids.shape[0]
    # only tokens whose top-1 saturates before the last layer can show an order
    early = sat[0] < L
    summary = {
        "K": K,
        "ordered_all_ranks_pct": 100 * pairs.all(0).float().mean().item(),
        "ordered_pairs_pct": 100 * pairs.float().mean().item(),
        "strictly_ordered_pairs_pct": 100 * strict.float().mean().item(),
        "ordered_all_ranks_pct_when_top1_saturates_early": 100
        * pairs[:, early].all(0).float().mean().item()
        if early.any()
        else None,
        "tokens_top1_saturates_early_pct": 100 * early.float().mean().item(),
    }
    return rows, summary


def word_start_mask(tokenizer, ids: torch.Tensor) -> torch.Tensor:
    """True where a token starts a word (space marker, newline or punctuation), False for
    continuation pieces."""
    pieces = tokenizer.convert_ids_to_tokens(ids.tolist())
    out = []
    for p in pieces:
        p = p or ""
        if p.startswith("##"):
            out.append(False)
        elif p[:1] in ("Ġ", "▁", "Ċ", "Â") or not p[:1].isalnum():
            out.append(True)
        else:
            out.append(False)
    return torch.tensor(out, dtype=torch.bool)


def subword_exits(r: LayerRecords, tokenizer) -> dict:
    """Seed 004: oracle exit layer (top-1 fixed from there on) for word-start vs continuation
    predictions."""
    exit_layer = saturation_layer(r.top1 == r.top1[-1:])
    final = r.top1[-1]
    uniq, inverse = torch.unique(final, return_inverse=True)
    start = word_start_mask(tokenizer, uniq)[inverse]
    L = r.top1.shape[0]
    out = {}
    for name, mask in (("word_start", start), ("continuation", ~start)):
        e = exit_layer[mask].float()
        hist = torch.bincount(exit_layer[mask] - 1, minlength=L).float()
        out[name] = {
            "tokens": int(mask.sum()),
            "mean_exit_layer": e.mean().item() if len(e) else None,
            "exit_histogram_pct": (100 * hist / max(1, len(e))).tolist(),
        }
    return out


def sublayer_stats(r: LayerRecords) -> list[dict] | None:
    """Top-1 = final and p(final) after the attention half and after the MLP half of each block."""
    if r.sub_top1 is None:
        return None
    final = r.top1[-1]
    rows = []
    for l in range(r.top1.shape[0]):
        for part, top, p in (
            ("attention", r.sub_top1[l], r.sub_p_final[l]),
            ("mlp", r.top1[l], r.p_final[l]),
        ):
            rows.append(
                {
                    "point": l + (0.5 if part == "attention" else 1.0),
                    "layer": l + 1,
                    "after": part,
                    "top1_equals_final": 100 * (top == final).float().mean().item(),
                    "p_final_mean": p.mean().item(),
                }
            )
    # the earliest sub-layer point after which the top-1 never changes
    seq = torch.stack([t for l in range(r.top1.shape[0]) for t in (r.sub_top1[l], r.top1[l])])
    sat = saturation_layer(seq == final[None]) - 1  # index into the 2L points
    after_attn = (sat % 2 == 0).float().mean().item()
    rows.append(
        {
            "point": None,
            "layer": None,
            "after": "oracle exit point is an attention half (%)",
            "top1_equals_final": 100 * after_attn,
            "p_final_mean": None,
        }
    )
    return rows


def examples(r: LayerRecords, tokenizer, positions: list[int], top: int = 3) -> list[dict]:
    """Top-3 predictions with probabilities at every layer for chosen tokens (figure 3)."""
    out = []
    for pos in positions:
        ids = r.topk_ids[:, pos, :top]
        probs = r.topk_probs[:, pos, :top]
        out.append(
            {
                "position": pos,
                "target": tokenizer.decode([int(r.targets[pos])]),
                "final": tokenizer.decode([int(r.top1[-1, pos])]),
                "layers": [
                    {
                        "layer": l + 1,
                        "top": [
                            (tokenizer.decode([int(i)]), float(p)) for i, p in zip(ids[l], probs[l])
                        ],
                    }
                    for l in range(ids.shape[0])
                ],
            }
        )
    return out
