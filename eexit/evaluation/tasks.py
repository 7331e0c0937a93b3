"""Task evaluation (`eexit evaluate` / `eexit sweep-threshold` on a task dataset): generate with
early exit, score with the task's metric, next to compute %, exit shares and tokens/s.

Per threshold: greedy early-exit decoding (eexit's decoder, `--kv` mode) of every example, stopping
at EOS; the predictions are scored by the task metric (ROUGE / BLEU+chrF / SQuAD EM+F1). The same
examples decoded at full depth give the reference row ("full") and the speedup measured in the same
run. Compute % = layers run per generated token / layers (the first token of every answer always
uses the full depth); cost % adds the exit decisions and the KV filling of skipped layers in
layer-equivalents (`gen_eval.token_costs`). Decoder-only models read the task's prompt (chat
template when the tokenizer has one) and their answer is cut at the first line break.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from eexit.data.pairs import model_inputs
from eexit.data.task_data import task_split
from eexit.data.tasks import clean_prediction, get_task
from eexit.errors import EexitError
from eexit.evaluation.context import EvalContext, check_task_fits
from eexit.evaluation.generation import token_costs
from eexit.models.decoding import EarlyExitDecoder, check_kv_mode
from eexit.reporting import plot_tradeoff, provenance, track, write_results
from eexit.runtime import LOCAL, Runtime


@dataclass(kw_only=True)
class TaskOptions:
    examples: int = 32  # test examples decoded per threshold
    max_new_tokens: int | None = None  # default: the checkpoint's data.max_target_len, else 64
    max_source_len: int | None = None  # default: the checkpoint's data.max_source_len, else 192
    kv_mode: str = "propagate"  # KV of skipped layers: full | propagate | recompute
    batch_size: int = 1  # examples decoded together (tokens/s is per example at batch 1)
    given: tuple[str, ...] = ()  # the task-only flags the user typed (refused on an LM dataset)

    def check(self) -> None:
        check_kv_mode(self.kv_mode)
        if self.examples < 1 or self.batch_size < 1:
            raise EexitError("--examples and --batch-size must be >= 1")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise EexitError("--max-new-tokens must be >= 1")


@dataclass
class Decoded:
    texts: list[str]
    tokens: list[list[int]]  # generated ids up to and including EOS
    exit_layers: list[list[int]]
    cost: list[list[float]]  # layer-equivalents per generated token (first token excluded)
    seconds: float


def _batches(model, tokenizer, task, examples, o: TaskOptions):
    seq2seq = model.is_seq2seq
    ids = [model_inputs(tokenizer, task, ex, seq2seq, o.max_source_len) for ex in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for i in range(0, len(ids), o.batch_size):
        chunk = ids[i : i + o.batch_size]
        n = max(map(len, chunk))
        if seq2seq:  # right-padded encoder input, decoder starts from its start token
            src = torch.tensor([c + [pad] * (n - len(c)) for c in chunk])
            mask = torch.tensor([[1] * len(c) + [0] * (n - len(c)) for c in chunk])
            start = torch.full((len(chunk), 1), model.lm.config.decoder_start_token_id)
            yield {"input_ids": start, "source_ids": src, "source_mask": mask}
        else:  # left-padded prompts
            x = torch.tensor([[pad] * (n - len(c)) + c for c in chunk])
            mask = torch.tensor([[0] * (n - len(c)) + [1] * len(c) for c in chunk])
            yield {"input_ids": x, "attention_mask": mask}


def decode_all(
    model,
    tokenizer,
    task,
    examples,
    decoder: EarlyExitDecoder,
    o: TaskOptions,
    runtime: Runtime | None = None,
) -> Decoded:
    """Decode every example. Several processes (`runtime`): each decodes a contiguous block of the
    batches and the results are gathered in order; `seconds` is then the longest process's time
    (the wall clock of the parallel run), so tokens/s is the whole run's throughput."""
    runtime = runtime or LOCAL
    eos = tokenizer.eos_token_id
    vocab = tokenizer.get_vocab()
    stop = {eos} | {
        vocab[s] for s in ("<|im_end|>", "<|endoftext|>") if s in vocab
    }  # chat models end a turn with <|im_end|>
    out = Decoded([], [], [], [], 0.0)
    batches = list(_batches(model, tokenizer, task, examples, o))
    shard = runtime.shard(len(batches))
    for batch in track(batches[shard.start : shard.stop], len(shard), "decoding"):
        b = batch["input_ids"].shape[0]
        res = decoder.generate(
            batch["input_ids"],
            batch.get("attention_mask"),
            o.max_new_tokens,
            eos_token_id=sorted(stop),
            pad_token_id=eos,
            source_ids=batch.get("source_ids"),
            source_mask=batch.get("source_mask"),
        )
        out.seconds += res.seconds
        ctx = batch.get("attention_mask", batch["input_ids"]).shape[1] + o.max_new_tokens / 2
        cost = token_costs(model, decoder, res, ctx)
        for r in range(b):
            toks = res.new_tokens[r].tolist()
            end = next((i for i, t in enumerate(toks) if t in stop), len(toks) - 1)
            kept = toks[: end + 1]
            text = tokenizer.decode([t for t in kept if t not in stop], skip_special_tokens=True)
            out.texts.append(text.strip() if model.is_seq2seq else clean_prediction(text))
            out.tokens.append(kept)
            out.exit_layers.append(res.exit_layers[r, : end + 1].tolist())
            out.cost.append(cost[r, :end].tolist())
    if runtime.world == 1:
        return out
    parts = runtime.gather([out])
    return Decoded(
        [t for p in parts for t in p.texts],
        [t for p in parts for t in p.tokens],
        [t for p in parts for t in p.exit_layers],
        [t for p in parts for t in p.cost],
        max(p.seconds for p in parts),
    )


