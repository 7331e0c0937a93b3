"""`make bench` (generation part): eexit's decoder against `transformers` on the same model and
prompts, ratios measured side by side in one run -> results/bench/generation.{md,csv,json,png}.

    python benchmarks/generation.py --model checkpoints/demo --model path/to/SmolLM2.gguf

`--dtypes float32,bfloat16`: instead, decoding tokens/s of one model in each dtype side by side
(both models loaded, repetitions interleaved so machine load hits every dtype alike) ->
generation_dtype.*: what reduced precision buys (or costs) on this device.

`--device` / `--dtype` (default auto: a GPU in bfloat16 when there is one, else the CPU in
float32) place the models; every timing follows one untimed warm-up run and uses
`eexit.runtime.now` (CUDA-synchronised), and every row names its device and dtype.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from eexit import quiet
from eexit.evaluation.generation import prompts_from
from eexit.evaluation.timing import transformers_greedy as hf_greedy
from eexit.models.decoding import EarlyExitDecoder
from eexit.models.loading import load_model
from eexit.policies.base import make_policy
from eexit.reporting import plot_tradeoff, provenance, write_results
from eexit.runtime import Runtime, device_name, now, resolve_runtime


def timed(fn, reps: int, device: torch.device | str = "cpu") -> tuple[float, object]:
    """Median seconds of `reps` runs after one untimed warm-up run, and the last output."""
    fn()
    times, out = [], None
    for _ in range(reps):
        t0 = now(device)
        out = fn()
        times.append(now(device) - t0)
    return statistics.median(times), out


def placement(rt: Runtime) -> dict:
    """The device and dtype columns of a row."""
    return {"device": str(rt.device), "dtype": rt.dtype_name}


def exit_set(exits: str | None, L: int) -> list[int]:
    """'2,3' -> [2, 3, L]; None -> every layer."""
    return sorted({int(e) for e in exits.split(",")} | {L}) if exits else list(range(1, L + 1))


def configs_for(L: int) -> list[tuple[str, float, str | None, int]]:
    """(policy, threshold, exit layers, min exit layer): the decision-cost design choices we
    compare."""
    every = ",".join(str(l) for l in range(max(1, L // 2), L, max(1, L // 6)))
    return (
        [("max-prob", t, None, 1) for t in (0.9, 0.7, 0.5)]
        + [("max-prob", t, every, 1) for t in (0.9, 0.5)]
        + [("saturation", t, None, max(1, L // 3)) for t in (0.99, 0.95, 0.9)]
    )


def bench(
    spec: str, label: str, n_prompts: int, prompt_len: int, new: int, reps: int, rt: Runtime
) -> list[dict]:
    model, tok, _ = load_model(spec, runtime=rt)
    dev = rt.device
    x = prompts_from(tok, "wiki-gensim", "test", n_prompts, prompt_len).to(dev)
    L = model.num_layers
    full = EarlyExitDecoder(model, None, "full")

    def one(dec):
        return lambda: [
            dec.generate(x[i : i + 1], None, new, pad_token_id=0) for i in range(len(x))
        ]

    def hf_one(**kw):
        return lambda: [hf_greedy(model, x[i : i + 1], new, **kw) for i in range(len(x))]

    t_hf, hf_out = timed(hf_one(), reps, dev)
    t_full, full_out = timed(one(full), reps, dev)
    n_tok = len(x) * new
    ref = torch.stack([r.new_tokens[0] for r in full_out])
    hf_tokens = torch.stack([o[0, prompt_len:] for o in hf_out])
    rows = [
        {
            "model": label,
            "decoder": "transformers generate",
            "batch": 1,
            "tokens_per_s": n_tok / t_hf,
            "speedup_vs_full": t_full / t_hf,
            "agreement_pct": 100 * (hf_tokens == ref).float().mean().item(),
        },
        {
            "model": label,
            "decoder": "eexit full depth",
            "batch": 1,
            "tokens_per_s": n_tok / t_full,
            "speedup_vs_full": 1.0,
            "overhead_vs_transformers": t_full / t_hf,
            "agreement_pct": 100.0,
        },
    ]
    tried = []  # (row, setting) of every eexit early-exit setting
    for setting in configs_for(L):
        policy, thr, exits, min_exit = setting
        model.exit_layers = exit_set(exits, L)
        dec = EarlyExitDecoder(model, make_policy(policy, thr, min_exit), "propagate")
        t, outs = timed(one(dec), reps, dev)
        new_tok = torch.stack([o.new_tokens[0] for o in outs])
        exit_l = torch.stack([o.exit_layers[0, 1:] for o in outs]).float()
        frac = exit_l.mean().item() / L
        rows.append(
            {
                "model": label,
                "decoder": f"eexit {policy} {thr}"
                + (f" exits {exits}" if exits else "")
                + (f" min {min_exit}" if min_exit > 1 else ""),
                "batch": 1,
                "tokens_per_s": n_tok / t,
                "speedup_vs_full": t_full / t,
                "layers_used_pct": 100 * frac,
                "realized_over_ideal": (t_full / t) * frac,
                "agreement_pct": 100 * (new_tok == ref).float().mean().item(),
            }
        )
        tried.append((rows[-1], setting))
    model.exit_layers = list(range(1, L + 1))
    if type(model.lm).__name__.startswith("Llama"):
        for k in sorted({max(1, L // 4), max(1, L // 2)}):
            try:
                t, outs = timed(hf_one(assistant_early_exit=k), reps, dev)
                toks = torch.stack([o[0, prompt_len : prompt_len + new] for o in outs])
                rows.append(
                    {
                        "model": label,
                        "decoder": f"transformers assistant_early_exit={k}",
                        "batch": 1,
                        "tokens_per_s": n_tok / t,
                        "speedup_vs_full": t_full / t,
                        "agreement_pct": 100 * (toks == ref).float().mean().item(),
                    }
                )
            except Exception as e:  # noqa: BLE001  (report, do not hide)
                rows.append(
                    {
                        "model": label,
                        "decoder": f"transformers assistant_early_exit={k}",
                        "batch": 1,
                        "note": f"failed: {type(e).__name__}",
                    }
                )
    else:
        rows.append(
            {
                "model": label,
                "decoder": "transformers assistant_early_exit",
                "batch": 1,
                "note": f"not supported by transformers for {type(model.lm).__name__} "
                "(IndexError in its layer truncation)",
            }
        )
    # batch 8: per-row exits against full depth, at the fastest batch-1 setting that keeps >= 99%
    # agreement
    ok = [(r, setting) for r, setting in tried if r["agreement_pct"] >= 99.0]
    if ok:
        best, (policy, thr, exits, min_exit) = max(ok, key=lambda rs: rs[0]["speedup_vs_full"])
        model.exit_layers = exit_set(exits, L)
        xb = prompts_from(tok, "wiki-gensim", "test", 8, prompt_len).to(dev)
        fb = EarlyExitDecoder(model, None, "full")
        eb = EarlyExitDecoder(model, make_policy(policy, thr, min_exit), "propagate")
        tf, fo = timed(lambda: fb.generate(xb, None, new, pad_token_id=0), reps, dev)
        te, eo = timed(lambda: eb.generate(xb, None, new, pad_token_id=0), reps, dev)
        rows.append(
            {
                "model": label,
                "decoder": f"batch 8: {best['decoder']}",
                "batch": 8,
                "tokens_per_s": 8 * new / te,
                "speedup_vs_full": tf / te,
                "layers_used_pct": 100 * eo.exit_layers[:, 1:].float().mean().item() / L,
                "agreement_pct": 100 * (eo.new_tokens == fo.new_tokens).float().mean().item(),
                "full_tokens_per_s": 8 * new / tf,
            }
        )
        model.exit_layers = list(range(1, L + 1))
    return [{**r, **placement(rt)} for r in rows]


def bench_seq2seq(spec: str, n_sources: int, new: int, reps: int, rt: Runtime) -> list[dict]:
    """An encoder-decoder (T5) checkpoint: eexit's full-depth decoder against transformers' greedy
    generate
    on test sources of its task dataset, exactly `new` tokens each, batch 1, then a few early-exit
    settings."""
    from eexit.data.pairs import model_inputs
    from eexit.data.task_data import task_split
    from eexit.data.tasks import get_task

    model, tok, info = load_model(spec, runtime=rt)
    dev = rt.device
    src_len = info.data.max_source_len if info.train_config else 64
    task_name, examples = task_split(info.trained_dataset or "bible-en-fr", "test", n_sources)
    task = get_task(task_name)
    srcs = [
        torch.tensor([model_inputs(tok, task, ex, True, src_len)], device=dev) for ex in examples
    ]
    start = torch.tensor([[model.lm.config.decoder_start_token_id]], device=dev)
    L = model.num_layers
    full = EarlyExitDecoder(model, None, "full")

    def one(dec):
        return lambda: [dec.generate(start, None, new, pad_token_id=0, source_ids=x) for x in srcs]

    def hf():
        return [hf_greedy(model, x, new) for x in srcs]

    t_hf, hf_out = timed(hf, reps, dev)
    t_full, full_out = timed(one(full), reps, dev)
    ref = torch.stack([r.new_tokens[0] for r in full_out])
    n_tok = len(srcs) * new
    rows = [
        {
            "model": Path(spec).name,
            "decoder": "transformers generate",
            "tokens_per_s": n_tok / t_hf,
            "speedup_vs_full": t_full / t_hf,
            "agreement_pct": 100
            * (torch.stack([o[0, 1:] for o in hf_out]) == ref).float().mean().item(),
        },
        {
            "model": Path(spec).name,
            "decoder": "eexit full depth",
            "tokens_per_s": n_tok / t_full,
            "speedup_vs_full": 1.0,
            "overhead_vs_transformers": t_full / t_hf,
            "agreement_pct": 100.0,
        },
    ]
    for policy, thr, kv in (
        ("saturation", 0.9, "propagate"),
        ("margin", 0.5, "propagate"),
        ("margin", 0.5, "recompute"),
    ):
        t, outs = timed(one(EarlyExitDecoder(model, make_policy(policy, thr), kv)), reps, dev)
        frac = torch.stack([o.exit_layers[0, 1:] for o in outs]).float().mean().item() / L
        rows.append(
            {
                "model": Path(spec).name,
                "decoder": f"eexit {policy} {thr} kv {kv}",
                "tokens_per_s": n_tok / t,
                "speedup_vs_full": t_full / t,
                "layers_used_pct": 100 * frac,
                "realized_over_ideal": (t_full / t) * frac,
                "agreement_pct": 100
                * (torch.stack([o.new_tokens[0] for o in outs]) == ref).float().mean().item(),
            }
        )
    return [{**r, **placement(rt)} for r in rows]


def cpu_bf16_instructions() -> list[str]:
    """The CPU's native bfloat16 instruction sets (without them torch emulates bfloat16)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return sorted(flags & {"avx512_bf16", "amx_bf16"})


