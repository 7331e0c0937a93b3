"""Decoding speed of a model with adapted exits, side by side in one run (issue: early exit that
pays on a real model): transformers greedy `generate`, transformers `assistant_early_exit`
(same backbone), eexit full depth, eexit early exit at an LTT-calibrated threshold, and eexit
self-speculative decoding, at batch 1 and batch 8, on the same prompts.

    python benchmarks/adapted_decoding.py --model checkpoints/smollm2-lens \\
        --calibrated results/smollm2_adapted/calibration --out results/smollm2_adapted

Every decoder produces exactly `--new` tokens per prompt (EOS ignored), so tokens/s compare
like for like; agreement is the share of tokens equal to transformers' greedy output.

`--device` / `--dtype` (default auto: a GPU in bfloat16 when there is one, else the CPU in
float32) place the model; every decoder is warmed up by one untimed run and timed with
`eexit.runtime.now` (CUDA-synchronised), and the table names the device and dtype.

`--tasks aclsum,wiki-cloze-qa` adds task quality: each batch-1 decoder answers the same task
examples (stopping at EOS), scored by the task's metric (ROUGE-L, SQuAD F1), in tasks.md and as
columns of the decoding table.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from eexit import quiet
from eexit.data.corpora import (
    corpus_split,
    eval_windows,
    frequent_tokens,
    load_corpus,
)
from eexit.data.task_data import task_split
from eexit.data.tasks import get_task
from eexit.errors import EexitError
from eexit.evaluation.context import max_positions
from eexit.evaluation.costs import (
    choose_draft,
    costs_cache,
    expected_tokens_per_cycle,
    measure_costs,
    measure_verify,
    predict_self_spec,
)
from eexit.evaluation.entry import read_calibrated
from eexit.evaluation.generation import prompts_from
from eexit.evaluation.records import collect_exit_table
from eexit.evaluation.tasks import TaskOptions, decode_all
from eexit.evaluation.timing import interleaved, speedup_interval
from eexit.evaluation.timing import transformers_greedy as hf_greedy
from eexit.files import check_output_path, output_folder, run_script
from eexit.models.decoding import EarlyExitDecoder, GenerationResult
from eexit.models.identity import check_identity
from eexit.models.loading import load_model
from eexit.models.speculative import SelfSpeculativeDecoder
from eexit.policies import make_policy
from eexit.reporting import provenance, write_results
from eexit.runtime import device_name, now, resolve_runtime


def placement(model) -> dict:
    """The device and dtype columns of a row (where the model's weights are)."""
    w = model.parts.lm_head.weight
    return {"device": str(w.device), "dtype": str(w.dtype).removeprefix("torch.")}


class TransformersGreedy:
    """transformers' greedy `generate` (optionally with `assistant_early_exit`) behind the
    decoder interface that task decoding uses."""

    policy, kv_mode = None, "full"

    def __init__(self, model, **kw):
        self.model, self.kw = model, kw

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **_):
        t0 = now(self.model.device)
        seq = self.model.lm.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **self.kw,
        )
        seconds = now(self.model.device) - t0
        new = seq[:, input_ids.shape[1] :]
        fill = max_new_tokens - new.shape[1]
        new = torch.nn.functional.pad(new, (0, fill), value=pad_token_id)
        L = self.model.num_layers
        layers = torch.full_like(new, L)
        return GenerationResult(seq, new, layers, torch.zeros_like(new), seconds, L)


TASK_METRIC = {"summarization": "rougeL", "qa": "f1"}
TASK_NEW = {"summarization": 40, "qa": 16}  # tokens generated at most per answer


def task_rows(model, tok, decoders: dict, tasks: list[str], examples: int) -> list[dict]:
    """Each decoder on the same task examples: the task metric, agreement with the first
    decoder's tokens (transformers greedy), tokens/s."""
    rows = []
    for dataset in tasks:
        name, exs = task_split(dataset, "test", examples)
        task = get_task(name)
        o = TaskOptions(examples=examples, max_new_tokens=TASK_NEW[name], max_source_len=192)
        ref = None
        for label, dec in decoders.items():
            d = decode_all(model, tok, task, exs, dec, o)
            ref = ref or d
            same = sum(a == b for e, f in zip(d.tokens, ref.tokens) for a, b in zip(e, f))
            total = sum(max(len(e), len(f)) for e, f in zip(d.tokens, ref.tokens))
            layers = [l for ex in d.exit_layers for l in ex]
            rows.append(
                {
                    "dataset": dataset,
                    "decoder": label,
                    "metric": TASK_METRIC[name],
                    "score": task.score(d.texts, exs)[TASK_METRIC[name]],
                    "agreement_pct": 100 * same / total,
                    "mean_exit_layer": sum(layers) / len(layers),
                    "tokens_per_s": len(layers) / d.seconds,
                }
            )
            print(rows[-1], flush=True)
    return rows