def summarize(
    task, examples, d: Decoded, full: Decoded | None, L: int, exit_layers: list[int]
) -> dict:
    row = {k: v for k, v in task.score(d.texts, examples).items() if not k.endswith("signature")}
    layers = [l for ex in d.exit_layers for l in ex]
    costs = [c for ex in d.cost for c in ex]
    n = len(layers)
    row["compute_pct"] = 100 * sum(layers) / (n * L)
    row["cost_pct"] = (
        100 * (sum(costs) + L * len(d.exit_layers)) / (n * L)
    )  # the full-depth first tokens included
    row["tokens_per_s"] = n / d.seconds
    row["mean_exit_layer"] = sum(layers) / n
    for l in exit_layers:
        row[f"exit@{l}_pct"] = 100 * sum(1 for x in layers if x == l) / n
    row["tokens"] = n
    if full is not None:
        row["speedup"] = (
            full.seconds / d.seconds * (n / sum(map(len, full.tokens)))
        )  # per-token time ratio
        same = sum(a == b for e, f in zip(d.tokens, full.tokens) for a, b in zip(e, f))
        row["agreement_pct"] = (
            100 * same / sum(max(len(e), len(f)) for e, f in zip(d.tokens, full.tokens))
        )
    return row


def prepare(ctx: EvalContext, o: TaskOptions):
    """(task, test examples) for task decoding; fills in o's defaults from the checkpoint."""
    o.check()
    data = ctx.checkpoint.data
    o.max_new_tokens = o.max_new_tokens or data.max_target_len
    o.max_source_len = o.max_source_len or data.max_source_len
    task_name, examples = task_split(ctx.dataset, ctx.request.split, o.examples)
    task, seq2seq = get_task(task_name), ctx.model.is_seq2seq
    if examples and not seq2seq:  # the longest prompt and answer must fit, before any decoding
        prompts = [
            model_inputs(ctx.tokenizer, task, ex, seq2seq, o.max_source_len) for ex in examples
        ]
        check_task_fits(ctx, max(map(len, prompts)), o.max_new_tokens, "--max-new-tokens")
    return task, examples


def run_task_sweep(ctx: EvalContext, o: TaskOptions, out: str | None, plot: bool = True):
    """Rows: full depth, then one per threshold of the request (the same bound policy)."""
    r, model, tokenizer = ctx.request, ctx.model, ctx.tokenizer
    task, examples = prepare(ctx, o)
    task_name = task.registered_name
    L = model.num_layers
    full_decoder = EarlyExitDecoder(model, None, "full")
    decode_all(model, tokenizer, task, examples[:1], full_decoder, o)  # warm-up, not timed
    full = decode_all(model, tokenizer, task, examples, full_decoder, o, ctx.runtime)
    full_row = summarize(task, examples, full, None, L, model.exit_layers)
    full_depth = {"threshold": None, "full_depth": True}
    rows = [{**full_depth, **full_row, "speedup": 1.0, "agreement_pct": 100.0}]
    for t in r.thresholds:
        decoder = EarlyExitDecoder(model, ctx.policy.at(t), o.kv_mode)
        d = decode_all(model, tokenizer, task, examples, decoder, o, ctx.runtime)
        row = summarize(task, examples, d, full, L, model.exit_layers)
        rows.append({"threshold": t, "full_depth": False, **row})
    rows = [{**r, **ctx.identity()} for r in rows]
    if out:
        resolved = ctx.resolved(task=task_name, **o.__dict__)
        metrics = list(task.higher_is_better)
        # per-exit shares of deep models: in the CSV / JSON only
        shares = [f"exit@{x}_pct" for x in model.exit_layers] if len(model.exit_layers) <= 8 else []
        cols = ["threshold", *metrics, "compute_pct", "cost_pct", "mean_exit_layer"]
        cols += ["tokens_per_s", "speedup", "agreement_pct", *shares, "tokens"]
        sig = task.score(full.texts, examples)
        notes = "".join(f"- {k}: `{v}`\n" for k, v in sig.items() if k.endswith("signature"))
        notes += (
            f"\nCompute% = layers run per generated token / {L}; Cost% adds exit decisions and "
            "KV filling (layer-equivalents). Speedup = full-depth seconds per token / early-exit "
            "seconds per token, same run. Agreement = generated tokens equal to the full-depth "
            "output at the same position.\n\n"
            f"Example (first test item), full depth: {full.texts[0][:300]!r}\n\n"
        )
        title = (
            f"{task_name} on {ctx.dataset}/{r.split}: {r.policy} "
            f"(kv {o.kv_mode}, {Path(r.model).name})"
        )
        write_results(out, "sweep", title, rows, provenance(resolved), cols, notes=notes)
        if plot:
            points = [(x["compute_pct"], x[task.primary], x["threshold"]) for x in rows[1:]]
            plot_tradeoff(
                Path(out) / "sweep.png",
                {r.policy: points},
                "compute % (layers per generated token)",
                task.primary,
                title,
                {"full depth": (100.0, rows[0][task.primary])},
            )
    return rows
