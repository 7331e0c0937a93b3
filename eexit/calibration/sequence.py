"""Learn-then-Test on decoded sequences (CALM's textual consistency, Schuster et al. 2022).

Why: the token-level calibration is teacher-forced: every token sees the full model's states of
the tokens before it, and tokens of one window are correlated, so a threshold certified there can
still drift when the model decodes its own output (measured on SmolLM2: 1.7 % teacher-forced risk,
83 % free-running agreement). Here one unit is one prompt, decoded free-running with early exit
in the real KV mode and compared with full-depth greedy decoding of the same prompt; prompts are
independent, so LTT's guarantee holds per sequence.

Risks of a prompt at threshold lambda (both in [0, 1]):
- `sequence-mismatch`: the share of the new tokens where the early-exit output differs from the
  full-depth output at the same position (1 - the agreement of `evaluate --generate`);
- `sequence-rouge`: 1 - ROUGE-L F1 (rouge-score, its word tokenizer) of the early-exit text
  against the full-depth text; identical token sequences have risk 0, and differing outputs
  with no words at all have risk 1 (ROUGE-L is 0 there).

The test is the fixed-sequence test of `ltt.py` with Hoeffding-Bentkus p-values (the risks are
fractions): thresholds from the most conservative down, stop at the first non-rejection. Each
threshold is decoded only when the test reaches it. Every prompt is decoded in a fixed batch
(the same rows at every threshold), so threshold 1.0 (no early exit) reproduces the full-depth
output exactly and has zero risk.

The guarantee is checked on held-out prompts (the test split); `repeats` re-splits the pooled
calibration and held-out prompts with seeds 0..R-1 and counts the repetitions whose held-out
risk is <= epsilon (LTT promises >= 1 - delta of them, up to the noise of the held-out mean). A
repetition where no threshold is certified decodes at full depth: its risk is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from eexit.calibration.ltt import CalibrationResult, fixed_sequence_test
from eexit.errors import EexitError
from eexit.names import SEQUENCE_RISKS
from eexit.reporting import log

# upper bounds on work-sized options: beyond them a run would not end in any useful time
MAX_REPEATS = 10_000
MAX_PROMPTS = 100_000
PVALUE = "hoeffding-bentkus"


@dataclass(kw_only=True)
class SequenceOptions:
    prompts: int = 32  # calibration prompts (from the calibration split), one unit each
    test_prompts: int | None = None  # held-out prompts from the test split (default: as many)
    prompt_len: int = 32  # tokens per prompt
    max_new_tokens: int = 32  # tokens decoded per prompt (fixed length: no stop at EOS)
    kv_mode: str = "propagate"  # KV of skipped layers while decoding: propagate | recompute | full
    repeats: int = 0  # random re-splits of the pooled prompts (0: only the given split)

    def check(self) -> None:
        from eexit.models.decoding import check_kv_mode

        check_kv_mode(self.kv_mode)
        if self.prompts < 1 or (self.test_prompts is not None and self.test_prompts < 1):
            raise EexitError("--prompts and --test-prompts must be >= 1")
        if self.prompt_len < 1 or self.max_new_tokens < 2:
            raise EexitError("--prompt-len must be >= 1 and --max-new-tokens >= 2")
        if not 0 <= self.repeats <= MAX_REPEATS:
            raise EexitError(f"--repeats must be in 0..{MAX_REPEATS}; got {self.repeats}")
        for name, n in (("--prompts", self.prompts), ("--test-prompts", self.test_prompts)):
            if n is not None and n > MAX_PROMPTS:
                raise EexitError(f"{name} must be at most {MAX_PROMPTS}; got {n}")

    @property
    def held_out(self) -> int:
        return self.prompts if self.test_prompts is None else self.test_prompts


def lazy_fixed_sequence_test(
    thresholds: list[float], risks_at: Callable[[float], np.ndarray], eps: float, delta: float
) -> CalibrationResult:
    """`ltt.fixed_sequence_test` where the per-unit risks of a threshold are computed only when the
    test reaches it (`risks_at(threshold)` -> [n] in [0, 1]); Hoeffding-Bentkus p-values."""
    chosen, tested, n = None, [], 0
    for t in sorted({float(t) for t in thresholds}, reverse=True):
        r = np.asarray(risks_at(t), dtype=np.float64)
        n = r.size
        row = fixed_sequence_test([t], r[None], eps, delta, PVALUE).tested[0]
        tested.append(row)
        if not row.rejected:
            break
        chosen = t
    return CalibrationResult(chosen, tested, float(eps), float(delta), PVALUE, n)


Measure = Callable[[float, np.ndarray], dict]  # (threshold, unit indices) -> {"risk": [n], ...}


def calibrate_split(
    measure: Measure, grid: list[float], cal: np.ndarray, held: np.ndarray, eps: float, delta: float
) -> tuple[CalibrationResult, dict]:
    """LTT on the `cal` units, then the chosen threshold's means on the `held` units (every key of
    `measure`'s answer; risk 0 and no other keys when nothing is certified: full depth)."""
    res = lazy_fixed_sequence_test(grid, lambda t: measure(t, cal)["risk"], eps, delta)
    if res.threshold is None:
        return res, {"risk": 0.0}
    return res, {k: float(np.mean(v)) for k, v in measure(res.threshold, held).items()}