def bench_dtypes(
    spec: str,
    label: str,
    dtypes: list[str],
    device: str,
    n_prompts: int,
    prompt_len: int,
    new: int,
    reps: int,
) -> tuple[list[dict], list[Runtime]]:
    """Greedy decoding tokens/s of one model in each dtype, side by side at batch 1: transformers
    `generate` and eexit full depth, on the same prompts. Every (dtype, decoder) is warmed up once,
    then the repetitions are interleaved, so drift in machine load hits every variant alike."""
    runs = {}
    for name in dtypes:
        rt = resolve_runtime(device, name)
        model, tok, _ = load_model(spec, runtime=rt)
        x = prompts_from(tok, "wiki-gensim", "test", n_prompts, prompt_len).to(rt.device)
        runs[name] = (rt, model, x)

    def hf(model, x):
        return lambda: torch.cat(
            [hf_greedy(model, x[i : i + 1], new)[:, -new:] for i in range(len(x))]
        )

    def ours(model, x):
        dec = EarlyExitDecoder(model, None, "full")
        return lambda: torch.cat(
            [
                dec.generate(x[i : i + 1], None, new, pad_token_id=0).new_tokens
                for i in range(len(x))
            ]
        )

    fns = {}
    for name, (rt, model, x) in runs.items():
        fns[name, "transformers generate"] = (rt.device, hf(model, x))
        fns[name, "eexit full depth"] = (rt.device, ours(model, x))
    for _, fn in fns.values():
        fn()  # warm-up
    times: dict = {k: [] for k in fns}
    outs: dict = {}
    for _ in range(reps):
        for k, (dev, fn) in fns.items():
            t0 = now(dev)
            outs[k] = fn()
            times[k].append(now(dev) - t0)
    n_tok = n_prompts * new
    base = dtypes[0]
    ref = outs[base, "transformers generate"]
    rows = []
    for (name, decoder), ts in times.items():
        rate = n_tok / statistics.median(ts)
        base_rate = n_tok / statistics.median(times[base, decoder])
        rows.append(
            {
                "model": label,
                "decoder": decoder,
                "batch": 1,
                **placement(runs[name][0]),
                "tokens_per_s": rate,
                f"speed_vs_{base}": rate / base_rate,
                f"agreement_with_{base}_pct": 100
                * (outs[name, decoder] == ref).float().mean().item(),
            }
        )
    return rows, [rt for rt, _, _ in runs.values()]


