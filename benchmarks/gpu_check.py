"""The GPU check (`scripts/gpu_check.sh`, `make gpu-check`): eexit's identity tests, then the
decoding benchmark side by side, on one device, with nothing fetched from a hub.

Why: the test suite proves on the CPU in float32 that never-exit decoding is transformers'
greedy `generate`, that self-speculative greedy output is full-depth greedy output and that the
exit table's full-depth perplexity is plain transformers'. A GPU runs other kernels (fused SDPA,
bfloat16 GEMMs), and a device or dtype slip there (a tensor left on the CPU, a mask or a cache in
the wrong dtype) shows as a wrong token, not as an error. So the identities are checked where
the speed is measured, in float32 and bfloat16, and only then is the decoding table written, at
batch 1 and 8: transformers greedy, eexit full depth, eexit early exit at an LTT-calibrated
threshold, eexit self-speculative, transformers `assistant_early_exit` (Llama models, batch 1).

Identity in reduced precision: in float32 the tokens must be equal. In bfloat16 two correct
computations of the same logits (one position per pass, or all drafted positions in one pass)
round differently, so greedy outputs may part where the two best logits are nearly tied (on the
CPU, SmolLM2's self-speculative output parted from transformers' in one of three prompts, at a
gap of half a unit in the last place). A row that differs is judged at its first differing token
by transformers' own logits there: the gap between transformers' token and ours must be within
`TIE_ULPS` x the dtype's epsilon x the largest logit (`equal up to ties`); a bug gives gaps far
larger, and in float32 the bound is about 1e-5. The table gives every gap.

Exit status: 0 when every identity holds, 1 when one fails (the benchmark is then not run),
2 on bad input. Prompts and text: the packaged wiki-gensim set (test split; LTT calibration on
its validation split).

    python benchmarks/gpu_check.py --device cuda --model SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark helpers

from adapted_decoding import calibrated_policy, early_exit_name, windows  # noqa: E402
from adapted_decoding import run as decoding_rows  # noqa: E402

from eexit import quiet  # noqa: E402
from eexit.calibration.calibrate import token_risks  # noqa: E402
from eexit.calibration.ltt import fixed_sequence_test  # noqa: E402
from eexit.errors import EexitError  # noqa: E402
from eexit.evaluation.generation import prompts_from  # noqa: E402
from eexit.evaluation.records import collect_exit_table  # noqa: E402
from eexit.evaluation.timing import transformers_greedy as hf_greedy  # noqa: E402
from eexit.files import check_output_path, output_folder, run_script  # noqa: E402
from eexit.models.decoding import EarlyExitDecoder  # noqa: E402
from eexit.models.loading import load_model  # noqa: E402
from eexit.models.speculative import SelfSpeculativeDecoder  # noqa: E402
from eexit.policies import make_policy  # noqa: E402
from eexit.reporting import provenance, write_results  # noqa: E402
from eexit.runtime import device_name, resolve_runtime  # noqa: E402

DATASET = "wiki-gensim"
TIE_ULPS = 4  # a differing greedy token is a rounding tie within 4 ulps of the largest logit
# |log PPL difference| allowed: summation order and chunked logits move float32 by ~1e-5 (SmolLM2 on
# the CPU: 8e-6); a wrong model or position moves it by 1e-1
PPL_TOL = {"float32": 1e-4, "bfloat16": 2e-3, "float16": 1e-3}
LTT = {"policy": "max-prob", "epsilon": 0.05, "delta": 0.1, "risk": "consistency"}
INJECTED = " Injected mismatch (`--inject-mismatch`): the eexit side ran a corrupted model."
FIXED_THRESHOLD = 0.9  # the early-exit row's threshold when LTT certifies none (said in its name)


class Sizes:
    """How much the check decodes and reads: the full check, or `--tiny` (the CPU dry run)."""

    def __init__(self, tiny: bool):
        self.prompts, self.prompt_len, self.new = (2, 8, 8) if tiny else (8, 32, 32)
        self.reps = 1 if tiny else 2
        self.batches = (1, 2) if tiny else (1, 8)
        self.ppl_windows, self.ppl_len = (4, 32) if tiny else (16, 128)
        self.ltt_tokens, self.ltt_len = (512, 32) if tiny else (4096, 256)
        self.batch_size = 4


def max_positions(model) -> int:
    cfg = model.lm.config
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", 2048)


@contextlib.contextmanager
def corrupted(model, enabled: bool):
    """`--inject-mismatch`: the eexit side runs a wrong model (LM-head rows rolled by one), so
    every check must fail; restored after."""
    if not enabled:
        yield
        return
    w = model.parts.lm_head.weight
    saved = w.detach().clone()
    with torch.no_grad():
        w.copy_(saved.roll(1, 0))
    try:
        yield
    finally:
        with torch.no_grad():
            w.copy_(saved)


def reference(model, x: torch.Tensor, new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' greedy tokens [B, new] and the logits it chose them from [B, new, V]."""
    out = hf_greedy(model, x, new, return_dict_in_generate=True, output_logits=True)
    logits = torch.stack(out.logits, 1).float().cpu()
    return out.sequences[:, -new:].cpu(), logits


