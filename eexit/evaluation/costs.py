"""The decoding cost model, measured on the run's own device and dtype.

The FLOP model of the tables (`ideal_speedup`: the LM head counted as d x V over one block's
multiply-adds) ignores what dominates small models and small batches: per-op overhead, the
decoder's own bookkeeping, the real price of a decision. Measured decoding contradicted it. This
module times, at the decoding shapes (one new token per row over a KV cache of `context`
tokens), warmed up and as medians of repeats with the device's queue drained (`runtime.now`):

- `block`: one transformer block (its KV write and attention included);
- `head`: the final norm + full LM head; `shortlist_head`: a head over K rows of the unembedding;
- `kv_fill`: the K/V projections and cache write of the last layer alone when a row skips it
  (KV propagate), and `kv_fill_layer`: what each further skipped layer adds (the skipped layers
  are filled at once, so m layers cost kv_fill + (m - 1) kv_fill_layer);
- `decision_first`: a token's first decision (a shortlisted measure computes the full
  vocabulary there), `decision`: each later one, with the state the first left (its own exit
  logits included when it reads them);
- `step_full`: a whole full-depth decode step, and `overhead` = step_full - L block - head, the
  fixed per-token cost (embedding, token pick, bookkeeping).

Each is measured at batch 1 and at the run's batch; a step with n active rows uses the value
interpolated linearly in n. `predict_step` adds the parts a decoding step spends for a given
exit pattern (no timing of its own: predicted time is the sum of its measured parts), and
`predicted_speedup` sets the full-depth step against the steps the exits imply.

Measurements are cached per (weights, device, dtype, batch, context, policy, shortlist, torch
version, the decoder's source) under the eexit cache (content-keyed: other weights or another
decoder are another key), so sweeps stay fast."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from eexit.errors import EexitError
from eexit.models.identity import weights_digest
from eexit.runtime import now

PARTS = (
    "block",
    "head",
    "shortlist_head",
    "kv_fill",
    "kv_fill_layer",
    "decision_first",
    "decision",
    "step_full",
    "overhead",
)


@dataclass
class DecodeCosts:
    """Median seconds of each part of a decoding step, at batch 1 and at `batch` rows."""

    num_layers: int
    batch: int  # the run's batch (the second measured row count)
    context: int  # KV cache length the parts were timed at
    shortlist: int  # K of the shortlist head
    policy: str | None  # the policy whose decision was timed (None: no decision)
    decision_reads_head: bool  # a later decision computes the exit logits (reused on exit)
    device: str
    dtype: str
    seconds: dict[str, dict[int, float]] = field(default_factory=dict)  # part -> rows -> s
    first_decision_reads_head: bool = True  # the first decision computes the exit logits

    def at(self, part: str, rows: int) -> float:
        """Seconds of `part` with `rows` active rows (linear between the measured row counts)."""
        if rows <= 0:
            return 0.0
        by_rows = self.seconds[part]
        if len(by_rows) == 1 or self.batch == 1:
            return next(iter(by_rows.values()))
        lo, hi = by_rows[1], by_rows[self.batch]
        return lo + (hi - lo) * (rows - 1) / (self.batch - 1)

    def predict_step(
        self, exits: list[int], decisions: list[int], decision_layers: list[int]
    ) -> float:
        """Seconds of one decoding step (KV propagate) whose rows exit at `exits` (1-based
        layers, L = full depth) after `decisions[r]` decisions, taken at the first
        `decisions[r]` of `decision_layers`: the sum of the measured parts it spends."""
        L, n = self.num_layers, len(exits)
        t = self.at("overhead", n)
        for layer in range(1, L + 1):
            t += self.at("block", sum(e >= layer for e in exits))
        for i in range(len(decision_layers)):  # one batched decision per scored exit
            t += self.at("decision_first" if i == 0 else "decision", sum(d > i for d in decisions))
        first = decision_layers[0] if decision_layers else None
        for group in sorted(set(exits)):
            rows = sum(e == group for e in exits)
            reused = self.first_decision_reads_head if group == first else self.decision_reads_head
            if group == L or not reused:
                t += self.at("head", rows)
            if group < L:  # the skipped layers, filled at once
                t += self.at("kv_fill", rows) + (L - group - 1) * self.at("kv_fill_layer", rows)
        return t

    def predicted_speedup(
        self,
        exits: torch.Tensor,
        decisions: torch.Tensor,
        decision_layers: list[int],
        batch: int | None = None,
    ) -> float:
        """Full-depth step time over the predicted step time, for decoded steps `exits` /
        `decisions` ([rows, T] each); rows are decoded `batch` at a time (default: all at once)."""
        exits, decisions = exits.reshape(exits.shape[0], -1), decisions.reshape(exits.shape[0], -1)
        batch = batch or exits.shape[0]
        full = pred = 0.0
        for start in range(0, exits.shape[0], batch):
            for step in range(exits.shape[1]):
                pairs = zip(
                    exits[start : start + batch, step], decisions[start : start + batch, step]
                )
                kept = [(int(e), int(d)) for e, d in pairs if int(e) > 0]  # 0: row finished
                if not kept:
                    continue
                e, d = [k[0] for k in kept], [k[1] for k in kept]
                full += self.at("step_full", len(e))
                pred += self.predict_step(e, d, decision_layers)
        if pred <= 0:
            raise EexitError("no decoding steps to predict a speedup from")
        return full / pred

    def step_depth_bound(self, exits: torch.Tensor, batch: int | None = None) -> float:
        """L over the mean number of layers a decoding step runs, for decoded steps `exits`
        ([rows, T], 0 = row finished) taken `batch` rows at a time: a step of rows decoded
        together runs until its deepest row exits, so this is the most any decoder that keeps
        rows in step can gain over full depth, with decisions, heads and fills free."""
        exits = exits.reshape(exits.shape[0], -1)
        batch = batch or exits.shape[0]
        depths = [
            int(step.max())
            for start in range(0, exits.shape[0], batch)
            for step in exits[start : start + batch].T
            if int(step.max()) > 0
        ]
        if not depths:
            raise EexitError("no decoding steps to bound a speedup from")
        return self.num_layers * len(depths) / sum(depths)

    def predicted_speedup_tokens(
        self, exits: torch.Tensor, decisions: torch.Tensor, decision_layers: list[int]
    ) -> float:
        """`predicted_speedup` of tokens decoded one at a time (batch 1), `exits` / `decisions`
        [N] per token, e.g. the teacher-forced exits of a sweep: each distinct (exit, decisions)
        pair is predicted once."""
        pairs = collections.Counter(zip(exits.tolist(), decisions.tolist()))
        if not pairs:
            raise EexitError("no tokens to predict a speedup from")
        pred = sum(
            n * self.predict_step([int(e)], [int(d)], decision_layers)
            for (e, d), n in pairs.items()
        )
        return sum(pairs.values()) * self.at("step_full", 1) / pred

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["seconds"] = {p: {str(k): v for k, v in r.items()} for p, r in self.seconds.items()}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> DecodeCosts:
        d = dict(d)
        d["seconds"] = {p: {int(k): v for k, v in r.items()} for p, r in d["seconds"].items()}
        return cls(**d)


def cache_key(model, batch: int, context: int, shortlist: int, policy) -> str:
    """The content key of a measurement: weights, device, dtype, shapes, policy, torch."""
    w = model.parts.lm_head.weight
    spec = {
        "weights": weights_digest(model),
        "device": str(w.device),
        "dtype": str(w.dtype),
        "batch": int(batch),
        "context": int(context),
        "shortlist": int(shortlist),
        "policy": None if policy is None else policy_descriptor(policy),
        "torch": torch.__version__,
        "code": code_digest(),  # the decoder's own code: a faster decoder is another measurement
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def code_digest() -> str:
    """sha256 of the source files a decoding step runs (decoder, block adapters, this module)."""
    root = Path(__file__).resolve().parents[1]
    files = [root / "evaluation" / "costs.py", root / "models" / "decoding.py"]
    files += sorted((root / "models").glob("blocks.py"))
    files += sorted((root / "models" / "families").glob("*.py"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def policy_descriptor(policy) -> dict:
    return {
        "name": policy.registered_name,
        "threshold": float(getattr(policy, "threshold", 0.0)),
        "params": {k: repr(v) for k, v in sorted(vars(policy).items()) if not k.startswith("_")},
    }


def _median(fn, device, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = now(device)
        fn()
        times.append(now(device) - t0)
    return statistics.median(times)


@torch.no_grad()
def _measure_rows(model, policy, rows: int, context: int, shortlist: int, repeats: int) -> dict:
    from eexit.models.decoding import EarlyExitDecoder, _Rows
    from eexit.policies.base import ExitView

    dev = model.device
    L = model.num_layers
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.vocab_size, (rows, context), generator=gen).to(dev)
    dec = EarlyExitDecoder(model, None, "full")
    _, _, _, _, pos, _ = dec._prefill(prompt, None, 2, None, 0, None, None, spare_slots=0)
    slot = context
    pos[:, slot] = pos[:, slot - 1] + 1
    all_rows = torch.arange(rows, device=dev)
    slots = torch.full((rows, 1), slot, device=dev)
    p = pos[:, slot : slot + 1]
    dtype = model.parts.lm_head.weight.dtype
    h = torch.randn(rows, 1, model.hidden_size, generator=gen).to(dev, dtype)
    mid = max(0, L // 2 - 1)
    w = model.parts.lm_head.weight
    pick = torch.randperm(w.shape[0], generator=gen)[: max(1, shortlist)].to(dev)

    def fill(first):  # what KV propagate does for a row that leaves after layer `first`
        return lambda: dec._fill_skipped(first, h, all_rows, slot, p)

    tokens = prompt[:, -1]
    out = {
        "block": _median(lambda: dec._layer(mid, h, all_rows, slots, p), dev, repeats),
        "head": _median(lambda: model.exit_logits(h[:, 0], L), dev, repeats),
        "shortlist_head": _median(
            lambda: torch.nn.functional.linear(model.parts.final_norm(h[:, 0]), w[pick]),
            dev,
            repeats,
        ),
        "kv_fill": _median(fill(L - 1), dev, repeats),
        "step_full": _median(
            lambda: dec._step(tokens, all_rows, slot, pos, None, None, 1), dev, repeats
        ),
    }
    reads = {"first": False, "later": False}
    if policy is not None:
        scored = [x for x in model.exit_layers if policy.scored_at(x, L) and x < L]
        first, later = (scored + scored + [1, 1])[:2]  # the first two scored exits
        hist = [h[:, 0]] * (max(first, later) + 1)
        carried: dict = {}  # the state a token's first decision leaves (e.g. its shortlist)

        def decide(layer, state):
            view = ExitView(
                layer,
                L,
                _Rows(hist, all_rows),
                lambda: model.exit_logits(h[:, 0], layer),
                model,
                state,
                torch.full((rows,), 1, device=dev),
                2,
            )
            policy.decide(view)
            return view

        out["decision_first"] = _median(lambda: decide(first, {}), dev, repeats)
        reads["first"] = "logits" in decide(first, carried).__dict__
        out["decision"] = _median(lambda: decide(later, dict(carried)), dev, repeats)
        reads["later"] = "logits" in decide(later, dict(carried)).__dict__
    else:
        out["decision_first"] = out["decision"] = 0.0
    out["kv_fill_layer"] = max(0.0, _median(fill(1), dev, repeats) - out["kv_fill"]) / max(1, L - 2)
    out["overhead"] = max(0.0, out["step_full"] - L * out["block"] - out["head"])
    return {"seconds": out, "reads_head": reads}


def measure_costs(
    model,
    policy=None,
    batch: int = 1,
    context: int = 64,
    shortlist: int = 32,
    repeats: int = 30,
    cache: Path | None = None,
) -> DecodeCosts:
    """The parts of a decoding step of `model` timed on its device and dtype (module docstring);
    read from `cache` (a folder) when this exact measurement is there, written to it after."""
    if batch < 1 or context < 1 or repeats < 1:
        raise EexitError("cost model: batch, context and repeats must be >= 1")

    def measure() -> DecodeCosts:
        w = model.parts.lm_head.weight
        seconds: dict[str, dict[int, float]] = {part: {} for part in PARTS}
        reads = {"first": False, "later": False}
        for rows in sorted({1, batch}):
            m = _measure_rows(model, policy, rows, context, shortlist, repeats)
            reads = m["reads_head"]
            for part, sec in m["seconds"].items():
                seconds[part][rows] = sec
        return DecodeCosts(
            num_layers=model.num_layers,
            batch=batch,
            context=context,
            shortlist=shortlist,
            policy=None if policy is None else policy.registered_name,
            decision_reads_head=reads["later"],
            first_decision_reads_head=reads["first"],
            device=str(w.device),
            dtype=str(w.dtype).removeprefix("torch."),
            seconds=seconds,
        )

    key = cache_key(model, batch, context, shortlist, policy) if cache is not None else ""
    return _cached(cache, key, measure, DecodeCosts.from_dict, DecodeCosts.as_dict)


def costs_cache() -> Path:
    """Where measured costs are kept: the eexit cache's `costs` folder (content-keyed)."""
    from eexit.data.corpora import cache_dir

    return cache_dir() / "costs"