def profile(
    spec: str,
    label: str,
    policy: str,
    threshold: float,
    exits: str | None,
    min_exit: int,
    prompt_len: int,
    new: int,
    out: Path,
    rt: Runtime,
) -> None:
    """Where one early-exit generation spends its time (torch.profiler, operator and Python-function
    view)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    model, tok, _ = load_model(spec, runtime=rt)
    L = model.num_layers
    if exits:
        model.exit_layers = exit_set(exits, L)
    x = prompts_from(tok, "wiki-gensim", "test", 1, prompt_len).to(rt.device)
    dec = EarlyExitDecoder(model, make_policy(policy, threshold, min_exit), "propagate")
    full = EarlyExitDecoder(model, None, "full")
    dec.generate(x, None, 4, pad_token_id=0)
    lines = []
    activities = [ProfilerActivity.CPU]
    if rt.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    for name, d in (("full depth", full), (f"{policy} {threshold}", dec)):
        with tprofile(activities=activities, with_stack=False) as prof:
            r = d.generate(x, None, new, pad_token_id=0)
        mean_exit = r.exit_layers[0, 1:].float().mean().item()
        lines += [
            f"## {label}: {name} (mean exit layer {mean_exit:.2f} of {L}, {new} tokens)",
            "",
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18),
            "",
        ]
    (out / f"generation_profile_{label}.txt").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[])
    ap.add_argument(
        "--seq2seq", help="only bench this encoder-decoder checkpoint (-> generation_seq2seq.*)"
    )
    ap.add_argument("--label", action="append")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="results/bench")
    ap.add_argument(
        "--profile", action="store_true", help="also profile one early-exit configuration per model"
    )
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    ap.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    ap.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: torch's); 1 gives stable timings on a shared machine",
    )
    ap.add_argument(
        "--dtypes",
        help="e.g. float32,bfloat16: only compare decoding speed of the first --model in each "
        "dtype (-> generation_dtype.*)",
    )
    a = ap.parse_args()
    quiet()
    torch.set_grad_enabled(False)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.dtypes:
        if not a.model:
            ap.error("--dtypes compares one --model")
        dtype_table(a)
        return
    rt = resolve_runtime(a.device, a.dtype)
    where = f"{device_name(rt.device)}, {rt.dtype_name}"
    if a.seq2seq:
        rows = bench_seq2seq(a.seq2seq, a.prompts, a.new, a.reps, rt)
        write_results(
            a.out,
            "generation_seq2seq",
            f"Encoder-decoder decoding speed ({Path(a.seq2seq).name}, greedy, batch 1, {where})",
            rows,
            provenance(
                {
                    "model": a.seq2seq,
                    "sources": a.prompts,
                    "new_tokens": a.new,
                    "reps": a.reps,
                    **rt.describe(),
                }
            ),
            [
                "model",
                "decoder",
                "device",
                "dtype",
                "tokens_per_s",
                "speedup_vs_full",
                "layers_used_pct",
                "realized_over_ideal",
                "agreement_pct",
                "overhead_vs_transformers",
            ],
            notes=(
                "Median of repetitions after one warm-up run; exactly `new_tokens` per source "
                "(EOS ignored). overhead_vs_transformers: eexit full-depth "
                "time / transformers generate time; realized_over_ideal: speedup x layers-used "
                "fraction.\n\n"
            ),
        )
        for r in rows:
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})
        return
    if not a.model:
        ap.error("give --model (decoder-only) or --seq2seq")
    labels = a.label or [Path(m).stem for m in a.model]
    rows = []
    for spec, label in zip(a.model, labels):
        print(f"generation bench: {label} ...", flush=True)
        rows += bench(spec, label, a.prompts, a.prompt_len, a.new, a.reps, rt)
    cols = [
        "model",
        "decoder",
        "batch",
        "device",
        "dtype",
        "tokens_per_s",
        "speedup_vs_full",
        "layers_used_pct",
        "realized_over_ideal",
        "agreement_pct",
        "overhead_vs_transformers",
        "note",
    ]
    write_results(
        a.out,
        "generation",
        f"Early-exit decoding speed (greedy, KV propagate, {where})",
        rows,
        provenance(
            {
                "models": a.model,
                "prompts": a.prompts,
                "prompt_len": a.prompt_len,
                "new_tokens": a.new,
                "reps": a.reps,
                **rt.describe(),
            }
        ),
        cols,
        notes=(
            "Median of repetitions after one warm-up run, on the same prompts (wiki-gensim test "
            "split). speedup_vs_full: eexit full-depth time / this "
            "decoder's time; overhead_vs_transformers: eexit full-depth time / transformers "
            "generate time (target <= 1.05); "
            "realized_over_ideal: speedup x layers used fraction (target >= 0.9 at batch 1); "
            "agreement: share of tokens equal to "
            "the full-depth greedy output.\n\n"
        ),
    )
    series = {}
    for r in rows:
        if r["decoder"].startswith("eexit ") and "layers_used_pct" in r and r["batch"] == 1:
            series.setdefault(r["model"], []).append(
                (r["agreement_pct"], r["speedup_vs_full"], None)
            )
    plot_tradeoff(
        Path(a.out) / "generation.png",
        series,
        "agreement with full-depth output (%)",
        "speedup over full depth (x)",
        "Early-exit decoding: speed vs quality",
    )
    for r in rows:
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})
    if a.profile:
        for spec, label in zip(a.model, labels):
            L = load_model(spec, runtime=rt)[0].num_layers
            profile(
                spec,
                label,
                "saturation",
                0.95,
                None,
                max(1, L // 3),
                a.prompt_len,
                a.new,
                Path(a.out),
                rt,
            )


def dtype_table(a) -> None:
    """`--dtypes`: generation_dtype.* (decoding speed of one model in each dtype)."""
    spec, dtypes = a.model[0], [d.strip() for d in a.dtypes.split(",") if d.strip()]
    label = (a.label or [Path(spec).stem])[0]
    print(f"decoding speed by dtype: {label}, {', '.join(dtypes)} ...", flush=True)
    rows, rts = bench_dtypes(spec, label, dtypes, a.device, a.prompts, a.prompt_len, a.new, a.reps)
    rt = rts[0]
    config = {
        "model": spec,
        "prompts": a.prompts,
        "prompt_len": a.prompt_len,
        "new_tokens": a.new,
        "reps": a.reps,
        **rt.describe(),
        "dtype": ",".join(dtypes),  # one table, every dtype
        "cpu_bf16_instructions": cpu_bf16_instructions() if rt.device.type == "cpu" else None,
        "cpu_threads": torch.get_num_threads(),
    }
    base = dtypes[0]
    threads = (
        f", torch on {torch.get_num_threads()} CPU thread(s)" if rt.device.type == "cpu" else ""
    )
    write_results(
        a.out,
        "generation_dtype",
        f"Decoding speed by dtype ({label}, {device_name(rt.device)}, greedy, batch 1)",
        rows,
        provenance(config),
        notes=(
            f"{a.prompts} prompts of {a.prompt_len} tokens (wiki-gensim test split), {a.new} new "
            "tokens each (EOS ignored), one prompt at a time; median of "
            f"{a.reps} repetitions interleaved across dtypes and decoders, after one warm-up run "
            f"each{threads}. speed_vs_{base}: tokens/s over the same decoder's in {base}; "
            f"agreement: tokens equal to transformers' {base} greedy output. Information: which "
            "dtype decodes faster depends on the device (native bfloat16 instructions, memory "
            "bandwidth), not on eexit.\n\n"
        ),
    )
    for r in rows:
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})


if __name__ == "__main__":
    main()