def repeated_splits(
    measure: Measure, pool: int, n_cal: int, grid: list[float], eps: float, delta: float, repeats
) -> list[dict]:
    """Re-split `pool` units into `n_cal` calibration and `pool - n_cal` held-out units with seeds
    0..repeats-1; one row per repetition."""
    rows = []
    for seed in range(repeats):
        perm = np.random.default_rng(seed).permutation(pool)
        res, held = calibrate_split(measure, grid, perm[:n_cal], perm[n_cal:], eps, delta)
        rows.append(
            {
                "seed": seed,
                "threshold": res.threshold,
                "calibration_risk": chosen_risk(res),
                "heldout_risk": held["risk"],
                **{f"heldout_{k}": v for k, v in held.items() if k != "risk"},
                "within_epsilon": held["risk"] <= eps,
            }
        )
    return rows


def chosen_risk(res: CalibrationResult) -> float | None:
    """The calibration risk of the chosen threshold (the last rejected row)."""
    rejected = [row for row in res.tested if row.rejected]
    return rejected[-1].risk_hat if rejected else None


def sequence_risk(risk: str, ee: torch.Tensor, full: torch.Tensor, tokenizer=None, scorer=None):
    """One prompt's risk: the early-exit new tokens `ee` against the full-depth ones `full`."""
    if risk == "sequence-mismatch":
        return float((ee != full).float().mean())
    if torch.equal(ee, full):
        return 0.0
    if scorer is None:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"])
    score = scorer.score(
        tokenizer.decode(full.tolist(), skip_special_tokens=True),
        tokenizer.decode(ee.tolist(), skip_special_tokens=True),
    )
    return float(min(1.0, max(0.0, 1.0 - score["rougeL"].fmeasure)))