def batch1_decoders(model, calibrated: list[dict], drafts) -> dict:
    """The batch-1 decoders of the decoding table, by the names its rows use."""
    decs = {"transformers greedy generate": TransformersGreedy(model)}
    decs["eexit full depth"] = EarlyExitDecoder(model, None, "full")
    for c in calibrated:
        decs[early_exit_name(c)] = EarlyExitDecoder(model, calibrated_policy(model, c), "propagate")
    for k, length, vocab in drafts:
        decs[spec_name(k, length, vocab)] = SelfSpeculativeDecoder(model, k, length, vocab)
        if vocab is None and type(model.lm).__name__.startswith("Llama"):
            decs[f"transformers assistant_early_exit={k}"] = TransformersGreedy(
                model, assistant_early_exit=k
            )
    return decs


def early_exit_name(calibrated: dict) -> str:
    how = calibrated.get("source", "LTT")  # how the threshold was chosen
    return f"eexit early exit, {calibrated['policy']} @ {calibrated['threshold']} ({how})"


def spec_name(k: int, length: int, vocab) -> str:
    over = f" over {len(vocab)} frequent tokens" if vocab is not None else ""
    return f"eexit self-speculative, draft layer {k}, {length} drafts{over}"


def calibrated_policy(model, model_dir: str, calibrated: dict):
    """The calibrated policy, bound to the model (a fitted classifier is loaded from it)."""
    exits = calibrated.get("exit_layers")
    if exits is not None and list(exits) != list(model.exit_layers):
        raise EexitError(
            f"the calibration at {calibrated['model']} used exits {exits}, this run decodes "
            f"with {model.exit_layers}"
        )
    check_identity(
        calibrated.get("model_identity"), model, "the calibrated threshold", "calibrated",
        "calibrate it again on this model",
    )  # fmt: skip
    policy = make_policy(
        calibrated["policy"],
        calibrated["threshold"],
        calibrated["min_exit_layer"],
        **calibrated["policy_params"],
    )
    policy.bind(model, model_dir)
    return policy


COSTS: list = []  # the cost models measured by `run` (one per batch size), for the costs table


def cost_rows(policy: str, costs) -> list[dict]:
    """One row per measured part and row count: milliseconds."""
    return [
        {"policy": policy, "batch": costs.batch, "rows": rows, "part": part, "ms": 1e3 * s}
        for part, by_rows in costs.seconds.items()
        for rows, s in sorted(by_rows.items())
    ]


