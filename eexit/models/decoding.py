"""Early-exit generation for decoder-only models, layer by layer, with our own KV cache.

Each new token runs block after block; after every exit layer the policy decides per row, and a
row that exits stops using compute (the rows still running are gathered per layer). The keys
and values the skipped layers would have produced are handled by `kv_mode`:

- `full`: the exited row keeps running the deeper layers for their KV (quality reference, no
saving);
- `propagate` (CALM): the exited hidden state is fed to the skipped layers' key/value projections
only;
- `recompute` (FREE / EE-LLM): skipped positions stay pending and are computed later, batched into
  the next token of the same row that goes deeper. This yields exactly the full model's KV.

The prompt (prefill) and the first generated token use the full depth. Positions follow
`transformers` for left-padded batches (cumulative attention mask - 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from eexit.errors import EexitError
from eexit.policies.base import ExitPolicy, ExitView
from eexit.runtime import now

KV_MODES = ("full", "propagate", "recompute")


def check_kv_mode(mode: str) -> None:
    if mode not in KV_MODES:
        raise EexitError(f"unknown KV mode {mode!r}; valid: {', '.join(KV_MODES)}")


@dataclass
class GenerationResult:
    sequences: torch.Tensor  # [B, prompt + new] left-padded prompts followed by the new tokens
    new_tokens: torch.Tensor  # [B, new]
    exit_layers: (
        torch.Tensor
    )  # [B, new] layer whose prediction was emitted (0 = row already finished)
    decisions: torch.Tensor  # [B, new] exit decisions taken for the token
    seconds: float  # wall-clock time of the whole generation
    num_layers: int


class _Rows:
    """states[i] for the rows still running, gathered on access (no O(L^2) copies)."""

    def __init__(self, hist: list[torch.Tensor], rows: torch.Tensor):
        self.hist, self.rows = hist, rows

    def __len__(self):
        return len(self.hist)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [h[self.rows] for h in self.hist[i]]
        return self.hist[i][self.rows]


def _subset_state(state: dict, keep: torch.Tensor) -> None:
    """Keep the policy's per-row state of the rows that go on."""
    for k, v in list(state.items()):
        if isinstance(v, torch.Tensor):
            state[k] = v[keep]
        elif isinstance(v, tuple):  # LSTM (h, c): [layers, rows, d]
            state[k] = tuple(t[:, keep] for t in v)
        elif isinstance(v, list):
            state[k] = [t[keep] if isinstance(t, torch.Tensor) else t for t in v]


