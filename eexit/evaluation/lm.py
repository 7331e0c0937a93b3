"""Recipes behind `eexit evaluate` and `eexit sweep-threshold` for language modelling:
setup (model, data, policy) -> collect the exit table once -> one row per threshold -> save."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from eexit.data import corpora as data_mod
from eexit.errors import EexitError
from eexit.evaluation.records import ExitTable, collect_exit_table, exit_metrics, per_exit_ppl
from eexit.models.early_exit import load_model
from eexit.policies.base import ExitPolicy, make_policy
from eexit.reporting import plot_tradeoff, prepare_dir, provenance, write_results


@dataclass
class EvalSetup:
    model_spec: str
    policy: str = "max-prob"
    threshold: float = 0.9
    min_exit_layer: int = 1
    policy_params: dict | None = None
    dataset: str | None = None  # default: the checkpoint's training corpus, else wiki-gensim
    split: str = "test"
    seq_len: int | None = None  # default: the checkpoint's training window, else 128
    max_tokens: int | None = None  # bound the evaluated targets
    batch_size: int = 8
    exit_layers: str | None = None  # override the checkpoint's exits ("all" or "1,3")


def max_positions(model) -> int | None:
    cfg = model.lm.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def check_lengths(model, seq_len: int, batch_size: int, max_tokens: int | None = None) -> None:
    limit = max_positions(model)
    if seq_len < 1 or (limit and seq_len > limit):
        raise EexitError(f"--seq-len must be in 1..{limit or 'inf'} (the model's positions); got {seq_len}")
    if batch_size < 1:
        raise EexitError(f"--batch-size must be >= 1; got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise EexitError(f"--max-tokens must be >= 1; got {max_tokens}")


def bind_policy(policy: ExitPolicy, model, model_spec: str) -> None:
    """Learned policies load their fitted classifier (from beside the checkpoint by default)."""
    if getattr(policy, "needs_classifier", False):
        folder = Path(model_spec) if Path(model_spec).is_dir() else None
        policy.bind(model, folder)


def setup_model(s: EvalSetup, bind: bool = True, model=None):
    """(model, tokenizer, meta, policy); fills in s.dataset from the checkpoint's training data when not given."""
    import eexit.policies.learned  # noqa: F401  (registers the learned policies)

    policy = make_policy(s.policy, s.threshold, s.min_exit_layer, **(s.policy_params or {}))
    if model is None:
        model, tokenizer, meta = load_model(s.model_spec, exit_layers=s.exit_layers)
    else:
        model, tokenizer, meta = model, getattr(model, "tokenizer", None), getattr(model, "meta", {})
    model.tokenizer, model.meta = tokenizer, meta
    if bind:
        bind_policy(policy, model, s.model_spec)
    s.dataset = s.dataset or meta.get("train_config", {}).get("data", {}).get("dataset") or "wiki-gensim"
    return model, tokenizer, meta, policy


def is_task(s: EvalSetup) -> bool:
    """Does this evaluation run on a task dataset (generation + task metric) rather than LM text?"""
    from eexit.data.task_data import TASK_DATA

    from eexit.models.early_exit import EEXIT_META

    meta = Path(s.model_spec, EEXIT_META)
    if s.dataset is None and meta.is_file():  # before loading the model: the checkpoint's training data
        import json

        s.dataset = json.loads(meta.read_text()).get("train_config", {}).get("data", {}).get("dataset")
    return s.dataset is not None and s.dataset in TASK_DATA


