"""Peak memory and time of one training step with every exit trained, whole vs chunked exit
logits (`make bench`; issue: train early-exit LLMs at the size they come in).

Models of 2, 8 and 16 layers (d = 64, exits after every layer) with a 128k vocabulary, one
sequence of 2048 tokens, weighted CE: the whole loss holds (exits x tokens x V) float32 logits
and their gradient (8 exits: 8.6 GB of logits alone), the chunked one
(`train.logits_chunk_tokens`, eexit/training/chunked_ce.py) one chunk. The final-only loss of the
same model is the reference (target: the chunked loss at most 1.3x its peak). Each configuration
runs in a fresh process (peak RSS is per process; on a GPU, `torch.cuda.max_memory_allocated`),
the peak reported above the process's memory once the model, its optimizer state and the token
ids exist; the whole loss runs only where its logits fit `--whole-limit-gib`.

    python benchmarks/loss_memory.py --out results/bench
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from eexit import quiet
from eexit.evaluation.timing import in_fresh_process, peak_memory_mib
from eexit.reporting import provenance, write_results
from eexit.runtime import Runtime, now, resolve_runtime


def measure(layers: int, loss: str, chunk: int, vocab: int, seq_len: int, rt: Runtime) -> dict:
    """One configuration in this process: `steps` training steps (forward, backward, AdamW)."""
    from eexit.config import LossConfig, ModelConfig
    from eexit.models.early_exit import EarlyExitModel
    from eexit.models.loading import build_lm
    from eexit.training.losses import LossBatch, make_loss

    torch.manual_seed(0)
    cfg = ModelConfig(
        arch="llama", n_layers=layers, d_model=64, n_heads=2, d_ff=128, max_len=seq_len
    )
    model = EarlyExitModel(build_lm(cfg, vocab, 0, 0), "all").to(rt.device, rt.dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(vocab, (1, seq_len), device=rt.device)
    y = torch.randint(vocab, (1, seq_len), device=rt.device)
    loss_fn = make_loss(LossConfig(name=loss))
    for p in model.parameters():  # the optimizer state exists before the measured step
        opt.state[p] = {
            "step": torch.tensor(0.0),
            "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": torch.zeros_like(p),
        }
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    before = peak_memory_mib(rt.device)
    times, values = [], []
    for _ in range(2):
        t0 = now(rt.device)
        opt.zero_grad(set_to_none=True)
        value, _ = loss_fn(LossBatch(model, model(x), y, logits_chunk_tokens=chunk))
        value.backward()
        opt.step()
        times.append(now(rt.device) - t0)
        values.append(value.item())
    if not all(torch.isfinite(torch.tensor(values))):
        raise SystemExit(f"error: a non-finite loss {values}")
    return {
        "exits": layers,
        "loss": loss,
        "logits": f"chunks of {chunk}" if chunk else "whole",
        "vocab": vocab,
        "tokens": seq_len,
        "whole_logits_mib": (layers if loss != "final" else 1) * seq_len * vocab * 4 / 2**20,
        "peak_above_model_mib": peak_memory_mib(rt.device) - before,
        "step_seconds": statistics.median(times),
        "first_loss": values[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/bench")
    ap.add_argument("--vocab", type=int, default=128_000)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--exits", default="2,8,16", help="model depths (an exit after every layer)")
    ap.add_argument("--chunk", type=int, default=256, help="train.logits_chunk_tokens")
    ap.add_argument("--whole-limit-gib", type=float, default=3.0, help="run the whole loss below")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one configuration, as JSON
    a = ap.parse_args()
    quiet()
    rt = resolve_runtime(a.device, a.dtype)
    if a.one:
        layers, loss, chunk = json.loads(a.one)
        print(json.dumps(measure(layers, loss, chunk, a.vocab, a.seq_len, rt)))
        return
    rows = []
    for layers in (int(e) for e in a.exits.split(",")):
        whole_gib = layers * a.seq_len * a.vocab * 4 / 2**30
        runs = [("final", 0), ("weighted-ce", a.chunk)]
        if whole_gib <= a.whole_limit_gib:
            runs.insert(1, ("weighted-ce", 0))
        for loss, chunk in runs:
            args = ["--vocab", str(a.vocab), "--seq-len", str(a.seq_len)]
            args += ["--device", a.device, "--dtype", a.dtype]
            row = in_fresh_process(__file__, args, [layers, loss, chunk])
            rows.append({**row, "device": rt.describe()["device_name"], "dtype": rt.dtype_name})
            print(rows[-1], file=sys.stderr)
        final = next(r for r in rows if r["exits"] == layers and r["loss"] == "final")
        for r in rows:
            if r["exits"] == layers:
                r["peak_over_final_only"] = (
                    r["peak_above_model_mib"] / final["peak_above_model_mib"]
                )
                r["time_over_final_only"] = r["step_seconds"] / final["step_seconds"]
        whole = [r for r in rows if r["exits"] == layers and r["logits"] == "whole"]
        if len(whole) == 2:  # the chunked loss against the whole one, where both ran
            w, c = whole[1], rows[-1]
            c["time_over_whole"] = c["step_seconds"] / w["step_seconds"]
            c["loss_rel_diff"] = abs(c["first_loss"] - w["first_loss"]) / abs(w["first_loss"])
    notes = (
        "One training step (forward, backward, AdamW) on one sequence, every exit trained with "
        "weighted CE, against the final-only loss of the same model; median of 2 steps. "
        "peak_above_model_mib: the process's peak memory (RSS on the CPU, allocated memory on a "
        "GPU) above what it held once the model, its optimizer state and the token ids existed. "
        "whole_logits_mib: the float32 logits of every trained exit if held at once (the whole "
        f"loss runs only below {a.whole_limit_gib} GiB of them on this machine). "
        "loss_rel_diff: the chunked loss against the whole one on the same step.\n\n"
    )
    cols = list(rows[0]) + ["peak_over_final_only", "time_over_final_only", "time_over_whole"]
    cols = list(dict.fromkeys(cols + ["loss_rel_diff"]))
    write_results(
        a.out,
        "loss_memory",
        f"Training-step peak memory, whole vs chunked exit logits ({a.vocab} vocabulary)",
        rows,
        provenance({**vars(a), "runtime": rt.describe()}),
        cols,
        notes=notes,
    )


if __name__ == "__main__":
    main()
