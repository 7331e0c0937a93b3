"""Wall-clock comparisons of decoders that hold up: transformers' greedy `generate` as the
reference, interleaved rounds (a slow spell of the machine hits every decoder alike), and the
95 % interval of the paired per-round speedups. `evaluate --generate` and the decoding benchmarks
time decoders through these, so their speedups mean the same thing."""

from __future__ import annotations

import copy
import statistics

import torch

from eexit.runtime import now

# two-sided 95 % Student-t quantiles by degrees of freedom (beyond 9: about normal)
T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def transformers_greedy(model, x: torch.Tensor, new: int, **kw) -> torch.Tensor:
    """transformers' greedy `generate` for exactly `new` tokens (no EOS: neither stop nor
    suppression), on the eexit model's own transformers model; returns the whole sequences."""
    gc = copy.deepcopy(model.lm.generation_config)
    gc.eos_token_id, gc.pad_token_id, gc.do_sample = None, 0, False
    saved = model.lm.config.eos_token_id, model.lm.generation_config.eos_token_id
    # generate falls back to the model's own EOS settings when the passed config leaves it unset
    model.lm.config.eos_token_id = model.lm.generation_config.eos_token_id = None
    try:
        return model.lm.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=new,
            generation_config=gc,
            **kw,
        )
    finally:
        model.lm.config.eos_token_id, model.lm.generation_config.eos_token_id = saved


def interleaved(fns: dict, reps: int, device, after_warmup=None) -> tuple[dict, dict]:
    """Seconds of `reps` rounds, each running every callable once (the order rotated per round),
    after one untimed warm-up each. Returns (name -> list of seconds, name -> last output)."""
    names = list(fns)
    outs = {n: fns[n]() for n in names}  # warm-up
    if after_warmup is not None:
        after_warmup()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t0 = now(device)
            outs[n] = fns[n]()
            times[n].append(now(device) - t0)
    return times, outs


def speedup_interval(ref: list[float], times: list[float]) -> tuple:
    """95 % confidence interval of the mean paired speedup ref_i / t_i over the rounds (None,
    None from a single round)."""
    ratios = [a / b for a, b in zip(ref, times)]
    if len(ratios) < 2:
        return None, None
    mean, sd = statistics.fmean(ratios), statistics.stdev(ratios)
    half = T975.get(len(ratios) - 1, 1.96) * sd / len(ratios) ** 0.5
    return mean - half, mean + half


def peak_memory_mib(device: torch.device) -> float:
    """The process's peak memory so far: allocated memory on a GPU, peak RSS on the CPU."""
    import resource

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def in_fresh_process(script: str, args: list[str], one: list) -> dict:
    """Run `script` with `args` and `--one <json of one>` in a new Python process (peak memory
    is per process) and return the JSON dict it prints last."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, script, *args, "--one", json.dumps(one)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])
