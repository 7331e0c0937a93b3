"""Recipe behind `eexit analyze-monotonicity`: setup (models, data) -> one forward per batch ->
statistics -> tables (Markdown / CSV / JSON) and figures styled like seed 001's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from eexit.analysis import monotonicity as mono
from eexit.analysis.plots import plot_all
from eexit.data.pairs import EncodedPairs, batches
from eexit.errors import EexitError
from eexit.evaluation.context import EvalRequest, open_context, teacher_forced_inputs
from eexit.files import atomic_json, output_folder
from eexit.reporting import prepare_dir, provenance, track, write_results
from eexit.runtime import Runtime, resolve_runtime


@dataclass(kw_only=True)
class AnalyzeSetup:
    models: list[str]  # checkpoints, HF folders / hub names, .gguf files
    labels: list[str] | None = None  # legend names (default: folder / file names)
    dataset: str | None = None  # default: the first checkpoint's training corpus, else wiki-gensim
    split: str = "test"
    seq_len: int | None = None
    max_tokens: int = 8192  # bound the work
    batch_size: int = 8
    top_k: int = 5  # ranks followed for top-k saturation
    examples: int = 3  # tokens shown in figure 3
    sublayers: bool = True  # also read the residual stream after attention
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto, float32, bfloat16, float16


def analyze_model(
    spec: str, s: AnalyzeSetup, runtime: Runtime
) -> tuple[mono.LayerRecords, object, dict]:
    request = EvalRequest(
        model=spec,
        dataset=s.dataset,
        split=s.split,
        seq_len=s.seq_len,
        max_tokens=s.max_tokens,
        batch_size=s.batch_size,
    )
    ctx = open_context(request, bind=False, runtime=runtime)
    model = ctx.model
    if s.top_k > model.vocab_size:
        raise EexitError(f"--top-k {s.top_k} is above the vocabulary size {model.vocab_size}")
    x, y, resolved = teacher_forced_inputs(ctx)
    records = []
    batches = list(_batches(x, y, s.batch_size))
    shard = ctx.runtime.shard(len(batches))  # several processes: a contiguous block each
    mine = batches[shard.start : shard.stop]
    dev = model.device
    for xb, yb in track(mine, len(mine), f"analysing {Path(spec).name}"):
        xb = {k: v.to(dev) for k, v in xb.items()} if isinstance(xb, dict) else xb.to(dev)
        records.append(mono.forward_records(model, xb, yb.to(dev), s.top_k, s.sublayers))
    records = ctx.runtime.gather(records)  # every process: the batches in one-process order
    info = {
        "model": spec,
        "dataset": ctx.dataset,
        "split": s.split,
        "seq_len": resolved.get("seq_len"),
        "tokens": sum(r.targets.numel() for r in records),
        "num_layers": model.num_layers,
        "vocab_size": model.vocab_size,
    }
    return mono.concat(records), ctx.tokenizer, info


def _batches(x, y, batch_size: int):
    """(inputs, targets) batches: LM windows, or teacher-forced task pairs (T5 analyses its
    decoder on reference targets)."""
    if isinstance(x, EncodedPairs):
        yield from batches(x, batch_size)
        return
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]


def run_analysis(s: AnalyzeSetup, out: str, overwrite: bool = False) -> dict:
    if not s.models:
        raise EexitError("give at least one --model")
    labels = s.labels or [Path(m).stem if m.endswith(".gguf") else Path(m).name for m in s.models]
    if len(labels) != len(s.models):
        raise EexitError(
            f"--label given {len(labels)} times for {len(s.models)} models; give one per --model "
            "or none"
        )
    if s.top_k < 1 or s.examples < 0 or s.max_tokens < 1:
        raise EexitError("--top-k and --max-tokens must be >= 1 and --examples >= 0")
    prepare_dir(out, overwrite)
    runtime = resolve_runtime(s.device, s.dtype)  # before any model loads
    layer_rows, sat_rows, summary_rows, ex_all, sub_all, subword_all = [], [], [], {}, {}, {}
    infos = []
    for spec, label in zip(s.models, labels):
        rec, tok, info = analyze_model(spec, s, runtime)
        infos.append(info)
        layers = mono.per_layer_stats(rec)
        layer_rows += [{"model": label, **r} for r in layers]
        ranks, order = mono.topk_saturation(rec)
        sat_rows += [{"model": label, **r} for r in ranks]
        nm = mono.non_monotonic_share(rec)
        sw = mono.subword_exits(rec, tok)
        subword_all[label] = sw
        summary_rows.append(
            {
                "model": label,
                "layers": info["num_layers"],
                **nm,
                **{f"topk_{k}": v for k, v in order.items()},
                "word_start_mean_exit": sw["word_start"]["mean_exit_layer"],
                "continuation_mean_exit": sw["continuation"]["mean_exit_layer"],
            }
        )
        n = rec.top1.shape[1]
        positions = (
            [int(p) for p in torch.linspace(min(10, n - 1), min(n - 1, 120), s.examples).tolist()]
            if s.examples
            else []
        )
        ex_all[label] = mono.examples(rec, tok, positions)
        sub = mono.sublayer_stats(rec)
        if sub is not None:
            sub_all[label] = sub
    prov = provenance(
        {
            "models": s.models,
            "labels": labels,
            **{k: v for k, v in s.__dict__.items() if k not in ("models", "labels")},
            "data": infos,
            "runtime": runtime.describe(),
        }
    )
    result = {"summary": summary_rows, "per_layer": layer_rows, "main": runtime.is_main}
    if not runtime.is_main:  # several processes: the main one alone writes
        return result
    with output_folder(out, overwrite) as folder:
        write_results(
            folder,
            "per_layer",
            "Per-layer monotonicity statistics",
            layer_rows,
            prov,
            notes="top1_equals_final / top1_never_changes_after: % of tokens (seed 001 figure 1); "
            "p_final: probability each layer gives the final prediction (figure 2); "
            "monotone_from_here: % of tokens whose p_final never drops by more than 0.001 from "
            "this layer on.\n\n",
        )
        write_results(folder, "topk_saturation", "Top-k saturation (seed 003)", sat_rows, prov)
        notes = (
            "drop_after_peak: the final-layer probability of the final prediction is more than "
            f"{mono.DROP} below its peak over layers. topk_ordered_*: ranks saturate in order "
            "(rank k+1 fixes no earlier than rank k).\n\n"
        )
        write_results(folder, "summary", "Monotonicity summary", summary_rows, prov, notes=notes)
        atomic_json(folder / "examples.json", ex_all)
        atomic_json(folder / "subword.json", subword_all)
        if sub_all:
            rows = [{"model": m, **r} for m, rs in sub_all.items() for r in rs]
            write_results(
                folder,
                "sublayer",
                "Sub-layer exits (seed 004): after attention vs after the MLP",
                rows,
                prov,
            )
        plot_all(folder, layer_rows, sat_rows, ex_all, subword_all, sub_all)
    return result