def setup(s: EvalSetup, bind: bool = True, model=None):
    """Policy, model, evaluation windows and the resolved settings, validated before any output is written."""
    model, tokenizer, meta, policy = setup_model(s, bind, model)
    if is_task(s):
        return (model, policy, *task_pairs(s, model, tokenizer, meta))
    if model.is_seq2seq:
        raise EexitError("an encoder-decoder model is evaluated on a task dataset (--dataset bible-en-fr, aclsum, wiki-cloze-qa, ...)")
    train_cfg = meta.get("train_config", {})
    dataset = s.dataset
    seq_len = s.seq_len if s.seq_len is not None else train_cfg.get("data", {}).get("seq_len", 128)
    check_lengths(model, seq_len, s.batch_size, s.max_tokens)
    corpus = data_mod.load_corpus(dataset, train_cfg.get("data", {}).get("text_field", "text"))
    docs = data_mod.corpus_split(corpus, s.split, dataset)
    tokens = data_mod.encode_documents(tokenizer, docs, f"{dataset}:{s.split}")
    x, y = data_mod.eval_windows(tokens, seq_len, s.max_tokens)
    resolved = {"model": s.model_spec, "policy": s.policy, "threshold": s.threshold, "min_exit_layer": s.min_exit_layer,
                "policy_params": s.policy_params or {}, "dataset": dataset, "split": s.split, "seq_len": seq_len,
                "max_tokens": s.max_tokens, "exit_layers": model.exit_layers, "num_layers": model.num_layers}
    return model, policy, x, y, resolved


def task_pairs(s: EvalSetup, model, tokenizer, meta):
    """Teacher-forced task data: the split's examples as `EncodedPairs` (targets = reference answers)."""
    from eexit.data.pairs import encode_pairs
    from eexit.data.task_data import task_split
    from eexit.data.tasks import get_task

    d = meta.get("train_config", {}).get("data", {})
    src_len, tgt_len = d.get("max_source_len", 192), d.get("max_target_len", 64)
    task_name, examples = task_split(s.dataset, s.split)
    pairs = encode_pairs(tokenizer, get_task(task_name), examples, model.is_seq2seq, src_len, tgt_len,
                         model.lm.config.decoder_start_token_id if model.is_seq2seq else None)
    if s.max_tokens:  # whole examples until the bound
        total, n = 0, 0
        while n < len(pairs) and total < s.max_tokens:
            total, n = total + len(pairs.targets[n]), n + 1
        pairs = pairs[:n]
    resolved = {"model": s.model_spec, "policy": s.policy, "threshold": s.threshold, "min_exit_layer": s.min_exit_layer,
                "policy_params": s.policy_params or {}, "dataset": s.dataset, "task": task_name, "split": s.split,
                "max_source_len": src_len, "max_target_len": tgt_len, "max_tokens": s.max_tokens,
                "exit_layers": model.exit_layers, "num_layers": model.num_layers}
    return pairs, None, resolved


def collect(model, policy: ExitPolicy, x, y, batch_size: int) -> tuple[ExitTable, float]:
    t0 = time.perf_counter()
    table = collect_exit_table(model, x, y, policy, batch_size=batch_size)
    return table, time.perf_counter() - t0


def table_columns(exit_layers: list[int]) -> tuple[list[str], dict[str, str]]:
    cols = ["threshold", "ppl", "compute_pct", "overhead_pct", "agreement_pct"] + [f"exit@{l}_pct" for l in exit_layers]
    headers = {"threshold": "Threshold", "ppl": "PPL", "compute_pct": "Compute%", "overhead_pct": "Decision overhead%",
               "agreement_pct": "Top-1 agreement%", **{f"exit@{l}_pct": f"Exit@{l}%" for l in exit_layers}}
    return cols, headers


def per_exit_notes(table: ExitTable) -> str:
    ppl = per_exit_ppl(table)
    rows = " | ".join(f"layer {l}: {p:.2f}" for l, p in ppl.items())
    return f"Static exits (every token at one layer), PPL — {rows}. Full-model PPL: {ppl[table.num_layers]:.2f}. Tokens: {table.tokens}.\n\n"


def run_evaluate(s: EvalSetup, out: str | None = None, overwrite: bool = False) -> dict:
    if out:
        prepare_dir(out, overwrite)
    model, policy, x, y, resolved = setup(s)
    table, seconds = collect(model, policy, x, y, s.batch_size)
    row = exit_metrics(table, policy)
    row["eval_tokens_per_s"] = table.tokens / seconds
    if out:
        cols, headers = table_columns(table.exit_layers)
        write_results(out, "evaluate", f"Early-exit evaluation: {s.policy} on {resolved['dataset']}/{s.split}", [row],
                      provenance(resolved), cols + ["full_ppl"], headers | {"full_ppl": "Full PPL"}, per_exit_notes(table))
    return row