def _cached(cache: Path | None, key: str, measure, load, dump):
    """`measure()`, or its result read back from `cache`/<key>.json; a damaged entry is measured
    again, and a cache that cannot be written is said once and skipped (it only saves time)."""
    from eexit.files import atomic_json

    path = Path(cache) / f"{key}.json" if cache is not None else None
    if path is not None and path.is_file():
        try:
            return load(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError):
            pass
    from eexit.reporting import log

    log("timing the decoding step's parts on this device (cached for the next run) ...")
    value = measure()
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_json(path, dump(value))
        except OSError as e:
            log(f"cost model not cached ({e.strerror or e}): {cache}")
    return value


def table_costs(model, policy, context: int) -> DecodeCosts | None:
    """The batch-1 cost model behind the `predicted_speedup` columns of evaluate, sweep,
    calibrate and the frontier, measured on the model's device and dtype at `context` tokens and
    cached under the eexit cache; None where eexit does not decode the model token by token (a
    encoder-decoder model: its steps are not timed here)."""
    if model.parts.encoder is not None:
        return None
    decides = policy if policy is not None and not policy.needs_future else None
    return measure_costs(model, decides, context=context, cache=costs_cache())


# -- self-speculative decoding ----------------------------------------------------------------


@torch.no_grad()
def measure_verify(
    model, lengths: list[int], context: int = 64, repeats: int = 30, cache: Path | None = None
) -> dict[int, dict[str, float]]:
    """Seconds of a verification's parts at batch 1 for each draft length D: one block over D
    new tokens (`block`) and the final norm + LM head over D positions (`head`), timed like
    `measure_costs` and cached the same way (content key, plus the lengths)."""
    lengths = sorted(set(lengths))
    spec = {"verify": lengths, "base": cache_key(model, 1, context, 0, None)}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    return _cached(
        cache,
        key,
        lambda: {D: _verify_parts(model, D, context, repeats) for D in lengths},
        lambda d: {int(k): v for k, v in d.items()},
        lambda out: {str(k): v for k, v in out.items()},
    )


