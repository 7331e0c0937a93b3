"""Generation evaluation: early-exit decoding against full-depth decoding of the same model on
the same prompts (per sample and in total): tokens/s, mean exit layer, compute % with the
decision overhead and KV filling counted in layer-equivalents, agreement with the full output."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eexit.data import corpora as data_mod
from eexit.errors import EexitError
from eexit.evaluation.context import EvalContext, max_positions
from eexit.evaluation.records import layer_macs
from eexit.models.decoding import EarlyExitDecoder, GenerationResult, check_kv_mode
from eexit.models.speculative import SelfSpeculativeDecoder
from eexit.reporting import provenance, write_results

MODES = ("early-exit", "self-spec")


@dataclass(kw_only=True)
class GenerationOptions:
    prompts: int = 8  # number of prompts (from the starts of the split's documents)
    prompt_len: int = 32  # tokens per prompt
    max_new_tokens: int = 32  # tokens generated per prompt (fixed length: no stop at EOS)
    batch_size: int = 1  # prompts decoded together
    kv_mode: str = "propagate"  # KV of skipped layers: full | propagate | recompute
    mode: str = "early-exit"  # early-exit (the policy decides) | self-spec (draft, then verify)
    draft_layer: int | None = None  # self-spec: the exit that drafts (default: a quarter deep)
    draft_length: int = 4  # self-spec: tokens drafted per verification
    # self-spec: the draft head scores only the K most frequent tokens of the dataset's train
    # split (0 = the whole vocabulary); cheaper drafts, output unchanged
    draft_vocab: int = 0

    def check(self) -> None:
        check_kv_mode(self.kv_mode)
        if self.mode not in MODES:
            raise EexitError(f"unknown --mode {self.mode!r}; valid: {', '.join(MODES)}")
        if self.draft_vocab < 0:
            raise EexitError(f"--draft-vocab must be >= 0 (0 = all tokens); got {self.draft_vocab}")
        if self.prompts < 1 or self.prompt_len < 1 or self.max_new_tokens < 2:
            raise EexitError("--prompts and --prompt-len must be >= 1 and --max-new-tokens >= 2")


def prompts_from(tokenizer, dataset: str, split: str, n: int, length: int) -> torch.Tensor:
    docs = data_mod.corpus_split(data_mod.load_corpus(dataset), split, dataset)
    out = []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == n:
            break
    if not out:
        raise EexitError(f"no document of {dataset}/{split} has {length} tokens for a prompt")
    return torch.tensor(out)


def token_costs(
    model, decoder: EarlyExitDecoder, res: GenerationResult, context: float
) -> torch.Tensor:
    """Executed layer-equivalents per generated token (excluding the first, which is full depth)."""
    L = res.num_layers
    exit_l = res.exit_layers[:, 1:].float()
    policy = decoder.policy
    lm = layer_macs(model, context)
    dec_cost = model.decision_macs(policy) / lm if policy is not None else 0.0
    reuse = dec_cost if (policy is not None and policy.reuses_exit_logits) else 0.0
    extra = model.first_decision_extra_macs(policy) / lm if policy is not None else 0.0
    n_dec = res.decisions[:, 1:].float()
    overhead = n_dec * dec_cost + (n_dec > 0).float() * extra - (exit_l < L).float() * reuse
    if decoder.kv_mode in (
        "full",
        "recompute",
    ):  # recompute runs the skipped layers later, for the pending positions
        layers = torch.full_like(exit_l, float(L))
    else:  # propagate: skipped layers cost their key/value projections only
        kv = 2 * model.hidden_size * decoder.blocks.n_kv_heads * decoder.blocks.head_dim / lm
        layers = exit_l + (L - exit_l) * kv
    return layers + overhead


def compare(
    model,
    decoder: EarlyExitDecoder,
    reference: EarlyExitDecoder,
    prompts: torch.Tensor,
    g: GenerationOptions,
    eos: int | None,
    pad: int | None,
) -> tuple[list[dict], dict]:
    rows, totals = (
        [],
        {
            "ee_tokens": 0,
            "ee_seconds": 0.0,
            "full_seconds": 0.0,
            "agree": 0.0,
            "cost": 0.0,
            "exit": 0.0,
            "n": 0,
        },
    )
    L = model.num_layers
    reference.generate(prompts[:1], None, 2, pad_token_id=pad)  # warm-up
    decoder.generate(prompts[:1], None, 2, pad_token_id=pad)
    if isinstance(decoder, SelfSpeculativeDecoder):
        decoder.reset_stats()  # count the measured runs only
    for i in range(0, len(prompts), g.batch_size):
        x = prompts[i : i + g.batch_size]
        full = reference.generate(x, None, g.max_new_tokens, eos_token_id=eos, pad_token_id=pad)
        ee = decoder.generate(x, None, g.max_new_tokens, eos_token_id=eos, pad_token_id=pad)
        ctx = x.shape[1] + g.max_new_tokens / 2
        cost = token_costs(model, decoder, ee, ctx)
        for b in range(len(x)):
            same = (ee.new_tokens[b] == full.new_tokens[b]).float()
            prefix = int(same.cumprod(0).sum())
            rows.append(
                {
                    "sample": i + b,
                    "tokens_per_s": len(x) * g.max_new_tokens / ee.seconds
                    if g.batch_size == 1
                    else None,
                    "mean_exit_layer": ee.exit_layers[b, 1:].float().mean().item(),
                    "compute_pct": 100 * cost[b].mean().item() / L,
                    "agreement_pct": 100 * same.mean().item(),
                    "identical_prefix": prefix,
                }
            )
            totals["agree"] += same.sum().item()
            totals["cost"] += cost[b].sum().item()
            totals["exit"] += ee.exit_layers[b, 1:].float().sum().item()
            totals["n"] += cost.shape[1]
        totals["ee_tokens"] += len(x) * g.max_new_tokens
        totals["ee_seconds"] += ee.seconds
        totals["full_seconds"] += full.seconds
    n_new = totals["ee_tokens"]
    total = {
        "tokens_per_s": n_new / totals["ee_seconds"],
        "full_tokens_per_s": n_new / totals["full_seconds"],
        "speedup": totals["full_seconds"] / totals["ee_seconds"],
        "mean_exit_layer": totals["exit"] / totals["n"],
        "compute_pct": 100 * totals["cost"] / (totals["n"] * L),
        "agreement_pct": 100 * totals["agree"] / (len(prompts) * g.max_new_tokens),
    }
    total["realized_over_ideal"] = total["speedup"] * total["compute_pct"] / 100
    if isinstance(decoder, SelfSpeculativeDecoder):
        # every drafted position runs all L layers (k while drafting, L - k while verifying)
        # plus a draft exit head (over the draft vocabulary when there is one); what
        # speculation saves is sequential passes, not layers
        st = decoder.stats
        rows_scored = model.vocab_size if decoder.draft_vocab is None else len(decoder.draft_vocab)
        head = model.hidden_size * rows_scored / layer_macs(model, ctx)
        layers = st.drafted * (L + head)
        total["compute_pct"] = 100 * layers / (total_tokens(decoder) * L)
        total["acceptance_rate"] = st.acceptance_rate
        total.update(decoder.time_shares)
        total["tokens_per_cycle"] = st.tokens_per_cycle
        total["realized_over_ideal"] = None
    return rows, total


def total_tokens(decoder) -> int:
    st = decoder.stats
    return max(1, st.accepted + st.cycles)


def run_generation(ctx: EvalContext, g: GenerationOptions, out: str | None) -> tuple[list, dict]:
    """`evaluate --generate`: early-exit vs full-depth decoding on prompts from the split."""
    g.check()
    r, model = ctx.request, ctx.model
    if ctx.is_task:
        raise EexitError(
            f"--generate decodes LM prompts; on the task dataset {ctx.dataset!r} run evaluate "
            "without --generate (it reports speedup and agreement with full-depth decoding next "
            "to the task metric)"
        )
    if ctx.runtime.world > 1:
        raise EexitError(
            "--generate measures decoding speed in one process; run it without accelerate launch "
            "(teacher-forced evaluation, task decoding, sweep, calibrate and analysis shard "
            "across processes)"
        )
    limit = max_positions(model)
    if limit and g.prompt_len + g.max_new_tokens > limit:
        raise EexitError(
            f"--prompt-len + --max-new-tokens must be <= {limit} (the model's positions); "
            f"got {g.prompt_len + g.max_new_tokens}"
        )
    if g.mode == "self-spec":
        k = g.draft_layer or max(1, model.num_layers // 4)
        vocab = (
            data_mod.frequent_tokens(ctx.tokenizer, ctx.dataset, g.draft_vocab)
            if g.draft_vocab
            else None
        )
        decoder = SelfSpeculativeDecoder(model, k, g.draft_length, vocab)
    else:
        decoder = EarlyExitDecoder(model, ctx.policy, g.kv_mode)
    reference = EarlyExitDecoder(model, None, "full")
    x = prompts_from(ctx.tokenizer, ctx.dataset, r.split, g.prompts, g.prompt_len)
    rows, total = compare(model, decoder, reference, x, g, None, ctx.tokenizer.pad_token_id)
    if out:
        title = f"Early-exit decoding: {r.policy} @ {ctx.policy.threshold}, kv {g.kv_mode}"
        if g.mode == "self-spec":
            title = f"Self-speculative decoding: draft layer {decoder.k}, {g.draft_length} drafts"
            if g.draft_vocab:
                title += f" over the {g.draft_vocab} most frequent tokens"
        prov = provenance(ctx.resolved(**g.__dict__))
        write_results(out, "generation", title, rows + [{"sample": "total", **total}], prov)
    return rows, total