class Decodings:
    """A pool of prompts decoded at full depth once and with early exit at each threshold asked,
    cached per (threshold, prompt). Batches are fixed slices of the pool, so a prompt shares its
    batch with the same rows at every threshold and in the reference."""

    def __init__(
        self,
        model,
        policy,
        prompts: torch.Tensor,
        opts: SequenceOptions,
        risk: str,
        tokenizer,
        batch_size: int,
        pad: int | None,
    ):
        from eexit.models.decoding import EarlyExitDecoder

        if risk not in SEQUENCE_RISKS:
            raise EexitError(f"unknown sequence risk {risk!r}; valid: {', '.join(SEQUENCE_RISKS)}")
        self.model, self.policy, self.prompts, self.opts = model, policy, prompts, opts
        self.risk, self.tokenizer, self.batch, self.pad = risk, tokenizer, batch_size, pad
        self.scorer = None
        if risk == "sequence-rouge":
            from rouge_score import rouge_scorer

            self.scorer = rouge_scorer.RougeScorer(["rougeL"])
        reference = EarlyExitDecoder(model, None, "full")
        log(f"decoding {len(prompts)} prompts at full depth (the reference)")
        self.full = torch.cat(
            [
                reference.generate(
                    prompts[a : a + batch_size], None, opts.max_new_tokens, pad_token_id=pad
                ).new_tokens.cpu()
                for a in range(0, len(prompts), batch_size)
            ]
        )
        self.cache: dict[float, dict[int, dict]] = {}
        self.decoded = 0  # prompts decoded with early exit (all thresholds)

    def __len__(self) -> int:
        return len(self.prompts)

    def _decode(self, threshold: float, chunk: int) -> None:
        from eexit.evaluation.generation import token_costs
        from eexit.models.decoding import EarlyExitDecoder

        decoder = EarlyExitDecoder(self.model, self.policy.at(threshold), self.opts.kv_mode)
        a = chunk * self.batch
        x = self.prompts[a : a + self.batch]
        res = decoder.generate(x, None, self.opts.max_new_tokens, pad_token_id=self.pad)
        cost = token_costs(self.model, decoder, res, x.shape[1] + self.opts.max_new_tokens / 2)
        L = self.model.num_layers
        out = self.cache.setdefault(threshold, {})
        for b in range(len(x)):
            ee, full = res.new_tokens[b].cpu(), self.full[a + b]
            agree = float((ee == full).float().mean())
            out[a + b] = {
                "risk": sequence_risk(self.risk, ee, full, self.tokenizer, self.scorer),
                "agreement_pct": 100 * agree,
                "compute_pct": 100 * float(cost[b].mean()) / L,
                "mean_exit_layer": float(res.exit_layers[b, 1:].float().mean()),
            }
        self.decoded += len(x)

    def __call__(self, threshold: float, idx) -> dict:
        """{"risk", "agreement_pct", "compute_pct", "mean_exit_layer"}: arrays over `idx`."""
        threshold = float(threshold)
        done = self.cache.get(threshold, {})
        todo = sorted({int(i) // self.batch for i in idx if int(i) not in done})
        if todo:
            log(f"decoding {len(idx)} prompts with early exit at threshold {threshold:g}")
        for chunk in todo:
            self._decode(threshold, chunk)
            done = self.cache[threshold]
        rows = [done[int(i)] for i in idx]
        return {k: np.array([r[k] for r in rows]) for k in rows[0]} if rows else {"risk": []}


def sequence_prompts(ctx, split: str, test_split: str, opts: SequenceOptions) -> tuple:
    """(calibration prompts of `split`, held-out prompts of `test_split`), each [n, prompt_len]."""
    from eexit.evaluation.context import max_positions
    from eexit.evaluation.generation import prompts_from

    if ctx.is_task:
        raise EexitError(
            f"sequence risks decode LM prompts; on the task dataset {ctx.dataset!r} use --risk "
            "consistency or loss"
        )
    if ctx.runtime.world > 1:
        raise EexitError(
            "sequence risks decode in one process; run calibrate without accelerate launch"
        )
    limit = max_positions(ctx.model)
    if limit and opts.prompt_len + opts.max_new_tokens > limit:
        raise EexitError(
            f"--prompt-len + --max-new-tokens must be <= {limit} (the model's positions); got "
            f"{opts.prompt_len + opts.max_new_tokens}"
        )
    cal = prompts_from(ctx.tokenizer, ctx.dataset, split, opts.prompts, opts.prompt_len)
    held = prompts_from(ctx.tokenizer, ctx.dataset, test_split, opts.held_out, opts.prompt_len)
    return cal, held


def calibrate_sequences(ctx, opts, grid: list[float], need: int) -> tuple[dict, list, list]:
    """`calibrate --risk sequence-*`: LTT over the calibration split's prompts, the chosen
    threshold on the test split's prompts, then `repeats` re-splits of both. `opts` is the
    command's `CalibrateOptions`; `need` the fewest prompts that can certify anything. Returns
    (summary, fixed-sequence rows, repetition rows)."""
    from eexit.calibration.ltt import no_threshold_message

    r, seq = ctx.request, opts.sequence
    cal_prompts, held_prompts = sequence_prompts(ctx, r.split, opts.test_split, seq)
    pool, n_cal = torch.cat([cal_prompts, held_prompts]), len(cal_prompts)
    if n_cal < need:
        raise EexitError(
            f"{r.split} has {n_cal} prompts of {seq.prompt_len} tokens; certifying a sequence risk "
            f"<= {opts.epsilon} with probability >= {1 - opts.delta:.2f} needs at least {need}"
        )
    dec = Decodings(
        ctx.model,
        ctx.policy,
        pool,
        seq,
        opts.risk,
        ctx.tokenizer,
        r.batch_size,
        ctx.tokenizer.pad_token_id,
    )
    cal, held = np.arange(n_cal), np.arange(n_cal, len(pool))
    res, test = calibrate_split(dec, grid, cal, held, opts.epsilon, opts.delta)
    summary = {
        "policy": r.policy,
        "policy_params": r.policy_params or {},
        "min_exit_layer": r.min_exit_layer,
        "risk": opts.risk,
        "method": PVALUE,
        "threshold_by": "ltt",
        "epsilon": opts.epsilon,
        "delta": opts.delta,
        "kv_mode": seq.kv_mode,
        "prompt_len": seq.prompt_len,
        "max_new_tokens": seq.max_new_tokens,
        "calibration_prompts": n_cal,
        "test_prompts": len(held),
        "threshold": res.threshold,
    }
    if res.threshold is None:
        summary["message"] = no_threshold_message(res)
    else:
        summary["calibration_risk"] = chosen_risk(res)
        summary["test_risk"] = test.pop("risk")
        summary.update({f"test_{k}": v for k, v in test.items()})
    rows = repeated_splits(dec, len(pool), n_cal, grid, opts.epsilon, opts.delta, seq.repeats)
    if rows:
        summary["repeats"] = len(rows)
        summary["repeats_certified"] = sum(row["threshold"] is not None for row in rows)
        summary["repeats_within_epsilon"] = sum(row["within_epsilon"] for row in rows)
    summary["decoded_prompts"] = dec.decoded  # early-exit decodings run, all thresholds
    tested = [
        {"threshold": t, "risk": risk, "p_value": p, "rejected": rej}
        for t, risk, p, rej in res.tested
    ]
    return summary, tested, rows
