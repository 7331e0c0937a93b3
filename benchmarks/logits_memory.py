"""Peak memory of the exit table against the logits chunk, for a real vocabulary (`make bench`).

A 2-layer model (d = 64) with a 128k vocabulary, windows of 2048 tokens, batch 1 and batch 8.
Every exit's logits are [tokens, V]: for batch 8 x 2048 tokens that is 8.4 GB in float32 per
exit if held at once. `collect_exit_table` holds at most one chunk of tokens' logits (and their
float32 softmax), so its peak should follow the chunk, not the batch. Each configuration runs in
a fresh process (peak RSS is per process; on a GPU, `torch.cuda.max_memory_allocated`), and the
peak is reported above the process's memory once the model and the inputs exist.

    python benchmarks/logits_memory.py --out results/bench
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from eexit import quiet
from eexit.evaluation.timing import in_fresh_process, peak_memory_mib
from eexit.reporting import provenance, write_results
from eexit.runtime import Runtime, logits_chunk_tokens, now, resolve_runtime


def measure(vocab: int, batch: int, seq_len: int, chunk: int | None, rt: Runtime) -> dict:
    """One configuration, in this process: build, then the exit table (max-prob scores)."""
    from eexit.config import ModelConfig
    from eexit.evaluation.records import collect_exit_table
    from eexit.models.early_exit import EarlyExitModel
    from eexit.models.loading import build_lm
    from eexit.policies import make_policy

    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", n_layers=2, d_model=64, n_heads=2, d_ff=128, max_len=seq_len)
    model = EarlyExitModel(build_lm(cfg, vocab, 0, 0), "all").to(rt.device, rt.dtype).eval()
    x = torch.randint(vocab, (batch, seq_len))
    y = torch.randint(vocab, (batch, seq_len))
    policy = make_policy("max-prob", 0.9)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    before = peak_memory_mib(rt.device)
    used = chunk or logits_chunk_tokens(vocab, rt.device)
    t0 = now(rt.device)
    table = collect_exit_table(model, x, y, policy, batch, chunk_tokens=used)
    seconds = now(rt.device) - t0
    assert torch.isfinite(table.nll).all()
    return {
        "vocab": vocab,
        "batch": batch,
        "seq_len": seq_len,
        "tokens": batch * seq_len,
        "chunk_tokens": used,
        "chunk": "auto" if chunk is None else "set",
        "full_logits_mib": batch * seq_len * vocab * 4 / 2**20,
        "chunk_logits_mib": used * vocab * 4 / 2**20,
        "peak_above_model_mib": peak_memory_mib(rt.device) - before,
        "seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/bench")
    ap.add_argument("--vocab", type=int, default=128_000)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--chunks", default="512,2048,auto", help="tokens per chunk, or auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one configuration, as JSON
    a = ap.parse_args()
    quiet()
    rt = resolve_runtime(a.device, a.dtype)
    if a.one:
        batch, chunk = json.loads(a.one)
        print(json.dumps(measure(a.vocab, batch, a.seq_len, chunk, rt)))
        return
    rows = []
    for chunk in a.chunks.split(","):
        for batch in (int(b) for b in a.batches.split(",")):
            args = ["--vocab", str(a.vocab), "--seq-len", str(a.seq_len)]
            args += ["--device", a.device, "--dtype", a.dtype]
            row = in_fresh_process(__file__, args, [batch, None if chunk == "auto" else int(chunk)])
            rows.append({**row, "device": rt.describe()["device_name"], "dtype": rt.dtype_name})
            print(rows[-1], file=sys.stderr)
    notes = (
        "peak_above_model_mib: the process's peak memory (RSS on the CPU, allocated memory on a "
        "GPU) above what it held once the model and the token ids existed. full_logits_mib: what "
        "one exit's float32 logits for the whole batch would take if held at once.\n\n"
    )
    write_results(
        a.out,
        "logits_memory",
        f"Exit-table peak memory vs logits chunk: 2-layer model, {a.vocab} vocabulary",
        rows,
        provenance({**vars(a), "runtime": rt.describe()}),
        notes=notes,
    )


if __name__ == "__main__":
    main()