def run_generation(s: EvalSetup, g, out: str | None = None, overwrite: bool = False) -> tuple[list[dict], dict]:
    """`evaluate --generate`: early-exit decoding vs full-depth decoding on prompts from the split."""
    from eexit.models.decoding import KV_MODES, EarlyExitDecoder
    from eexit.evaluation.generation import compare, prompts_from

    if out:
        prepare_dir(out, overwrite)
    if g.kv_mode not in KV_MODES:
        raise EexitError(f"unknown KV mode {g.kv_mode!r}; valid: {', '.join(KV_MODES)}")
    if is_task(s):
        raise EexitError(f"--generate decodes LM prompts; on the task dataset {s.dataset!r} run evaluate without --generate "
                         "(it reports speedup and agreement with full-depth decoding next to the task metric)")
    if g.prompts < 1 or g.prompt_len < 1 or g.max_new_tokens < 2:
        raise EexitError("--prompts and --prompt-len must be >= 1 and --max-new-tokens >= 2")
    model, policy, _, _, resolved = setup(s)
    limit = max_positions(model)
    if limit and g.prompt_len + g.max_new_tokens > limit:
        raise EexitError(f"--prompt-len + --max-new-tokens must be <= {limit} (the model's positions); got {g.prompt_len + g.max_new_tokens}")
    decoder = EarlyExitDecoder(model, policy, g.kv_mode)
    reference = EarlyExitDecoder(model, None, "full")
    x = prompts_from(model.tokenizer, resolved["dataset"], s.split, g.prompts, g.prompt_len)
    # fixed-length generation (no stop at EOS): both decoders produce the same number of tokens
    rows, total = compare(model, decoder, reference, x, g, None, model.tokenizer.pad_token_id)
    if out:
        resolved.update(g.__dict__)
        write_results(out, "generation", f"Early-exit decoding: {s.policy} @ {s.threshold}, kv {g.kv_mode}", rows + [{"sample": "total", **total}],
                      provenance(resolved))
    return rows, total


def run_sweep(s: EvalSetup, thresholds: list[float], out: str, overwrite: bool = False) -> list[dict]:
    prepare_dir(out, overwrite)
    model, policy, x, y, resolved = setup(s)
    resolved["thresholds"] = thresholds
    table, _ = collect(model, policy, x, y, s.batch_size)
    rows = [exit_metrics(table, policy, t) for t in thresholds]
    cols, headers = table_columns(table.exit_layers)
    title = f"Threshold sweep: {s.policy} on {resolved['dataset']}/{s.split} ({Path(s.model_spec).name})"
    write_results(out, "sweep", title, rows, provenance(resolved), cols, headers, per_exit_notes(table))
    L = table.num_layers
    statics = {f"exit at layer {l}": (100.0 * l / L, p) for l, p in per_exit_ppl(table).items()}
    plot_tradeoff(Path(out) / "sweep.png", {s.policy: [(r["compute_pct"], r["ppl"], r["threshold"]) for r in rows]},
                  "compute % (layers used / layers)", "perplexity", title, statics)
    return rows


SHORT = {"threshold": "thr", "ppl": "PPL", "full_ppl": "full PPL", "compute_pct": "compute%", "overhead_pct": "overhead%",
         "total_pct": "total%", "agreement_pct": "agree%", "eval_tokens_per_s": "tok/s"}


def print_rows(rows: list[dict], title: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    keys = [k for k in rows[0] if k != "tokens"]
    t = Table(title=title)
    for k in keys:
        t.add_column(SHORT.get(k, k.replace("_pct", "%")), justify="right")
    for r in rows:
        t.add_row(*[f"{r[k]:.2f}" if isinstance(r[k], float) else ("-" if r[k] is None else str(r[k])) for k in keys])
    Console(width=200).print(t)