class EarlyExitDecoder:
    def __init__(self, model, policy: ExitPolicy | None, kv_mode: str = "propagate"):
        check_kv_mode(kv_mode)
        if policy is not None and policy.needs_future:
            raise EexitError(
                f"policy {policy.registered_name!r} needs every layer and cannot decide during "
                "decoding"
            )
        self.model, self.policy, self.kv_mode = model, policy, kv_mode
        self.blocks = model.family.adapter(model)
        self.L = self.blocks.num_layers
        # the exits where the policy is asked (stateful ones: every exit, for their history)
        self.exits = {
            l for l in model.exit_layers if policy is not None and policy.scored_at(l, self.L)
        }
        # the scored exits as a tensor: each step counts a row's decisions from it
        self.exit_tensor = torch.tensor(sorted(self.exits), dtype=torch.long, device=model.device)

    # ------------------------------------------------------------------ attention over our cache
    def _attend(self, l, q, k_new, v_new, rows, slots, qvalid=None):
        """Write k/v of (rows, slots) into layer l's cache, then attend q over the valid slots <=
        each query's slot."""
        c = self.cache
        gqa = self.blocks.n_heads != self.blocks.n_kv_heads
        B = c["k"][l].shape[0]
        s0 = int(slots[0, 0]) if qvalid is None and slots.shape[1] == 1 else -1
        if s0 >= 0 and (rows.numel() == B or bool((slots == s0).all())):
            # one new token per row at one slot (the decode step): attend over the whole batch's
            # cache as it is (no gather of the running rows' keys), the running rows' queries in
            # their batch rows; the other rows' outputs are dropped
            every = rows.numel() == B
            if every:
                c["k"][l][:, :, s0] = k_new[:, :, 0]
                c["v"][l][:, :, s0] = v_new[:, :, 0]
                c["valid"][l][:, s0] = True
            else:
                c["k"][l][:, :, s0][rows] = k_new[:, :, 0]
                c["v"][l][:, :, s0][rows] = v_new[:, :, 0]
                c["valid"][l][:, s0][rows] = True
                q_all = q.new_zeros((B, *q.shape[1:]))
                q_all[rows] = q
                q = q_all
            valid = c["valid"][l][:, : s0 + 1]
            window = self.blocks.window(l)
            if window is not None and s0 + 1 > window:
                valid = valid.clone()
                valid[:, : s0 + 1 - window] = False
            if not every:  # a dropped row may have no valid key: let it see its slot
                valid = valid.clone()
                valid[:, s0] = True
            mask = self._with_bias(
                None if bool(valid.all()) else valid[:, None, None, :],
                slots if every else torch.full((B, 1), s0, device=q.device),
                s0 + 1,
            )
            out = F.scaled_dot_product_attention(
                q,
                c["k"][l][:, :, : s0 + 1],
                c["v"][l][:, :, : s0 + 1],
                attn_mask=mask,
                scale=self.blocks.scaling,
                enable_gqa=gqa,
            )
            return out if every else out[rows]
        if qvalid is None:
            c["k"][l][rows[:, None], :, slots] = k_new.transpose(1, 2)
            c["v"][l][rows[:, None], :, slots] = v_new.transpose(1, 2)
            c["valid"][l][rows[:, None], slots] = True
        else:
            r, s = rows[:, None].expand_as(slots)[qvalid], slots[qvalid]
            c["k"][l][r, :, s] = k_new.transpose(1, 2)[qvalid]
            c["v"][l][r, :, s] = v_new.transpose(1, 2)[qvalid]
            c["valid"][l][r, s] = True
        S = int(slots.max()) + 1
        k, v = c["k"][l][rows, :, :S], c["v"][l][rows, :, :S]
        ar = torch.arange(S, device=q.device)
        mask = c["valid"][l][rows, None, None, :S] & (
            ar[None, None, None, :] <= slots[:, None, :, None]
        )
        window = self.blocks.window(l)
        if window is not None:  # sliding-window attention: keys within the last `window` slots
            mask = mask & (ar[None, None, None, :] > slots[:, None, :, None] - window)
        mask = mask | (
            ar[None, None, None, :] == slots[:, None, :, None]
        )  # a query always sees itself
        mask = self._with_bias(mask, slots, S)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.blocks.scaling, enable_gqa=gqa
        )

    def _with_bias(self, mask, slots, S):
        """Fold the block's additive position bias (T5) into the attention mask."""
        if self.bias_cache is None:
            return mask
        bias = self.bias_cache[slots][:, :, :S].permute(0, 3, 1, 2)  # [B, H, t, S]
        return bias if mask is None else bias.masked_fill(~mask, float("-inf"))

    def _layer(self, l, h, rows, slots, positions, qvalid=None):
        q, k, v = self.blocks.qkv(l, h, positions)
        return self.blocks.finish(l, h, self._attend(l, q, k, v, rows, slots, qvalid), rows)

    # ------------------------------------------------------------------ generation
    def _prefill(
        self,
        input_ids,
        attention_mask,
        max_new_tokens,
        eos_token_id,
        pad_token_id,
        source_ids,
        source_mask,
        spare_slots: int,
    ):
        """Allocate the KV cache (prompt + new tokens + `spare_slots`), run the prompt through
        every layer; returns (ids, mask, stop ids, pad id, positions, last-position logits)."""
        model, blocks, L = self.model, self.blocks, self.L
        if max_new_tokens < 1 or input_ids.shape[1] < 1:
            raise EexitError("generation needs a non-empty prompt and max_new_tokens >= 1")
        dev = model.device
        ids = input_ids.to(dev)
        B, T0 = ids.shape
        mask = (
            torch.ones_like(ids, dtype=torch.bool)
            if attention_mask is None
            else attention_mask.to(dev).bool()
        )
        stops = None
        if eos_token_id is not None:
            eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
            stops = torch.tensor(eos, device=dev)
        pad = (
            pad_token_id
            if pad_token_id is not None
            else (int(stops[0]) if stops is not None else 0)
        )
        Tmax = T0 + max_new_tokens + spare_slots
        dtype = model.parts.lm_head.weight.dtype
        kv_shape = (B, blocks.n_kv_heads, Tmax, blocks.head_dim)
        # one tensor per kind for every layer ([L, ...], so that the skipped layers of KV
        # propagate are written at once); "k" / "v" / "valid" are its per-layer views
        k_all = torch.zeros((L, *kv_shape), device=dev, dtype=dtype)
        v_all = torch.zeros((L, *kv_shape), device=dev, dtype=dtype)
        valid_all = torch.zeros(L, B, Tmax, dtype=torch.bool, device=dev)
        self.cache = {
            "k_all": k_all,
            "v_all": v_all,
            "valid_all": valid_all,
            "k": list(k_all.unbind(0)),
            "v": list(v_all.unbind(0)),
            "valid": list(valid_all.unbind(0)),
        }
        pos = torch.zeros(B, Tmax, dtype=torch.long, device=dev)
        pos[:, :T0] = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 1)
        self.max_steps = max_new_tokens
        blocks.begin(
            None if source_ids is None else source_ids.to(dev),
            None if source_mask is None else source_mask.to(dev),
        )
        # relative position bias (T5) of every (query slot, key slot) pair, looked up per layer
        ar = torch.arange(Tmax, device=dev)
        bias = blocks.attn_bias(ar[None], ar)
        self.bias_cache = None if bias is None else bias[0].permute(1, 2, 0).to(dtype)
        # prefill: the whole prompt through every layer; pad slots are never valid keys
        all_rows = torch.arange(B, device=dev)
        slots = torch.arange(T0, device=dev).expand(B, T0)
        h = blocks.embed(ids, pos[:, :T0])
        for l in range(L):
            h = self._layer(l, h, all_rows, slots, pos[:, :T0], qvalid=mask)
        return ids, mask, stops, pad, pos, model.exit_logits(h[:, -1], L)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        source_ids: torch.Tensor | None = None,
        source_mask: torch.Tensor | None = None,
        stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> GenerationResult:
        """Encoder-decoder models: `source_ids` / `source_mask` are the encoder input and
        `input_ids` the decoder's start ([B, 1] decoder start token). `stop`, when given, is called
        after every token with the new tokens so far ([B, t]) and returns one bool per row: rows
        where it is True finish there (stop strings, e.g. lm-eval's `until`)."""
        model, L = self.model, self.L
        t0 = now(model.device)
        ids, mask, stops, pad, pos, logits = self._prefill(
            input_ids,
            attention_mask,
            max_new_tokens,
            eos_token_id,
            pad_token_id,
            source_ids,
            source_mask,
            spare_slots=0,
        )
        dev, (B, T0) = ids.device, ids.shape
        d, dtype = model.hidden_size, model.parts.lm_head.weight.dtype
        Tmax = T0 + max_new_tokens
        # recompute mode: hidden state of pending positions, and the layer they were computed to
        frontier = (
            torch.zeros(B, Tmax, d, device=dev, dtype=dtype)
            if self.kv_mode == "recompute"
            else None
        )
        depth = torch.full((B, Tmax), L, dtype=torch.long, device=dev)
        gen = torch.Generator(device=dev).manual_seed(seed) if do_sample else None
        out_tokens = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=dev)
        exit_layer = torch.zeros(B, max_new_tokens, dtype=torch.long, device=dev)
        decisions = torch.zeros(B, max_new_tokens, dtype=torch.long, device=dev)
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        tok = self._pick(logits, do_sample, temperature, top_k, gen)
        out_tokens[:, 0], exit_layer[:, 0] = tok, L
        if stops is not None:
            finished |= torch.isin(tok, stops)
        if stop is not None:
            finished |= stop(out_tokens[:, :1]).to(dev)
        for step in range(1, max_new_tokens):
            slot = T0 + step - 1  # the slot of the token fed in this step
            pos[:, slot] = pos[:, slot - 1] + 1
            rows = (~finished).nonzero().squeeze(1)
            if len(rows) == 0:
                break
            logits_out, layer_out, n_dec = self._step(
                out_tokens[rows, step - 1], rows, slot, pos, frontier, depth, step
            )
            tok = self._pick(logits_out, do_sample, temperature, top_k, gen)
            out_tokens[rows, step], exit_layer[rows, step], decisions[rows, step] = (
                tok,
                layer_out,
                n_dec,
            )
            if stops is not None:
                finished[rows] |= torch.isin(tok, stops)
            if stop is not None:
                finished |= stop(out_tokens[:, : step + 1]).to(dev)
        seconds = now(dev) - t0
        return GenerationResult(
            torch.cat([ids, out_tokens], 1), out_tokens, exit_layer, decisions, seconds, L
        )

    def _pick(self, logits, do_sample, temperature, top_k, gen):
        if not do_sample:
            return logits.argmax(-1)
        logits = logits.float() / max(temperature, 1e-6)
        if top_k:
            kth = logits.topk(top_k, -1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).squeeze(1)

    def _step(self, tokens, rows, slot, pos, frontier, depth, step):
        """One new token for `rows`: returns (output logits, exit layer, decisions) per row."""
        model, blocks, L, policy = self.model, self.blocks, self.L, self.policy
        n = len(rows)
        dev = tokens.device
        # the slots and positions of the running rows, indexed again only when rows exit
        slots, p = torch.full((n, 1), slot, device=dev), pos[rows, slot : slot + 1]
        h = blocks.embed(tokens[:, None], p)
        out_logits = torch.zeros(n, model.vocab_size, device=dev, dtype=h.dtype)
        out_layer = torch.full((n,), L, dtype=torch.long, device=dev)
        active = torch.arange(n, device=dev)  # indices into rows
        r = rows  # rows[active]
        # full mode: rows whose output is fixed but which still compute the deeper KV
        emitted = torch.zeros(n, dtype=torch.bool, device=dev) if self.kv_mode == "full" else None
        hist = [h[:, 0]]
        state: dict = {}
        for l in range(L):
            if self.kv_mode == "recompute":
                h = self._recompute_layer(l, h, r, slot, pos, frontier, depth)
            else:
                h = self._layer(l, h, r, slots, p)
            layer = l + 1
            if policy is not None:  # the states a policy may read ([n, d] per layer)
                if len(active) == n:  # every row still running: the output itself, no copy
                    hist.append(h[:, 0])
                else:
                    full_h = torch.zeros(n, h.shape[-1], device=dev, dtype=h.dtype)
                    full_h[active] = h[:, 0]
                    hist.append(full_h)
            if layer == L:
                last = model.exit_logits(h[:, 0], L)
                if emitted is None:
                    out_logits[active] = last
                else:
                    keep = ~emitted[active]
                    out_logits[active[keep]] = last[keep]
                break
            if layer not in self.exits or policy is None:
                continue
            if emitted is None:  # every running row decides
                deciding, sel, h_dec = None, active, h[:, 0]
            else:
                deciding = ~emitted[active]
                if not bool(deciding.any()):
                    continue
                sel, h_dec = active[deciding], h[deciding, 0]
            view = ExitView(
                layer,
                L,
                _Rows(hist, sel),
                lambda hh=h_dec, la=layer: model.exit_logits(hh, la),
                model,
                state,
                torch.full((len(sel),), step, device=dev),
                self.max_steps,
            )
            go = policy.decide(view)
            if not bool(go.any()):
                continue
            done = sel[go]
            logits = (
                view.logits[go]
                if "logits" in view.__dict__
                else model.exit_logits(h_dec[go], layer)
            )
            out_logits[done] = logits.to(out_logits.dtype)
            out_layer[done] = layer
            _subset_state(state, ~go)
            if deciding is None:
                exiting = go
            else:
                exiting = torch.zeros(len(active), dtype=torch.bool, device=dev)
                exiting[deciding.nonzero().squeeze(1)[go]] = True
            if self.kv_mode == "full":
                emitted[active[exiting]] = True
                continue
            h_exit, r_exit = h[exiting], r[exiting]
            if self.kv_mode == "propagate":  # CALM: skipped layers' K/V from the exited state
                self._fill_skipped(l + 1, h_exit, r_exit, slot, p[exiting])
            else:  # recompute: pending at this depth, filled by the row's next deeper token
                frontier[r_exit, slot] = h_exit[:, 0]
                depth[r_exit, slot] = layer
            if len(done) == len(active):  # every running row has left
                break
            stay = ~exiting
            active, h, r, slots, p = active[stay], h[stay], r[stay], slots[stay], p[stay]
        # a row decided at every scored exit up to the one it left at (once its output is fixed,
        # a full-mode row decides no more)
        n_dec = (self.exit_tensor[None, :] <= out_layer[:, None]).sum(1)
        return out_logits, out_layer, n_dec

    def _fill_skipped(self, first: int, h, rows, slot: int, positions) -> None:
        """KV propagate: layers first..L-1 (0-based) get the keys and values of the exited state
        h [m, 1, d] at `slot`, all skipped layers at once (`BlockAdapter.kv_many`)."""
        c = self.cache
        k, v = self.blocks.kv_many(first, self.L, h, positions)  # [layers, m, Hkv, 1, dh]
        c["k_all"][first:, :, :, slot][:, rows] = k[:, :, :, 0]
        c["v_all"][first:, :, :, slot][:, rows] = v[:, :, :, 0]
        c["valid_all"][first:, :, slot][:, rows] = True

    def _recompute_layer(self, l, h, r, slot, pos, frontier, depth):
        """Layer l for the current token of rows r plus their pending positions computed up to layer
        l."""
        dev = h.device
        pending = depth[r, :slot] == l  # computed through layer l (0-based l = layers done)
        counts = pending.sum(1)
        P = int(counts.max()) if len(counts) else 0
        if P == 0:
            return self._layer(
                l, h, r, torch.full((len(r), 1), slot, device=dev), pos[r, slot : slot + 1]
            )
        # chunk per row: its pending slots (ascending, padded) then the current slot
        order = torch.sort(
            torch.where(
                pending, torch.arange(slot, device=dev), slot + 1 + torch.arange(slot, device=dev)
            ),
            1,
        ).values[:, :P]
        qvalid = torch.cat(
            [
                torch.arange(P, device=dev)[None] < counts[:, None],
                torch.ones(len(r), 1, dtype=torch.bool, device=dev),
            ],
            1,
        )
        slots = torch.cat([order.clamp(max=slot - 1), torch.full((len(r), 1), slot, device=dev)], 1)
        chunk = torch.cat([frontier[r[:, None], slots[:, :P]], h], 1)
        out = self._layer(
            l,
            chunk,
            r,
            torch.where(qvalid, slots, torch.full_like(slots, slot)),
            pos[r[:, None], slots],
            qvalid,
        )
        rr, ss = r[:, None].expand(-1, P)[qvalid[:, :P]], slots[:, :P][qvalid[:, :P]]
        frontier[rr, ss] = out[:, :P][qvalid[:, :P]]
        depth[rr, ss] = l + 1
        return out[:, P:]
