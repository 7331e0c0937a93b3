"""`make bench`: ratios measured side by side in one run, written to results/bench/.

1. Training step time of each early-exit loss over `final` on the same model and batch
   (interleaved repetitions, median step time), with the intermediate-exit token share
   `loss.exit_token_fraction` at 1.0 (exact, naive: LM head at every exit) and lower.
2. Evaluation throughput (tokens/s): the early-exit LM evaluation (every exit's head, loss and
   policy score) against a plain full-model evaluation, on the same windows.

    python benchmarks/speed.py --out results/bench [--device cuda --dtype bfloat16]

`--device` / `--dtype` (default auto: a GPU in bfloat16 when there is one, else the CPU in
float32) place the models; every variant is warmed up once and timed with `eexit.runtime.now`
(CUDA-synchronised); the tables name the device and dtype.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from eexit import quiet
from eexit.config import LossConfig, RunConfig
from eexit.data import corpora as data_mod
from eexit.evaluation.records import collect_exit_table
from eexit.models.early_exit import EarlyExitModel, resolve_exit_layers
from eexit.models.loading import build_lm
from eexit.policies.base import make_policy
from eexit.reporting import provenance, write_results
from eexit.runtime import LOCAL, Runtime, device_name, now, resolve_runtime
from eexit.training.losses import LossBatch, make_loss


def bench_model(
    n_layers: int, d_model: int, vocab: int, seq_len: int, rt: Runtime = LOCAL
) -> tuple[EarlyExitModel, RunConfig]:
    cfg = RunConfig()
    cfg.model.n_layers, cfg.model.d_model, cfg.model.d_ff, cfg.model.vocab_size = (
        n_layers,
        d_model,
        4 * d_model,
        vocab,
    )
    cfg.model.n_heads = max(1, d_model // 32)
    cfg.model.max_len = cfg.data.seq_len = seq_len
    torch.manual_seed(0)
    lm = build_lm(cfg.model, vocab, 0, 0)
    model = EarlyExitModel(lm, resolve_exit_layers("all", n_layers))
    return model.to(device=rt.device, dtype=rt.dtype), cfg


def interleaved_medians(fns: dict, reps: int, device="cpu") -> dict[str, float]:
    """Median seconds of each callable over `reps` interleaved rounds (after one warm-up each),
    so drift in machine load hits every variant alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = now(device)
            fn()
            times[k].append(now(device) - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def step_time(model, opt, loss_cfg, x, y) -> float:
    t0 = now(x.device)
    states = model(x)
    loss, _ = make_loss(loss_cfg)(LossBatch(model, states, y, loss_cfg.exit_token_fraction))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return now(x.device) - t0


def training_bench(
    n_layers=4, d_model=128, vocab=4096, seq_len=128, batch=16, reps=12, rt: Runtime = LOCAL
) -> list[dict]:
    model, cfg = bench_model(n_layers, d_model, vocab, seq_len, rt)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, seq_len), generator=g).to(rt.device)
    y = torch.randint(0, vocab, (batch, seq_len), generator=g).to(rt.device)
    variants = [
        ("final", 1.0),
        ("weighted-ce", 1.0),
        ("weighted-ce", 0.25),
        ("weighted-ce", 0.1),
        ("deep-supervision", 1.0),
        ("free-kd", 0.25),
    ]
    times: dict[tuple, list[float]] = {v: [] for v in variants}
    for v in variants:  # warm-up
        step_time(model, opt, LossConfig(name=v[0], exit_token_fraction=v[1]), x, y)
    for _ in range(reps):  # interleaved, so drift in machine load hits every variant alike
        for v in variants:
            times[v].append(
                step_time(model, opt, LossConfig(name=v[0], exit_token_fraction=v[1]), x, y)
            )
    base = statistics.median(times[("final", 1.0)])
    rows = []
    for (name, frac), ts in times.items():
        med = statistics.median(ts)
        rows.append(
            {
                "loss": name,
                "exit_token_fraction": frac,
                "step_ms": 1000 * med,
                "ratio_vs_final": med / base,
                "tokens_per_s": batch * seq_len / med,
            }
        )
    return rows


