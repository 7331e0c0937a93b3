"""Self-speculative decoding (LayerSkip): the first k layers and their exit draft tokens, the
remaining layers verify them, and the longest agreeing prefix is kept.

One cycle per row: the row's last token and its drafts run through layers 1..k one at a time
(their keys and values go into the cache as usual), each draft being the exit-k prediction of
the position before it. Then layers k+1..L run once over all drafted positions together,
starting from the hidden states the draft already computed at layer k (no layer is computed
twice), and give the full model's prediction at every drafted position.

- Greedy: drafts are kept while they equal the full model's argmax; the first that differs is
  replaced by the full model's token. Every kept token is the full model's greedy token given
  full-depth keys and values of everything before it, so the output equals full-depth greedy
  decoding token for token.
- Sampling: draft x ~ q (exit k) is kept with probability min(1, p(x) / q(x)) (p: the full
  model); at the first rejection a token is drawn from norm(max(0, p - q)). Each emitted token
  is then distributed as the full model's sample (the standard speculative acceptance rule).

Drafting cost: a draft is layers 1..k plus the exit's LM head, and on a model with a large
vocabulary the head is the bigger part (SmolLM2-135M: 49,152 x 576, about 8 blocks).
`draft_vocab` (token ids, e.g. the most frequent tokens of a corpus) restricts the draft head to
those rows: drafts outside the list are never proposed, which can only lower acceptance, while
the output stays exactly the full model's (greedy: verified token by token; sampling: the
proposal q is zero outside the list and the acceptance rule above is exact for any q).

Rows of a batch accept different numbers of drafts, so each row advances its own cache slot.
The keys and values of rejected drafts are dropped (their slots marked invalid), so the cache
always holds exactly the full model's keys and values: there is no KV approximation to choose.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eexit.errors import EexitError
from eexit.models.decoding import EarlyExitDecoder, GenerationResult
from eexit.runtime import now


@dataclass
class SpeculativeStats:
    cycles: int  # draft + verify cycles (summed over rows)
    drafted: int  # draft tokens proposed
    accepted: int  # draft tokens kept
    draft_seconds: float = 0.0  # wall-clock time in the draft passes (layers 1..k + exit head)
    verify_seconds: float = 0.0  # in the verification passes (layers k+1..L + head)
    total_seconds: float = 0.0  # in generate, prefill and bookkeeping included
    emitted: int = 0  # tokens the cycles emitted (a cycle that keeps every draft adds no other)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(1, self.drafted)

    @property
    def tokens_per_cycle(self) -> float:
        """Mean tokens emitted per verification: the accepted drafts, plus the full model's
        token where a draft was rejected (the verification does not reach past the last draft),
        as far as the row still had room."""
        return self.emitted / max(1, self.cycles)


class SelfSpeculativeDecoder(EarlyExitDecoder):
    """Draft with layers 1..`draft_layer` (and that layer's exit), verify with the rest."""

    def __init__(
        self,
        model,
        draft_layer: int,
        draft_length: int = 4,
        draft_vocab: torch.Tensor | None = None,
    ):
        super().__init__(model, None, "full")
        if not 1 <= draft_layer < self.L:
            raise EexitError(f"--draft-layer must be in 1..{self.L - 1}; got {draft_layer}")
        if draft_length < 1:
            raise EexitError(f"--draft-length must be >= 1; got {draft_length}")
        self.k, self.D = int(draft_layer), int(draft_length)
        self.draft_vocab = None
        if draft_vocab is not None:
            ids = torch.as_tensor(draft_vocab, dtype=torch.long, device=self.model.device)
            V = self.model.vocab_size
            if ids.ndim != 1 or len(ids) == 0 or int(ids.min()) < 0 or int(ids.max()) >= V:
                raise EexitError(f"the draft vocabulary must be token ids in 0..{V - 1}")
            self.draft_vocab = ids
            own = (
                self.model.exit_heads[str(self.k)] if str(self.k) in self.model.exit_heads else None
            )
            norm, head = self.model.parts.final_norm, self.model.parts.lm_head
            if own is not None:  # a separate exit head: its own norm and rows
                norm, head = own[0], own[1]
            self._draft_norm = norm
            self._draft_rows = head.weight[ids]  # [K, d]
            bias = getattr(head, "bias", None)
            self._draft_bias = bias[ids] if bias is not None else None
        self.reset_stats()
        self.row_cycles = torch.zeros(0, dtype=torch.long)  # per row of the last generate call

    def _draft_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Exit-k logits for drafting: the whole vocabulary, or the draft vocabulary's rows
        (then [n, K], token i meaning draft_vocab[i])."""
        if self.draft_vocab is None:
            return self.model.exit_logits(h, self.k).float()
        logits = self._draft_norm(self.model.translate(h, self.k)) @ self._draft_rows.T
        return (logits if self._draft_bias is None else logits + self._draft_bias).float()

    def reset_stats(self) -> None:
        """Statistics add up over `generate` calls until reset."""
        self.stats = SpeculativeStats(0, 0, 0)

    @property
    def time_shares(self) -> dict[str, float]:
        """Where generate's time went: draft, verify and the rest (prefill, acceptance,
        bookkeeping), in % of the total; the profile of a missed speedup."""
        st = self.stats
        total = max(st.total_seconds, 1e-12)
        rest = total - st.draft_seconds - st.verify_seconds
        return {
            "draft_time_pct": 100 * st.draft_seconds / total,
            "verify_time_pct": 100 * st.verify_seconds / total,
            "other_time_pct": 100 * rest / total,
        }

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
    ) -> GenerationResult:
        """Same arguments and result as `EarlyExitDecoder.generate`; `exit_layers` holds
        `draft_layer` for accepted drafts and the depth for the verifier's tokens."""
        if top_k:
            raise EexitError("self-speculative sampling takes the full distribution (top_k=0)")
        L, k, D = self.L, self.k, self.D
        t0 = now(self.model.device)
        ids, _, stops, pad, pos, logits = self._prefill(
            input_ids,
            attention_mask,
            max_new_tokens,
            eos_token_id,
            pad_token_id,
            source_ids,
            source_mask,
            spare_slots=D + 1,
        )
        dev, (B, T0) = ids.device, ids.shape
        gen = torch.Generator(device=dev).manual_seed(seed) if do_sample else None
        out = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=dev)
        exit_layer = torch.zeros(B, max_new_tokens, dtype=torch.long, device=dev)
        first = self._pick(logits, do_sample, temperature, 0, gen)
        out[:, 0], exit_layer[:, 0] = first, L
        n_out = torch.ones(B, dtype=torch.long, device=dev)  # tokens emitted per row
        cur = torch.full((B,), T0, dtype=torch.long, device=dev)  # slot of each row's last token
        finished = torch.isin(first, stops) if stops is not None else torch.zeros_like(n_out) > 0
        finished |= n_out >= max_new_tokens
        self.row_cycles = torch.zeros(B, dtype=torch.long)  # what each row's tokens cost
        while not finished.all():
            rows = (~finished).nonzero().squeeze(1)
            self.row_cycles[rows.cpu()] += 1
            last = out[rows, n_out[rows] - 1]
            t_draft = now(dev)
            drafts, q, hk = self._draft(last, rows, cur[rows], pos, do_sample, temperature, gen)
            t_verify = now(dev)
            p = self._verify(hk, rows, cur[rows], pos)  # [n, D, V] full-model logits
            self.stats.draft_seconds += t_verify - t_draft
            self.stats.verify_seconds += now(dev) - t_verify
            keep, emit = self._accept(drafts, q, p, do_sample, temperature, gen)
            self.stats.cycles += len(rows)
            self.stats.drafted += len(rows) * D
            self.stats.accepted += int(keep.sum())
            for i, r in enumerate(rows.tolist()):
                a = int(keep[i])
                toks = emit[i, : a + (1 if a < D else 0)]
                layers = [k] * a + ([L] if a < D else [])
                room = max_new_tokens - int(n_out[r])
                toks, layers = toks[:room], layers[:room]
                if stops is not None:
                    hit = torch.isin(toks, stops).nonzero()
                    if len(hit):
                        toks, layers = toks[: int(hit[0]) + 1], layers[: int(hit[0]) + 1]
                        finished[r] = True
                start = int(n_out[r])
                self.stats.emitted += len(toks)
                out[r, start : start + len(toks)] = toks
                exit_layer[r, start : start + len(toks)] = torch.tensor(layers, device=dev)
                n_out[r] += len(toks)
                # slots cur .. cur+a hold full-depth KV of the last token and the kept drafts;
                # the rejected drafts' slots are dropped
                s0 = int(cur[r])
                processed = a + 1 if a < D else D
                for l in range(L):
                    self.cache["valid"][l][r, s0 + processed : s0 + D] = False
                cur[r] = s0 + processed
                finished[r] |= bool(n_out[r] >= max_new_tokens)
        seconds = now(dev) - t0
        self.stats.total_seconds += seconds
        decisions = torch.zeros_like(exit_layer)
        return GenerationResult(torch.cat([ids, out], 1), out, exit_layer, decisions, seconds, L)

    # ------------------------------------------------------------------ the two passes
    def _draft(self, last, rows, cur, pos, do_sample, temperature, gen):
        """D draft tokens per row from layers 1..k: (drafts [n, D], draft probabilities
        [n, D, V] or None, layer-k states of the D processed positions [n, D, d])."""
        model, k, D = self.model, self.k, self.D
        n = len(rows)
        tok, drafts, probs, states = last, [], [], []
        every = torch.ones(n, 1, dtype=torch.bool, device=last.device)
        for j in range(D):
            slots = (cur + j)[:, None]
            pos[rows, cur + j] = pos[rows, cur + j - 1] + 1
            p = pos[rows[:, None], slots]
            h = self.blocks.embed(tok[:, None], p)
            for l in range(k):
                h = self._layer(l, h, rows, slots, p, qvalid=every)
            states.append(h[:, 0])
            logits = self._draft_logits(h[:, 0])
            if do_sample:
                q = torch.softmax(logits / max(temperature, 1e-6), -1)
                tok = torch.multinomial(q, 1, generator=gen).squeeze(1)
                if self.draft_vocab is not None:  # q over the whole vocabulary, 0 off the list
                    q = torch.zeros(n, model.vocab_size, device=q.device).index_copy_(
                        1, self.draft_vocab, q
                    )
                probs.append(q)
            else:
                tok = logits.argmax(-1)
            if self.draft_vocab is not None:
                tok = self.draft_vocab[tok]
            drafts.append(tok)
        q = torch.stack(probs, 1) if do_sample else None
        return torch.stack(drafts, 1), q, torch.stack(states, 1)

    def _verify(self, hk, rows, cur, pos):
        """Layers k+1..L over the D drafted positions at once; full-model logits [n, D, V]."""
        D = self.D
        slots = cur[:, None] + torch.arange(D, device=hk.device)[None]
        p = pos[rows[:, None], slots]
        every = torch.ones_like(slots, dtype=torch.bool)
        h = hk
        for l in range(self.k, self.L):
            h = self._layer(l, h, rows, slots, p, qvalid=every)
        return self.model.exit_logits(h, self.L).float()

    def _accept(self, drafts, q, p_logits, do_sample, temperature, gen):
        """(kept drafts per row [n], emitted tokens [n, D]: the kept drafts, then the
        verifier's token at the first rejection)."""
        n, D = drafts.shape
        if not do_sample:
            full = p_logits.argmax(-1)  # [n, D]: the full model's token after each position
            agree = (drafts == full).int()
            keep = agree.cumprod(1).sum(1)
            return keep, torch.where(agree.cumprod(1).bool(), drafts, full)
        p = torch.softmax(p_logits / max(temperature, 1e-6), -1)
        pd = p.gather(2, drafts[..., None]).squeeze(2)
        qd = q.gather(2, drafts[..., None]).squeeze(2)
        u = torch.rand(n, D, generator=gen, device=drafts.device)
        ok = (u < (pd / qd.clamp_min(1e-20)).clamp(max=1.0)).int()
        keep = ok.cumprod(1).sum(1)
        emit = drafts.clone()
        for i in range(n):
            a = int(keep[i])
            if a < D:  # the first rejection: sample from the residual norm(max(0, p - q))
                resid = (p[i, a] - q[i, a]).clamp_min(0.0)
                resid = resid / resid.sum() if resid.sum() > 0 else p[i, a]
                emit[i, a] = torch.multinomial(resid, 1, generator=gen)
        return keep, emit