def compare(ref: torch.Tensor, logits: torch.Tensor, ours: torch.Tensor, dtype) -> dict:
    """Token identity of `ours` with transformers' `ref`, each differing row judged at its first
    differing token (see the module docstring)."""
    ours = ours.cpu()
    eps = torch.finfo(dtype).eps
    parted, gaps, tol_max = 0, [], 0.0
    for r in range(ref.shape[0]):
        diff = (ours[r] != ref[r]).nonzero()
        if len(diff) == 0:
            continue
        parted += 1
        i = int(diff[0])
        lg = logits[r, i]
        gaps.append(float(lg[ref[r, i]] - lg[ours[r, i]]))
        tol_max = max(tol_max, TIE_ULPS * eps * float(lg.abs().max()))
    ties = parted and all(g <= tol_max for g in gaps)
    return {
        "tokens": ref.numel(),
        "equal_tokens_pct": 100 * (ours == ref).float().mean().item(),
        "rows_equal": f"{ref.shape[0] - parted}/{ref.shape[0]}",
        "max_gap": max(gaps) if gaps else None,
        "tolerance": tol_max if gaps else None,
        "verdict": "identical" if not parted else ("equal up to ties" if ties else "FAIL"),
    }


def decode_checks(model, x, new: int, draft: tuple[int, int], inject: bool) -> list[dict]:
    """Never-exit early-exit decoding and self-speculative decoding against transformers' greedy
    `generate`, one prompt at a time and all prompts as one batch."""
    dtype = model.parts.lm_head.weight.dtype
    never = make_policy("max-prob", 1.0)  # max-prob is never > 1: the exits are never taken
    decoders = {
        "never-exit decoding = transformers generate": EarlyExitDecoder(model, never, "propagate"),
        f"self-speculative (draft layer {draft[0]}, {draft[1]} drafts) = transformers generate": (
            SelfSpeculativeDecoder(model, *draft)
        ),
    }
    rows = []
    for batch in (1, len(x)):
        chunks = [x[i : i + batch] for i in range(0, len(x), batch)]
        refs = [reference(model, c, new) for c in chunks]
        ref = torch.cat([r[0] for r in refs])
        logits = torch.cat([r[1] for r in refs])
        for name, dec in decoders.items():
            with corrupted(model, inject):
                ours = torch.cat(
                    [dec.generate(c, None, new, pad_token_id=0).new_tokens for c in chunks]
                )
            rows.append({"check": name, "batch": batch, **compare(ref, logits, ours, dtype)})
    return rows


@torch.no_grad()
def ppl_check(model, x: torch.Tensor, y: torch.Tensor, batch_size: int, inject: bool) -> dict:
    """The exit table's full-depth perplexity against plain transformers' on the same windows."""
    name = str(model.parts.lm_head.weight.dtype).removeprefix("torch.")
    total = 0.0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(model.device), y[i : i + batch_size].to(model.device)
        logits = model.lm(input_ids=xb).logits.float()
        total += float(F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="sum"))
    plain = math.exp(total / y.numel())
    with corrupted(model, inject):
        table = collect_exit_table(model, x, y, make_policy("max-prob", 1.0), batch_size)
    ours = math.exp(table.nll[-1].double().mean().item())
    diff = abs(math.log(ours) - math.log(plain))
    tol = PPL_TOL.get(name, 1e-2)
    return {
        "check": "exit-table PPL = plain transformers",
        "batch": batch_size,
        "tokens": y.numel(),
        "eexit_ppl": ours,
        "transformers_ppl": plain,
        "log_ppl_diff": diff,
        "tolerance": tol,
        "verdict": "equal" if diff <= tol else "FAIL",
    }


def identity(model, tok, sizes: Sizes, draft, inject: bool) -> list[dict]:
    L = model.num_layers
    model.exit_layers = list(range(1, L + 1))
    x = prompts_from(tok, DATASET, "test", sizes.prompts, sizes.prompt_len).to(model.device)
    rows = decode_checks(model, x, sizes.new, draft, inject)
    wx, wy = windows(tok, "test", min(sizes.ppl_len, max_positions(model)), sizes.ppl_windows)
    rows.append(ppl_check(model, wx, wy, sizes.batch_size, inject))
    return rows