def _verify_parts(model, D: int, context: int, repeats: int) -> dict[str, float]:
    from eexit.models.decoding import EarlyExitDecoder

    dev, L = model.device, model.num_layers
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.vocab_size, (1, context), generator=gen).to(dev)
    dtype = model.parts.lm_head.weight.dtype
    dec = EarlyExitDecoder(model, None, "full")
    _, _, _, _, pos, _ = dec._prefill(prompt, None, D + 1, None, 0, None, None, spare_slots=0)
    pos[:, context : context + D] = pos[:, context - 1 : context] + torch.arange(
        1, D + 1, device=pos.device
    )
    slots = torch.arange(context, context + D, device=dev)[None]
    p = pos[:, context : context + D]
    h = torch.randn(1, D, model.hidden_size, generator=gen).to(dev, dtype)
    rows, mid = torch.zeros(1, dtype=torch.long, device=dev), max(0, L // 2 - 1)
    return {
        "block": _median(lambda: dec._layer(mid, h, rows, slots, p), dev, repeats),
        "head": _median(lambda: model.exit_logits(h[0], L), dev, repeats),
    }


def predict_self_spec(
    costs: DecodeCosts,
    verify: dict[int, dict[str, float]],
    draft_layer: int,
    length: int,
    tokens_per_cycle: float,
) -> float:
    """Predicted speedup over full-depth decoding (batch 1) of self-speculative decoding that
    drafts `length` tokens with the first `draft_layer` layers and emits `tokens_per_cycle`
    tokens per cycle: a cycle is `length` draft steps (the per-token overhead, k blocks and the
    full head each) and one verification (L - k blocks over `length` tokens and their heads)."""
    L, k, D = costs.num_layers, draft_layer, length
    draft = D * (costs.at("overhead", 1) + k * costs.at("block", 1) + costs.at("head", 1))
    check = (L - k) * verify[D]["block"] + verify[D]["head"]
    return tokens_per_cycle * costs.at("step_full", 1) / (draft + check)


def expected_tokens_per_cycle(acceptance: float, length: int) -> float:
    """Tokens a cycle emits when each draft is accepted with probability `acceptance`, given
    the ones before it were: the accepted prefix plus the verifier's token, `length` when every
    draft is kept: (1 - a^D) / (1 - a)."""
    a = min(max(acceptance, 0.0), 1.0)
    return float(length) if a >= 1.0 else (1 - a**length) / (1 - a)


def choose_draft(
    costs: DecodeCosts,
    verify: dict[int, dict[str, float]],
    acceptance: dict[int, float],
    lengths: list[int],
) -> tuple[int, int, float]:
    """The (draft layer, length) the cost model predicts fastest, with its predicted speedup,
    from each candidate layer's acceptance (e.g. its teacher-forced top-1 agreement with the
    last layer) and the measured parts."""
    best = None
    for k, a in acceptance.items():
        for D in lengths:
            s = predict_self_spec(costs, verify, k, D, expected_tokens_per_cycle(a, D))
            if best is None or s > best[2]:
                best = (k, D, s)
    if best is None:
        raise EexitError("no draft layer or length to choose from")
    return best