# two-sided 95 % Student t quantiles by degrees of freedom (n - 1 for n paired repetitions)
def rouge_l(tok, a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Mean ROUGE-L F-measure x 100 of the decoded texts of token rows a against rows b (None
    where rouge-score is not installed, e.g. a GPU node without it: the column stays empty)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        return None

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [
        scorer.score(tok.decode(r.tolist()), tok.decode(h.tolist()))["rougeL"].fmeasure
        for h, r in zip(a, b)
    ]
    return 100 * sum(scores) / len(scores)


def run(model, tok, x, new: int, reps: int, batch: int, policies: dict, drafts) -> list[dict]:
    """Rows for one batch size: every decoder on the same prompts, `new` tokens each, timed in
    interleaved rounds (`interleaved`); speedup = median time of transformers greedy / median
    time of the decoder, with the 95 % interval of the paired per-round speedups."""
    dev, where = model.device, placement(model)
    x = x.to(dev)
    chunks = [x[i : i + batch] for i in range(0, len(x), batch)]
    n_tok = len(x) * new

    def hf(**kw):
        return lambda: torch.cat([hf_greedy(model, c, new, **kw)[:, -new:] for c in chunks])

    def ours(dec):
        def go():
            outs = [dec.generate(c, None, new, pad_token_id=0) for c in chunks]
            return (
                torch.cat([o.new_tokens for o in outs]),
                torch.cat([o.exit_layers for o in outs]),
                torch.cat([o.decisions for o in outs]),
            )

        return go

    greedy = "transformers greedy generate"
    fns = {greedy: hf(), "eexit full depth": ours(EarlyExitDecoder(model, None, "full"))}
    for name, policy in policies.items():
        fns[name] = ours(EarlyExitDecoder(model, policy, "propagate"))
    specs = {}
    for k, length, vocab in drafts:
        specs[spec_name(k, length, vocab)] = dec = SelfSpeculativeDecoder(model, k, length, vocab)
        fns[spec_name(k, length, vocab)] = ours(dec)
        if batch == 1 and vocab is None and type(model.lm).__name__.startswith("Llama"):
            fns[f"transformers assistant_early_exit={k}"] = hf(assistant_early_exit=k)
    # self-spec statistics of the timed runs only (reset after the warm-up)
    times, outs = interleaved(fns, reps, dev, lambda: [d.reset_stats() for d in specs.values()])
    ref = outs[greedy]
    t_ref = statistics.median(times[greedy])
    t_full = statistics.median(times["eexit full depth"])
    rows = []
    for name, ts in times.items():
        out = outs[name]
        toks = out if isinstance(out, torch.Tensor) else out[0]
        t = statistics.median(ts)
        lo, hi = speedup_interval(times[greedy], ts)
        row = {
            "batch": batch,
            "decoder": name,
            "tokens_per_s": n_tok / t,
            "speedup": t_ref / t,
            "speedup_ci95_low": lo if name != greedy else 1.0,
            "speedup_ci95_high": hi if name != greedy else 1.0,
            "agreement_pct": 100 * (toks == ref).float().mean().item(),
            "rouge_l_vs_greedy": rouge_l(tok, toks, ref),
        }
        if name in policies:
            policy = policies[name]
            _, layers, decisions = out
            # the measured cost model (eexit/evaluation/costs.py) on this device, dtype and
            # batch: its prediction for the exits and decisions this run took (the first token
            # is the prefill's), against the measured speedup over eexit full depth
            costs = measure_costs(
                model, policy, batch=min(batch, len(x)), context=x.shape[1] + new // 2,
                cache=costs_cache(),
            )  # fmt: skip
            COSTS.append((policy.registered_name, costs))
            L = model.num_layers
            scored = [l for l in model.exit_layers if l < L and policy.scored_at(l, L)]
            predicted = costs.predicted_speedup(layers[:, 1:], decisions[:, 1:], scored, batch)
            row.update(
                mean_exit_layer=layers[:, 1:].float().mean().item(),
                speedup_vs_full_depth=t_full / t,
                predicted_speedup_vs_full_depth=predicted,
                predicted_over_measured=predicted / (t_full / t),
                step_depth_bound=costs.step_depth_bound(layers[:, 1:], batch),
            )
        if name in specs:
            dec = specs[name]
            st = dec.stats
            row.update(
                acceptance_rate=st.acceptance_rate,
                tokens_per_cycle=st.tokens_per_cycle,
                speedup_vs_full_depth=t_full / t,
                **dec.time_shares,
            )
            if batch == 1 and dec.draft_vocab is None:  # the cost model of a cycle (batch 1)
                base, verify = spec_costs(model, [dec.D], x.shape[1] + new // 2)
                predicted = predict_self_spec(base, verify, dec.k, dec.D, st.tokens_per_cycle)
                row.update(
                    predicted_speedup_vs_full_depth=predicted,
                    predicted_over_measured=predicted / (t_full / t),
                )
        rows.append({**row, **where})
    return rows


def spec_costs(model, lengths: list[int], context: int):
    """The batch-1 cost model (no policy) and the verification parts at those draft lengths."""
    cache = costs_cache()
    base = measure_costs(model, None, batch=1, context=context, cache=cache)
    return base, measure_verify(model, lengths, context=context, cache=cache)


def windows(tok, split: str, seq_len: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` teacher-forced windows from the start of the packaged text's split (inputs, next-token
    targets): its documents in order, each followed by the end-of-text token, tokenized only as
    far as the windows need."""
    ids: list[int] = []
    for doc in corpus_split(load_corpus(DATASET), split, DATASET):
        ids += tok(doc, add_special_tokens=False)["input_ids"]
        ids += [] if tok.eos_token_id is None else [tok.eos_token_id]
        if len(ids) > n * seq_len:
            break
    return eval_windows(torch.tensor(ids), seq_len, n * seq_len)


DATASET = "wiki-gensim"  # the packaged text the prompts and windows come from
AUTO_LENGTHS = [2, 3, 4, 6, 8]  # draft lengths the cost model chooses from (--drafts auto)


def draft_by_cost_model(model, tok, context: int, prompts: int = 8) -> tuple[tuple, list]:
    """The draft layer and length the measured cost model predicts fastest at batch 1. Each
    exit in the lower half's acceptance is its top-1 agreement with the last layer along the
    model's own greedy continuations (what self-speculation verifies: on held-out text the
    agreement is lower) of validation prompts; each length's verification is timed. Returns
    ((k, D), candidate rows)."""
    L = model.num_layers
    x = prompts_from(tok, DATASET, "validation", prompts, 32).to(model.device)
    new = min(64, (max_positions(model) or 96) - x.shape[1])
    seqs = EarlyExitDecoder(model, None, "full").generate(x, None, new, pad_token_id=0).sequences
    table = collect_exit_table(model, seqs[:, :-1], seqs[:, 1:], make_policy("static"), 8)
    own = table.positions >= x.shape[1] - 1  # positions that predict a generated token
    agree = {
        layer: float((table.top1[i][own] == table.top1[-1][own]).float().mean())
        for i, layer in enumerate(model.exit_layers)
        if layer <= max(1, L // 2)
    }
    base, verify = spec_costs(model, AUTO_LENGTHS, context)
    rows = [
        {
            "draft_layer": k,
            "draft_length": D,
            "agreement_on_own_greedy": a,
            "expected_tokens_per_cycle": expected_tokens_per_cycle(a, D),
            "predicted_speedup_vs_full_depth": predict_self_spec(
                base, verify, k, D, expected_tokens_per_cycle(a, D)
            ),
        }
        for k, a in agree.items()
        for D in AUTO_LENGTHS
    ]
    k, D, _ = choose_draft(base, verify, agree, AUTO_LENGTHS)
    for r in rows:
        r["chosen"] = (r["draft_layer"], r["draft_length"]) == (k, D)
    return (k, D), rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint with adapted exits")
    ap.add_argument(
        "--calibrated",
        default="",
        help="folders of `eexit calibrate ... --out` (calibrated.json), comma separated: one "
        "early-exit decoder each",
    )
    ap.add_argument(
        "--drafts",
        default="8:4,15:4",
        help="draft layer:length[:K] (K: draft over the K most frequent train tokens), or auto: "
        "the layer and length the measured cost model predicts fastest",
    )
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--tasks", default="", help="task datasets for quality, e.g. aclsum")
    ap.add_argument("--task-examples", type=int, default=8, help="examples per task")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    ap.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    ap.add_argument("--out", required=True)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    a = ap.parse_args()
    check_output_path(Path(a.out), a.overwrite)  # before any work
    quiet()
    torch.set_grad_enabled(False)
    rt = resolve_runtime(a.device, a.dtype)
    model, tok, _ = load_model(a.model, runtime=rt)
    x = prompts_from(tok, "wiki-gensim", "test", a.prompts, a.prompt_len)
    drafts, draft_rows = [], []
    for d in a.drafts.split(","):  # layer:length[:K], K = a draft vocabulary of frequent tokens
        if d == "auto":  # chosen by the measured cost model
            (k, length), draft_rows = draft_by_cost_model(model, tok, a.prompt_len + a.new // 2)
            drafts.append((k, length, None))
            continue
        try:
            k, length, *vocab = (int(v) for v in d.split(":"))
        except ValueError:
            raise EexitError(
                f"--drafts {d!r}: use layer:length[:K] (e.g. 2:4 or 2:4:2048) or auto"
            ) from None
        ids = frequent_tokens(tok, "wiki-gensim", vocab[0]) if vocab else None
        drafts.append((k, length, ids))
    calibrated = [read_calibrated(c) for c in a.calibrated.split(",") if c]
    policies = {early_exit_name(c): calibrated_policy(model, a.model, c) for c in calibrated}
    rows = []
    for batch in (1, 8):
        rows += run(model, tok, x, a.new, a.reps, batch, policies, drafts)
        for r in rows[-6:]:
            print(r, flush=True)
    tasks = []
    if a.tasks:
        decs = batch1_decoders(model, policies, drafts)
        tasks = task_rows(model, tok, decs, a.tasks.split(","), a.task_examples)
        for r in rows:  # quality columns on the batch-1 rows
            for t in tasks:
                if r["batch"] == 1 and r["decoder"] == t["decoder"]:
                    r[f"{t['dataset']}_{t['metric']}"] = t["score"]
    config = {
        **vars(a),
        "num_layers": model.num_layers,
        "calibrated_policies": calibrated,
        "drafts_decoded": [
            f"{k}:{length}" + (f":{len(v)}" if v is not None else "") for k, length, v in drafts
        ],  # fmt: skip
        **rt.describe(),
    }
    notes = (
        f"{len(x)} prompts of {a.prompt_len} tokens from the wiki-gensim test split, {a.new} new "
        f"tokens each (EOS ignored), {a.reps} interleaved rounds (every decoder once per round, "
        "the order rotated) after one warm-up; speedup = transformers greedy's median time / "
        "this decoder's at the same batch size, with the 95 % interval (Student t) of the "
        "paired per-round speedups; agreement = tokens equal to transformers' greedy output, "
        "ROUGE-L = the decoded text's ROUGE-L F-measure against greedy's (x 100, rouge-score). "
        "Early exit: predicted = the measured cost model (costs.md) for the exits and "
        "decisions taken, against the measured speedup over eexit full depth; "
        "step_depth_bound = L / the mean number of layers a step ran (a step of rows decoded "
        "together runs until its deepest row exits): the most a decoder that keeps rows in "
        "step can gain over full depth if decisions, heads and fills were free.\n\n"
    )
    cols = [
        "batch",
        "decoder",
        "device",
        "dtype",
        "tokens_per_s",
        "speedup",
        "speedup_ci95_low",
        "speedup_ci95_high",
        "agreement_pct",
        "rouge_l_vs_greedy",
        "mean_exit_layer",
        "speedup_vs_full_depth",
        "predicted_speedup_vs_full_depth",
        "predicted_over_measured",
        "step_depth_bound",
        "acceptance_rate",
        "tokens_per_cycle",
    ]
    cols += sorted({k for r in rows for k in r} - set(cols))  # the task quality columns
    # the folder is written as a unit, like every eexit command's (staged under a lock)
    with output_folder(a.out, a.overwrite) as out:
        write_tables(out, a, rt, config, rows, cols, notes, tasks, draft_rows)


def write_tables(out, a, rt, config, rows, cols, notes, tasks, draft_rows) -> None:
    """decoding.md, costs.md, drafts.md and tasks.md (the parts this run measured)."""
    write_results(
        out,
        "decoding",
        f"Decoding {Path(a.model).name}: side by side ({device_name(rt.device)}, {rt.dtype_name})",
        rows,
        provenance(config),
        cols,
        notes=notes,
    )
    if COSTS:
        write_results(
            out,
            "costs",
            "The measured cost model: one decoding step's parts (ms, medians)",
            [r for policy, c in COSTS for r in cost_rows(policy, c)],
            provenance(config),
            notes=(
                "Timed at the decoding shapes (one new token per row over a KV cache of prompt + "
                "half the new tokens), warmed up, medians of 30 runs (eexit/evaluation/costs.py): "
                "block, full LM head, shortlist head, the KV fill of the last layer alone and what "
                "each further skipped layer adds (they are filled at once), each calibrated "
                "policy's first and later decisions, a whole full-depth step, and overhead = "
                "step - L blocks - head. The early-exit rows' predicted speedup adds these "
                "parts for the exits and decisions the run took.\n\n"
            ),
        )
    if draft_rows:
        write_results(
            out,
            "drafts",
            "Self-speculative drafts: the measured cost model's choice (batch 1)",
            draft_rows,
            provenance(config),
            notes=(
                "Each candidate draft layer (the lower half) and length: its top-1 agreement with "
                "the last layer along the model's own greedy continuations of 8 validation "
                "prompts (64 tokens each) taken as the per-draft acceptance, the tokens a cycle "
                "then emits, (1 - a^D) / (1 - a), "
                "and the predicted speedup over full depth from the measured parts (costs.md; "
                "a cycle = D draft steps of overhead + k blocks + head, then L - k blocks and "
                "the heads over D tokens). The chosen one is decoded in decoding.md.\n\n"
            ),
        )
    if tasks:
        write_results(
            out,
            "tasks",
            f"Task quality of each decoder, {Path(a.model).name}",
            tasks,
            provenance(config),
            notes=(
                f"{a.task_examples} test examples per task at batch 1, answers cut at EOS "
                f"(at most {TASK_NEW['summarization']} tokens for summaries, {TASK_NEW['qa']} "
                "for QA); agreement = generated tokens equal to transformers greedy's.\n\n"
            ),
        )


if __name__ == "__main__":
    run_script(main)
