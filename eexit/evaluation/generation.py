"""Generation evaluation: early-exit decoding against full-depth decoding of the same model on
the same prompts (per sample and in total): tokens/s, mean exit layer, compute % with the
decision overhead and KV filling counted in layer-equivalents, agreement with the full output."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from eexit.data import corpora as data_mod
from eexit.errors import EexitError
from eexit.evaluation.context import EvalContext, max_positions
from eexit.evaluation.records import layer_macs
from eexit.evaluation.timing import interleaved, speedup_interval, transformers_greedy
from eexit.models.decoding import EarlyExitDecoder, GenerationResult, check_kv_mode
from eexit.models.speculative import SelfSpeculativeDecoder
from eexit.registry import unknown_name_error
from eexit.reporting import provenance, write_results

MODES = ("early-exit", "self-spec")
DRAFT_LENGTH = 4  # self-spec: tokens drafted per verification, when --draft-length is not given
# options that mean something with --generate only (None: not given)
GENERATE_ONLY = (
    "prompts",
    "prompt_len",
    "mode",
    "draft_layer",
    "draft_length",
    "draft_vocab",
    "rounds",
)
MAX_ROUNDS = 100  # --rounds: interleaved timing rounds
SELF_SPEC_ONLY = ("draft_layer", "draft_length", "draft_vocab")


def flag(name: str, value=None) -> str:
    """An option as the user typed it: `--draft-layer 0`."""
    return f"--{name.replace('_', '-')}" + ("" if value is None else f" {value}")


@dataclass(kw_only=True)
class GenerationOptions:
    """`evaluate --generate`; the self-spec options are None where not given, so that one given
    in early-exit mode is refused rather than ignored (`check`, before the model loads)."""

    prompts: int = 8  # number of prompts (from the starts of the split's documents)
    prompt_len: int = 32  # tokens per prompt
    max_new_tokens: int = 32  # tokens generated per prompt (fixed length: no stop at EOS)
    batch_size: int = 1  # prompts decoded together
    kv_mode: str = "propagate"  # KV of skipped layers: full | propagate | recompute
    mode: str = "early-exit"  # early-exit (the policy decides) | self-spec (draft, then verify)
    draft_layer: int | None = None  # self-spec: the exit that drafts (default: a quarter deep)
    draft_length: int | None = None  # self-spec: tokens drafted per verification (default 4)
    # self-spec: the draft head scores only the K most frequent tokens of the dataset's train
    # split (0 or None = the whole vocabulary); cheaper drafts, output unchanged
    draft_vocab: int | None = None
    rounds: int = 3  # interleaved timing rounds (each decoder once per round, after a warm-up)

    def check(self) -> None:
        """Everything that can be checked without the model (the depth and vocabulary next,
        in `check_model`)."""
        check_kv_mode(self.kv_mode)
        if self.mode not in MODES:
            raise unknown_name_error("--mode", self.mode, list(MODES))
        given = [flag(k, getattr(self, k)) for k in SELF_SPEC_ONLY if getattr(self, k) is not None]
        if self.mode != "self-spec" and given:
            raise EexitError(
                f"{', '.join(given)}: for --mode self-spec only (this run is --mode {self.mode}); "
                "add --mode self-spec or drop them"
            )
        if self.draft_layer is not None and self.draft_layer < 1:
            raise EexitError(
                f"--draft-layer must be >= 1 (layers count from 1, and the drafting exit lies "
                f"below the depth); got {self.draft_layer}"
            )
        if self.draft_length is not None and self.draft_length < 1:
            raise EexitError(f"--draft-length must be >= 1; got {self.draft_length}")
        if self.draft_vocab is not None and self.draft_vocab < 0:
            raise EexitError(f"--draft-vocab must be >= 0 (0 = all tokens); got {self.draft_vocab}")
        if self.prompts < 1 or self.prompt_len < 1 or self.max_new_tokens < 2:
            raise EexitError("--prompts and --prompt-len must be >= 1 and --max-new-tokens >= 2")
        if not 1 <= self.rounds <= MAX_ROUNDS:
            raise EexitError(f"--rounds must be in 1..{MAX_ROUNDS}; got {self.rounds}")

    def check_model(self, model) -> None:
        """The checks that need the loaded model (its depth and vocabulary), before any work;
        fills in the self-spec defaults, so that the provenance says what ran."""
        if self.mode != "self-spec":
            return
        L, V = model.num_layers, model.vocab_size
        if L < 2:
            raise EexitError(
                "--mode self-spec drafts with the first layers and verifies with the rest: it "
                f"needs a model of at least 2 layers; this one has {L}"
            )
        k = self.draft_layer if self.draft_layer is not None else max(1, L // 4)
        if not 1 <= k < L:
            raise EexitError(
                f"--draft-layer must be in 1..{L - 1} (below the model's {L} layers); got {k}"
            )
        if self.draft_vocab is not None and self.draft_vocab > V:
            raise EexitError(
                f"--draft-vocab must be <= the vocabulary size {V} (0 = every token); "
                f"got {self.draft_vocab}"
            )
        self.draft_layer = k
        self.draft_length = self.draft_length if self.draft_length is not None else DRAFT_LENGTH
        self.draft_vocab = self.draft_vocab or 0


def generation_options(generate: bool, **options) -> GenerationOptions | None:
    """The options of `evaluate --generate`, checked (None values: not given, the defaults
    apply). Without --generate, any option that only decoding reads is refused, not ignored."""
    given = {k: v for k, v in options.items() if v is not None}
    if not generate:
        only = [flag(k, given[k]) for k in GENERATE_ONLY if k in given]
        if only:
            raise EexitError(
                f"{', '.join(only)}: for --generate only (decoding speed and agreement); add "
                "--generate or drop " + ("it" if len(only) == 1 else "them")
            )
        return None
    g = GenerationOptions(**given)
    g.check()
    return g


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
    model,
    decoder: EarlyExitDecoder,
    res: GenerationResult,
    context: float,
    row_cycles: torch.Tensor | None = None,
) -> torch.Tensor:
    """Executed layer-equivalents per generated token (excluding the first, which is full depth),
    [rows, new tokens - 1]. Self-spec: `row_cycles` of the call that gave `res` (default: the
    decoder's last call)."""
    if isinstance(decoder, SelfSpeculativeDecoder):
        return speculative_costs(model, decoder, res, context, row_cycles)
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


def speculative_costs(
    model,
    decoder: SelfSpeculativeDecoder,
    res: GenerationResult,
    context: float,
    row_cycles: torch.Tensor | None = None,
) -> torch.Tensor:
    """Layer-equivalents per generated token (excluding the first) of self-speculative decoding,
    each row's work spread evenly over its tokens. A cycle runs its D positions through all L
    layers (k drafting, L - k verifying), D draft heads (over the draft vocabulary) and D
    verifier heads; one verifier head per emitted token is the head full-depth decoding runs
    too, so only the others count (the full model's head is not in its L layers either)."""
    L, D = res.num_layers, decoder.D
    lm = layer_macs(model, context)
    scored = model.vocab_size if decoder.draft_vocab is None else len(decoder.draft_vocab)
    draft_head = (model.hidden_size * scored + model.adapter_macs) / lm
    full_head = model.hidden_size * model.vocab_size / lm
    emitted = (res.exit_layers[:, 1:] > 0).sum(1).float().cpu()  # pads have no exit layer
    positions = (decoder.row_cycles if row_cycles is None else row_cycles).float() * D
    work = positions * (L + draft_head) + (positions - emitted) * full_head
    per_token = work / emitted.clamp_min(1)
    return per_token[:, None].expand(-1, res.exit_layers.shape[1] - 1).clone()


def compare(
    model,
    decoder: EarlyExitDecoder,
    reference: EarlyExitDecoder,
    prompts: torch.Tensor,
    g: GenerationOptions,
    eos: int | None,
    pad: int | None,
) -> tuple[list[dict], dict]:
    """`decoder` against full-depth `reference` and, for decoder-only models, transformers'
    greedy `generate` on the same prompts, timed in `g.rounds` interleaved rounds after a
    warm-up (`timing.interleaved`): speedups are ratios of median times, with the 95 % interval
    of the paired per-round ratios. Per-sample rows come from the last round."""
    L, dev = model.num_layers, model.device
    new = g.max_new_tokens
    chunks = [prompts[i : i + g.batch_size].to(dev) for i in range(0, len(prompts), g.batch_size)]
    spec = isinstance(decoder, SelfSpeculativeDecoder)

    def decode(dec):
        def go():
            outs = []
            for x in chunks:
                res = dec.generate(x, None, new, eos_token_id=eos, pad_token_id=pad)
                outs.append((res, dec.row_cycles.clone() if dec is decoder and spec else None))
            return outs

        return go

    fns = {"decoder": decode(decoder), "full": decode(reference)}
    if model.parts.encoder is None:  # decoder-only: transformers' greedy generate as well
        fns["transformers"] = lambda: [transformers_greedy(model, x, new) for x in chunks]
    times, outs = interleaved(fns, g.rounds, dev, decoder.reset_stats if spec else None)
    t_dec, t_full = statistics.median(times["decoder"]), statistics.median(times["full"])
    rows, agree, cost_sum, exit_sum, n_cost = [], 0.0, 0.0, 0.0, 0
    exits, decisions = [], []
    for i, ((ee, cycles), (full, _)) in enumerate(zip(outs["decoder"], outs["full"])):
        x = chunks[i]
        cost = token_costs(model, decoder, ee, x.shape[1] + new / 2, cycles)
        exits.append(ee.exit_layers[:, 1:])
        decisions.append(ee.decisions[:, 1:])
        for b in range(len(x)):
            same = (ee.new_tokens[b] == full.new_tokens[b]).float()
            rows.append(
                {
                    "sample": i * g.batch_size + b,
                    "mean_exit_layer": ee.exit_layers[b, 1:].float().mean().item(),
                    "compute_pct": 100 * cost[b].mean().item() / L,
                    "agreement_pct": 100 * same.mean().item(),
                    "identical_prefix": int(same.cumprod(0).sum()),
                }
            )
            agree += same.sum().item()
            cost_sum += cost[b].sum().item()
            exit_sum += ee.exit_layers[b, 1:].float().sum().item()
            n_cost += cost.shape[1]
    n_new = len(prompts) * new
    lo, hi = speedup_interval(times["full"], times["decoder"])
    total = {
        "tokens_per_s": n_new / t_dec,
        "full_tokens_per_s": n_new / t_full,
        "speedup": t_full / t_dec,
        "speedup_ci95_low": lo,
        "speedup_ci95_high": hi,
    }
    if "transformers" in times:
        t_hf = statistics.median(times["transformers"])
        lo, hi = speedup_interval(times["transformers"], times["decoder"])
        total.update(
            transformers_tokens_per_s=n_new / t_hf,
            speedup_vs_transformers=t_hf / t_dec,
            speedup_vs_transformers_ci95_low=lo,
            speedup_vs_transformers_ci95_high=hi,
        )
    total.update(
        mean_exit_layer=exit_sum / n_cost,
        compute_pct=100 * cost_sum / (n_cost * L),
        agreement_pct=100 * agree / n_new,
    )
    total["realized_over_ideal"] = total["speedup"] * total["compute_pct"] / 100
    if spec:
        # compute % (per sample and in total, `speculative_costs`): every drafted position runs
        # all L layers plus the draft head, rejected ones a verifier head too; what speculation
        # saves is sequential passes, not layers
        st = decoder.stats
        total["acceptance_rate"] = st.acceptance_rate
        total.update(decoder.time_shares)
        total["tokens_per_cycle"] = st.tokens_per_cycle
        total["realized_over_ideal"] = None
    elif decoder.policy is not None:
        # the measured cost model (evaluation/costs.py) on this device, dtype and batch: what
        # it predicts for the exits and decisions taken, against the measured speedup
        from eexit.evaluation.costs import costs_cache, measure_costs

        costs = measure_costs(
            model,
            decoder.policy,
            batch=min(g.batch_size, len(prompts)),
            context=prompts.shape[1] + new // 2,
            cache=costs_cache(),
        )
        scored = sorted(decoder.exits)
        predicted = costs.predicted_speedup(
            torch.cat(exits), torch.cat(decisions), scored, g.batch_size
        )
        total["predicted_speedup"] = predicted
        total["predicted_over_measured"] = predicted / total["speedup"]
    return rows, total


TIMING_NOTES = (
    "Timing: every decoder (this one, eexit full depth, transformers' greedy `generate` on the "
    "same weights) decodes the same prompts once per round, the order rotated, in --rounds "
    "rounds after a warm-up; speedup = full depth's median time / this decoder's, "
    "speedup_vs_transformers = generate's / this decoder's, each with the 95 % interval of the "
    "paired per-round ratios (Student t). predicted_speedup: the cost model measured on this "
    "device (block, head, KV fill, decisions, per-token overhead: eexit/evaluation/costs.py) "
    "for the exits and decisions this run took; predicted_over_measured near 1 means the "
    "measured parts explain the wall-clock.\n"
)
EARLY_EXIT_NOTES = (
    "Compute % (per sample and in total): layer-equivalents run per generated token after the "
    "first, in % of the model's layers: the layers up to each token's exit, the exit decisions "
    "and the KV filling of skipped layers (`--kv`); 100 % = full-depth decoding. Agreement: "
    "generated tokens equal to full-depth greedy decoding at the same position.\n" + TIMING_NOTES
)
SELF_SPEC_NOTES = (
    "Compute % (per sample and in total, the same measure; the total is the token-weighted mean "
    "of the samples): layer-equivalents run per generated token after the first, in % of the "
    "model's layers. Every drafted position runs all layers (the draft layers while drafting, "
    "the rest while verifying) and the draft head, and a rejected draft also its verifier "
    "head, so compute is at least 100 % of full-depth decoding and grows as acceptance falls: "
    "self-speculation saves sequential passes (speedup), not arithmetic. Agreement: generated "
    "tokens equal to full-depth greedy decoding at the same position (100 % when greedy).\n"
    + TIMING_NOTES
)


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
    g.check_model(model)  # the draft layer and vocabulary against the model, before any work
    if g.mode == "self-spec":
        vocab = (
            data_mod.frequent_tokens(ctx.tokenizer, ctx.dataset, g.draft_vocab, model.vocab_size)
            if g.draft_vocab
            else None
        )
        decoder = SelfSpeculativeDecoder(model, g.draft_layer, g.draft_length, vocab)
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
        rows_out = rows + [{"sample": "total", **total}]
        notes = SELF_SPEC_NOTES if g.mode == "self-spec" else EARLY_EXIT_NOTES
        write_results(out, "generation", title, rows_out, prov, notes=notes)
    return rows, total
