"""Decoding speed of a model with adapted exits, side by side in one run (issue: early exit that
pays on a real model): transformers greedy `generate`, transformers `assistant_early_exit`
(same backbone), eexit full depth, eexit early exit at an LTT-calibrated threshold, and eexit
self-speculative decoding, at batch 1 and batch 8, on the same prompts.

    python benchmarks/adapted_decoding.py --model checkpoints/smollm2-lens \\
        --calibrated results/smollm2_adapted/calibration --out results/smollm2_adapted

Every decoder produces exactly `--new` tokens per prompt (EOS ignored), so tokens/s compare
like for like; agreement is the share of tokens equal to transformers' greedy output.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark helpers

from generation import hf_greedy  # noqa: E402

from eexit import quiet  # noqa: E402
from eexit.data.corpora import frequent_tokens  # noqa: E402
from eexit.evaluation.entry import read_calibrated  # noqa: E402
from eexit.evaluation.generation import prompts_from  # noqa: E402
from eexit.models.decoding import EarlyExitDecoder  # noqa: E402
from eexit.models.loading import load_model  # noqa: E402
from eexit.models.speculative import SelfSpeculativeDecoder  # noqa: E402
from eexit.policies import make_policy  # noqa: E402
from eexit.reporting import provenance, write_results  # noqa: E402


def median_time(fn, reps: int):
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def run(model, x, new: int, reps: int, batch: int, calibrated: dict | None, drafts) -> list[dict]:
    """Rows for one batch size: every decoder on the same prompts, `new` tokens each."""
    L = model.num_layers
    chunks = [x[i : i + batch] for i in range(0, len(x), batch)]
    n_tok = len(x) * new

    def hf(**kw):
        return lambda: torch.cat([hf_greedy(model, c, new, **kw)[:, -new:] for c in chunks])

    def ours(dec):
        def go():
            outs = [dec.generate(c, None, new, pad_token_id=0) for c in chunks]
            return torch.cat([o.new_tokens for o in outs]), torch.cat([o.exit_layers for o in outs])

        return go

    hf()(), ours(EarlyExitDecoder(model, None, "full"))()  # warm-up
    t_hf, ref = median_time(hf(), reps)
    rows = [
        {
            "batch": batch,
            "decoder": "transformers greedy generate",
            "tokens_per_s": n_tok / t_hf,
            "speedup": 1.0,
            "agreement_pct": 100.0,
        }
    ]

    def add(name, seconds, tokens, extra=None):
        same = (tokens == ref).float().mean().item()
        rows.append(
            {
                "batch": batch,
                "decoder": name,
                "tokens_per_s": n_tok / seconds,
                "speedup": t_hf / seconds,
                "agreement_pct": 100 * same,
                **(extra or {}),
            }
        )

    t, (toks, _) = median_time(ours(EarlyExitDecoder(model, None, "full")), reps)
    add("eexit full depth", t, toks)
    if calibrated is not None:
        pol = make_policy(
            calibrated["policy"],
            calibrated["threshold"],
            calibrated["min_exit_layer"],
            **calibrated["policy_params"],
        )
        dec = EarlyExitDecoder(model, pol, "propagate")
        t, (toks, layers) = median_time(ours(dec), reps)
        mean_exit = layers[:, 1:].float().mean().item()
        add(
            f"eexit early exit, {calibrated['policy']} @ {calibrated['threshold']} (LTT)",
            t,
            toks,
            {"mean_exit_layer": mean_exit},
        )
    for k, length, vocab in drafts:
        dec = SelfSpeculativeDecoder(model, k, length, vocab)
        ours(dec)()
        dec.reset_stats()
        t, (toks, _) = median_time(ours(dec), reps)
        st = dec.stats
        over = f" over {len(vocab)} frequent tokens" if vocab is not None else ""
        add(
            f"eexit self-speculative, draft layer {k}, {length} drafts{over}",
            t,
            toks,
            {"acceptance_rate": st.acceptance_rate, "tokens_per_cycle": st.tokens_per_cycle},
        )
        if batch == 1 and vocab is None and type(model.lm).__name__.startswith("Llama"):
            t, toks = median_time(hf(assistant_early_exit=k), reps)
            add(f"transformers assistant_early_exit={k}", t, toks)
    del L
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint with adapted exits")
    ap.add_argument("--calibrated", help="folder of `eexit calibrate ... --out` (calibrated.json)")
    ap.add_argument(
        "--drafts",
        default="8:4,15:4",
        help="draft layer:length[:K] (K: draft over the K most frequent train tokens)",
    )
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    quiet()
    torch.set_grad_enabled(False)
    model, tok, _ = load_model(a.model)
    x = prompts_from(tok, "wiki-gensim", "test", a.prompts, a.prompt_len)
    drafts = []
    for d in a.drafts.split(","):  # layer:length[:K], K = a draft vocabulary of frequent tokens
        k, length, *vocab = (int(v) for v in d.split(":"))
        ids = frequent_tokens(tok, "wiki-gensim", vocab[0]) if vocab else None
        drafts.append((k, length, ids))
    calibrated = read_calibrated(a.calibrated) if a.calibrated else None
    rows = []
    for batch in (1, 8):
        rows += run(model, x, a.new, a.reps, batch, calibrated, drafts)
        for r in rows[-6:]:
            print(r, flush=True)
    config = {**vars(a), "num_layers": model.num_layers, "calibrated_policy": calibrated}
    notes = (
        f"{len(x)} prompts of {a.prompt_len} tokens from the wiki-gensim test split, {a.new} new "
        f"tokens each (EOS ignored), median of {a.reps} runs; speedup = transformers greedy "
        "time / this decoder's time at the same batch size; agreement = tokens equal to "
        "transformers' greedy output.\n\n"
    )
    cols = [
        "batch",
        "decoder",
        "tokens_per_s",
        "speedup",
        "agreement_pct",
        "mean_exit_layer",
        "acceptance_rate",
        "tokens_per_cycle",
    ]
    write_results(
        a.out,
        "decoding",
        f"Decoding {Path(a.model).name}: side by side",
        rows,
        provenance(config),
        cols,
        notes=notes,
    )


if __name__ == "__main__":
    main()