def ltt_threshold(model, tok, sizes: Sizes) -> dict:
    """An early-exit setting for the benchmark: max-prob from layer 2L/3 (each max-prob decision
    costs an LM head, about 8 blocks on SmolLM2) at the lowest threshold Learn-then-Test certifies
    (risk of a top-1 change <= epsilon with probability >= 1 - delta) on validation windows; a
    stated fixed threshold when none is certified. On a model without trained exits the certified
    threshold may be 1.0 (never exit): the row then measures the decisions' overhead."""
    L = model.num_layers
    min_exit = max(1, 2 * L // 3)
    seq_len = min(sizes.ltt_len, max_positions(model))
    x, y = windows(tok, "validation", seq_len, max(1, sizes.ltt_tokens // seq_len))
    policy = make_policy(LTT["policy"], 0.5, min_exit)
    table = collect_exit_table(model, x, y, policy, sizes.batch_size)
    grid = [round(1 - i / 100, 2) for i in range(101)]
    risks = token_risks(table, policy, grid, LTT["risk"]).numpy()
    result = fixed_sequence_test(grid, risks, LTT["epsilon"], LTT["delta"], "binomial")
    certified = result.threshold is not None
    how = (
        f"LTT, eps {LTT['epsilon']}, delta {LTT['delta']}, {table.tokens} validation tokens"
        if certified
        else f"fixed: LTT certified no threshold on {table.tokens} tokens"
    )
    return {
        "policy": LTT["policy"],
        "threshold": result.threshold if certified else FIXED_THRESHOLD,
        "min_exit_layer": min_exit,
        "policy_params": {},
        "source": how,
        "ltt_certified": certified,
    }


def benchmark(model, tok, sizes: Sizes, draft, calibrated: dict) -> list[dict]:
    x = prompts_from(tok, DATASET, "test", sizes.prompts, sizes.prompt_len)
    policies = {early_exit_name(calibrated): calibrated_policy(model, None, calibrated)}
    rows = []
    for batch in sizes.batches:
        rows += decoding_rows(
            model, tok, x, sizes.new, sizes.reps, batch, policies, [(*draft, None)]
        )
    if not type(model.lm).__name__.startswith("Llama"):
        rows.append(
            {
                "batch": 1,
                "decoder": "transformers assistant_early_exit",
                "note": f"not run: transformers supports it for Llama models, not "
                f"{type(model.lm).__name__}",
            }
        )
    return rows


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint folder or .gguf file")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, cpu, mps, auto")
    ap.add_argument(
        "--identity-dtypes", default="float32,bfloat16", help="dtypes the identities are checked in"
    )
    ap.add_argument(
        "--dtype", default="auto", help="dtype of the benchmark (auto: bfloat16 on a GPU)"
    )
    ap.add_argument("--draft", default="", help="self-spec draft layer:length (default L/2:4)")
    ap.add_argument("--out", default="results/gpu")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ap.add_argument("--tiny", action="store_true", help="few prompts and tokens (a dry run)")
    ap.add_argument(
        "--inject-mismatch",
        action="store_true",
        help="test the check itself: the eexit side runs a corrupted model, every identity fails",
    )
    ap.add_argument("--identity-only", action="store_true", help="skip the benchmark")
    ap.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    quiet()
    torch.set_grad_enabled(False)
    if a.threads:
        torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    sizes = Sizes(a.tiny)
    dtypes = [d.strip() for d in a.identity_dtypes.split(",") if d.strip()]
    bench_rt = resolve_runtime(a.device, a.dtype)  # validates --device / --dtype before loading
    runtimes = [resolve_runtime(a.device, d) for d in dtypes]
    check_output_path(Path(a.out), a.overwrite)  # an existing or unwritable --out: before work
    # the folder is written as a unit, like every eexit command's: staged under a lock, swapped
    # in whole (a run that fails keeps what was there)
    with output_folder(a.out, a.overwrite) as folder:
        return run_check(a, sizes, dtypes, bench_rt, runtimes, folder, t_start)


def run_check(a, sizes, dtypes, bench_rt, runtimes, out, t_start) -> int:
    """The identity checks, then (unless --identity-only) the benchmark, tables into `out`."""
    kept, rows = None, []
    for rt in runtimes:
        print(f"identity checks: {rt.dtype_name} on {device_name(rt.device)} ...", flush=True)
        model, tok, _ = load_model(a.model, runtime=rt)
        draft = parse_draft(a.draft, model.num_layers)
        for r in identity(model, tok, sizes, draft, a.inject_mismatch):
            rows.append({**r, "device": str(rt.device), "dtype": rt.dtype_name})
            print("IDENTITY " + json.dumps(rows[-1]), flush=True)
        if rt.dtype == bench_rt.dtype:
            kept = (model, tok, draft)
        del model
    failed = [r for r in rows if r["verdict"] == "FAIL"]
    config = {
        "model": a.model,
        "tiny": a.tiny,
        "prompts": sizes.prompts,
        "prompt_len": sizes.prompt_len,
        "new_tokens": sizes.new,
        "inject_mismatch": a.inject_mismatch,
        "tie_ulps": TIE_ULPS,
        **bench_rt.describe(),
    }
    cols = ["check", "device", "dtype", "batch", "tokens", "equal_tokens_pct", "rows_equal"]
    cols += ["max_gap", "tolerance", "eexit_ppl", "transformers_ppl", "log_ppl_diff", "verdict"]
    write_results(
        out,
        "identity",
        f"Identity checks on {device_name(bench_rt.device)} ({', '.join(dtypes)})",
        rows,
        provenance({**config, "dtype": ",".join(dtypes)}),
        cols,
        notes=(
            f"{sizes.prompts} prompts of {sizes.prompt_len} tokens ({DATASET} test split), "
            f"{sizes.new} greedy tokens each (EOS ignored), one at a time and as one batch; "
            "reference: transformers' `generate` on the same weights. A row that differs is "
            "judged at its first differing token: max_gap = transformers' logit of its token "
            f"minus its logit of ours, tolerance = {TIE_ULPS} ulps of the largest logit there "
            "(`equal up to ties`); PPL: |log PPL difference| against plain transformers' loss on "
            f"the same windows.{INJECTED if a.inject_mismatch else ''}\n\n"
        ),
    )
    if failed:
        names = "; ".join(f"{r['check']} ({r['dtype']}, batch {r['batch']})" for r in failed)
        print(f"gpu check: {len(failed)} identity check(s) FAILED: {names}", file=sys.stderr)
        return 1
    print(f"identity checks passed ({len(rows)})", flush=True)
    if a.identity_only:
        return 0
    if kept is None:
        kept_model, tok, _ = load_model(a.model, runtime=bench_rt)
        kept = (kept_model, tok, parse_draft(a.draft, kept_model.num_layers))
    model, tok, draft = kept
    print(f"calibrating the early-exit threshold ({LTT['policy']}, LTT) ...", flush=True)
    calibrated = ltt_threshold(model, tok, sizes)
    print(f"decoding benchmark: {bench_rt.dtype_name}, batches {sizes.batches} ...", flush=True)
    bench = benchmark(model, tok, sizes, draft, calibrated)
    for r in bench:
        print(r, flush=True)
    notes = (
        f"{sizes.prompts} prompts of {sizes.prompt_len} tokens ({DATASET} test split), "
        f"{sizes.new} new tokens each (EOS ignored); every decoder warmed up by one untimed run, "
        f"then the median of {sizes.reps} runs (clock: `eexit.runtime.now`, CUDA-synchronised on a "
        "GPU). speedup = "
        "transformers greedy time / this decoder's at the same batch size; agreement = tokens "
        f"equal to transformers' greedy output. Early exit: {calibrated['policy']} from layer "
        f"{calibrated['min_exit_layer']} of {model.num_layers} at threshold "
        f"{calibrated['threshold']} ({calibrated['source']}). transformers' assisted decoding "
        "(`assistant_early_exit`) runs at batch 1 only.\n\n"
    )
    cols = ["batch", "decoder", "device", "dtype", "tokens_per_s", "speedup", "agreement_pct"]
    cols += ["mean_exit_layer", "acceptance_rate", "tokens_per_cycle", "note"]
    write_results(
        out,
        "decoding",
        f"Decoding {Path(a.model).name} side by side on {device_name(bench_rt.device)} "
        f"({bench_rt.dtype_name})",
        bench,
        provenance({**config, "calibrated": calibrated, "draft": list(draft)}),
        cols,
        notes=notes,
    )
    print(f"gpu check done in {time.perf_counter() - t_start:.0f} s -> {a.out}", flush=True)
    return 0


def parse_draft(spec: str, L: int) -> tuple[int, int]:
    """--draft layer:length; default: half the depth, 4 drafts."""
    if not spec:
        return max(1, L // 2), 4
    try:
        k, length = (int(v) for v in spec.split(":"))
    except ValueError:
        raise EexitError(f"--draft {spec!r}: expected layer:length, e.g. 8:4") from None
    if not 1 <= k < L or length < 1:
        raise EexitError(f"--draft {spec}: the draft layer must be in 1..{L - 1}, length >= 1")
    return k, length


if __name__ == "__main__":
    run_script(main)