@torch.no_grad()
def eval_bench(
    n_layers=4, d_model=128, vocab=4096, seq_len=128, batch=8, windows=48, reps=3, rt=LOCAL
) -> list[dict]:
    model, _ = bench_model(n_layers, d_model, vocab, seq_len, rt)
    model.eval()
    g = torch.Generator().manual_seed(1)
    stream = torch.randint(0, vocab, (windows * seq_len + 1,), generator=g)
    x, y = (t.to(rt.device) for t in data_mod.eval_windows(stream, seq_len))
    pol = make_policy("max-prob", 0.9)

    def full():
        for i in range(0, len(x), batch):
            logits = model.lm(x[i : i + batch]).logits.float()
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, vocab), y[i : i + batch].reshape(-1)
            )

    def early():
        collect_exit_table(model, x, y, pol, batch_size=batch)

    med = interleaved_medians(
        {"full-model evaluation": full, "early-exit evaluation (all exits, max-prob)": early},
        reps,
        rt.device,
    )
    base = med["full-model evaluation"]
    return [
        {"mode": k, "tokens_per_s": y.numel() / t, "time_ratio_vs_full": t / base}
        for k, t in med.items()
    ]


@torch.no_grad()
def analysis_bench(
    n_layers=8, d_model=128, vocab=4096, seq_len=128, batch=8, windows=32, reps=3, rt=LOCAL
) -> list[dict]:
    """analyze-monotonicity's per-batch work against a plain forward with hidden states (same
    tokens)."""
    from eexit.analysis.monotonicity import forward_records

    model, _ = bench_model(n_layers, d_model, vocab, seq_len, rt)
    model.eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, vocab, (windows, seq_len), generator=g).to(rt.device)

    def plain():
        for i in range(0, windows, batch):
            model.lm(x[i : i + batch], output_hidden_states=True)

    def analysis(sub):
        return lambda: [
            forward_records(model, x[i : i + batch], x[i : i + batch], 5, sub)
            for i in range(0, windows, batch)
        ]

    fns = {
        "plain forward, output_hidden_states": plain,
        "analysis (top-5, no sub-layers)": analysis(False),
        "analysis (top-5 + sub-layers)": analysis(True),
    }
    med = interleaved_medians(fns, reps, rt.device)
    base = med["plain forward, output_hidden_states"]
    return [
        {"mode": k, "tokens_per_s": windows * seq_len / t, "time_ratio_vs_plain": t / base}
        for k, t in med.items()
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/bench")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    ap.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    a = ap.parse_args()
    quiet()
    rt = resolve_runtime(a.device, a.dtype)
    where = {"device": str(rt.device), "dtype": rt.dtype_name}
    on = f"{device_name(rt.device)}, {rt.dtype_name}"
    shape = {"n_layers": a.layers, "d_model": a.d_model, "vocab": a.vocab, "seq_len": 128}
    shape.update(rt.describe())
    print(f"training step bench ({on}) ...", flush=True)
    train_rows = [{**r, **where} for r in training_bench(a.layers, a.d_model, a.vocab, rt=rt)]
    write_results(
        a.out,
        "training_step",
        f"Training step time over `final` ({a.layers} layers, d={a.d_model}, V={a.vocab}, batch "
        f"16x128, exits at every layer; {on})",
        train_rows,
        provenance({"bench": "training_step", **shape, "batch": 16}),
        notes="Median of 12 interleaved steps (forward + backward + AdamW) per variant. "
        "Target: weighted-ce <= 1.15x final.\n\n",
    )
    print("evaluation throughput bench ...", flush=True)
    eval_rows = [{**r, **where} for r in eval_bench(a.layers, a.d_model, a.vocab, rt=rt)]
    write_results(
        a.out,
        "evaluation",
        f"LM evaluation throughput ({a.layers} layers, d={a.d_model}, V={a.vocab}, 48 windows of "
        f"128; {on})",
        eval_rows,
        provenance({"bench": "evaluation", **shape, "batch": 8}),
        notes="Median of 3 interleaved runs.\n\n",
    )
    print("analysis throughput bench ...", flush=True)
    ana_rows = [{**r, **where} for r in analysis_bench(8, a.d_model, a.vocab, rt=rt)]
    write_results(
        a.out,
        "analysis",
        f"analyze-monotonicity throughput (8 layers, d={a.d_model}, V={a.vocab}, 32 windows of "
        f"128; {on})",
        ana_rows,
        provenance({"bench": "analysis", **shape, "n_layers": 8, "batch": 8}),
        notes="Median of 3 interleaved runs; the plain forward computes the LM head once "
        "(all positions), the analysis once per layer. Target: <= 1.2x.\n\n",
    )
    for r in train_rows + eval_rows + ana_rows:
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})


if __name__ == "__main__":
    main()
