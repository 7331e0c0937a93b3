"""Early exit inside lm-evaluation-harness: an lm-eval model ("eexit") whose loglikelihoods
and generations run with early exit, reporting compute % and exit shares beside the harness's
metrics.

    eexit lm-eval --model CKPT --tasks hellaswag --policy margin --threshold 0.9
    python -m eexit.integrations.lm_eval_harness --model eexit --batch_size 8 \\
        --model_args pretrained=CKPT,policy=margin,threshold=0.9 --tasks hellaswag

Why it is built this way:

- One set of validators. The settings (policy, threshold, min exit layer, KV mode, batch size,
  device, dtype) go through the checks `eexit evaluate` uses (`make_policy`, `check_kv_mode`,
  `check_sizes`, `resolve_runtime`) before the model loads, and the depth-dependent ones through
  `open_context` right after. A model_args key the model does not take is refused by name.
- Loglikelihood: each (context, continuation) pair runs teacher-forced; every continuation token
  takes the exit chosen by the policy's exit rule (`exit_indices`, the same rule as `eexit
  evaluate`) and contributes that exit's log-probability; `is_greedy` compares that exit's top-1.
  Requests are sorted longest first (as lm-eval's `hf` model does), grouped `batch_size` at a
  time and RIGHT-padded: the model is causal and positions start at 0, so a real token's logits
  do not depend on the pads after it and a batch gives the numbers of one request at a time (up
  to float rounding). One exit table per batch; results come back in the request order. With
  threshold 1.0 (never exit) the numbers are the plain model's. Rolling loglikelihoods batch the
  windows of all requests the same way.
- Generation uses eexit's early-exit decoder (`kv`: propagate, recompute or full), `batch_size`
  prompts at a time, left-padded (what the decoder's positions follow), grouped by identical
  generation settings; a row stops at the end-of-text token or as soon as its decoded text holds
  one of the `until` strings (the decoder's `stop` hook), and the text is cut there.
- Tokenisation follows lm-eval's Hugging Face model (trailing spaces of the context move to the
  continuation).
- Data parallel as lm-eval's `hf` model: under `accelerate launch` (`resolve_runtime` opens the
  process group) the model reports `rank`, `world_size` and `accelerator`, and lm-eval gives each
  process its share of the documents. lm-eval pads a short share with copies of its last request
  so every process runs as many; those copies are not counted in the exit statistics, which are
  summed over the processes (`early_exit_stats`, called on every process).
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - checked by the CLI with a one-line error
    raise ImportError("lm-eval is not installed: pip install 'eexit[lmeval]'") from e

from eexit.errors import EexitError
from eexit.evaluation import records
from eexit.evaluation.context import EvalRequest, check_sizes, max_positions, open_context
from eexit.evaluation.records import collect_exit_table, exit_indices
from eexit.integrations.lm_eval_tasks import Tasks, prepare_tasks
from eexit.models.decoding import EarlyExitDecoder, check_kv_mode
from eexit.models.loading import load_model
from eexit.policies import make_policy
from eexit.registry import unknown_name_error
from eexit.reporting import track
from eexit.runtime import Runtime, resolve_runtime

# what `--model_args` may set; lm-eval itself also passes batch_size, max_batch_size and device
MODEL_ARGS = (
    "pretrained",
    "policy",
    "threshold",
    "min_exit_layer",
    "kv",
    "max_length",
    "batch_size",
    "device",
    "dtype",
)


@dataclass(frozen=True)
class Settings:
    """The model's settings, checked (everything that can be checked before the model loads)."""

    policy: str
    threshold: float
    min_exit_layer: int
    kv: str
    max_length: int | None
    batch_size: int
    runtime: Runtime


def _number(name: str, value, kind: type):
    """A model_args value as an int or a float (lm-eval passes numbers, or strings)."""
    what = "an integer" if kind is int else "a number"
    try:
        if isinstance(value, bool) or value is None:
            raise ValueError(value)
        return kind(value) if kind is float or isinstance(value, int) else int(str(value))
    except (TypeError, ValueError):
        raise EexitError(f"{name} must be {what}, got {value!r}") from None


def _batch_size(value) -> int:
    if isinstance(value, str) and value.strip().lower().startswith("auto"):
        raise EexitError(
            f"batch_size {value!r}: the eexit model has no memory probe to size batches; "
            "give a number, e.g. batch_size=8"
        )
    size = _number("batch_size", value, int)
    check_sizes(size, None)
    return size


def check_settings(
    policy: str = "max-prob",
    threshold: float = 1.0,
    min_exit_layer: int = 1,
    kv: str = "propagate",
    max_length: int | None = None,
    batch_size: int | str = 1,
    device: str | None = "auto",
    dtype: str | None = "auto",
) -> Settings:
    """Settings checked with `eexit evaluate`'s validators (one line each, EexitError): policy
    name, threshold in [0, 1] and min exit layer >= 1 (`make_policy`), KV mode, batch size, and
    the device and dtype (`resolve_runtime`: an unavailable device is refused here)."""
    threshold = _number("threshold", threshold, float)
    min_exit_layer = _number("min_exit_layer", min_exit_layer, int)
    make_policy(str(policy), threshold, min_exit_layer)
    check_kv_mode(str(kv))
    size = _batch_size(batch_size)
    if max_length is not None:
        max_length = _number("max_length", max_length, int)
        if max_length < 2:
            raise EexitError(f"max_length must be >= 2 (a context and a token), got {max_length}")
    runtime = resolve_runtime(str(device or "auto"), str(dtype or "auto"))
    return Settings(str(policy), threshold, min_exit_layer, str(kv), max_length, size, runtime)


_KEEP: dict | None = None  # set by `main`: the model lm-eval's CLI creates, for its statistics


@register_model("eexit")
class EexitLM(LM):
    """lm-eval's "eexit" model: `--model_args` keys are the parameters below (plus what lm-eval
    itself passes: batch_size, max_batch_size, device); any other key is refused by name."""

    def __init__(
        self,
        pretrained: str | None = None,
        policy: str = "max-prob",
        threshold: float = 1.0,
        min_exit_layer: int = 1,
        kv: str = "propagate",
        max_length: int | None = None,
        batch_size: int | str = 1,
        device: str | None = "auto",
        dtype: str | None = "auto",
        max_batch_size: int | None = None,  # lm-eval's, for batch_size=auto (refused)
        **unknown,
    ):
        super().__init__()
        if unknown:
            raise unknown_name_error("model_args key", sorted(unknown)[0], list(MODEL_ARGS))
        if not pretrained:
            raise EexitError("the eexit model needs model_args pretrained=CHECKPOINT")
        s = check_settings(
            policy, threshold, min_exit_layer, kv, max_length, batch_size, device, dtype
        )
        self.runtime, self.kv, self.batch_size = s.runtime, s.kv, s.batch_size
        model, tokenizer, _ = load_model(str(pretrained), runtime=s.runtime)
        request = EvalRequest(
            model=str(pretrained),
            policy=s.policy,
            thresholds=[s.threshold],
            min_exit_layer=s.min_exit_layer,
            batch_size=s.batch_size,
        )
        # after the load, before any request: the min exit layer against the depth, the binding
        ctx = open_context(request, model=model, tokenizer=tokenizer)
        self.model, self.tokenizer, self.policy = ctx.model, ctx.tokenizer, ctx.policy
        if self.model.is_seq2seq:
            raise EexitError(
                f"{pretrained} is an encoder-decoder model; the eexit lm-eval model scores "
                "decoder-only models"
            )
        limit = max_positions(self.model)
        if s.max_length is not None and limit and s.max_length > limit:
            raise EexitError(f"max_length {s.max_length} is beyond the model's {limit} positions")
        self.max_length = s.max_length or limit or 2048
        self.settings = s
        self.eot = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.exits = {"loglikelihood": Counter(), "generation": Counter()}
        if _KEEP is not None:
            _KEEP["lm"] = self

    # ------------------------------------------------------------------ processes (as `hf`)
    @property
    def rank(self) -> int:
        return self.runtime.rank

    @property
    def world_size(self) -> int:
        return self.runtime.world

    @property
    def accelerator(self):
        return self.runtime.accelerator

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def all_gather(self, tensor):
        return tensor if self.world_size <= 1 else self.accelerator.gather(tensor)

    def gather_object(self, obj, dst=0):
        if self.world_size <= 1:
            return [obj]
        result = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj=obj, object_gather_list=result, dst=dst)
        return result

    def barrier(self) -> None:
        self.runtime.barrier()

    def get_model_info(self) -> dict:
        s = self.settings
        return {
            "eexit_policy": s.policy,
            "eexit_threshold": s.threshold,
            "eexit_min_exit_layer": s.min_exit_layer,
            "eexit_kv": s.kv,
            "eexit_runtime": self.runtime.describe(),
        }

    # ------------------------------------------------------------------ statistics
    def early_exit_stats(self) -> dict:
        """Compute % (mean exit layer / depth) and exit shares, per kind of request, summed over
        the processes (a collective call: every process makes it)."""
        L, out = self.model.num_layers, {}
        for kind, local in self.exits.items():
            counts = sum(self.runtime.gather([local]), Counter())
            n = sum(counts.values())
            if not n:
                continue
            out[f"{kind}_tokens"] = n
            out[f"{kind}_compute_pct"] = 100 * sum(k * v for k, v in counts.items()) / (n * L)
            for layer in self.model.exit_layers:
                out[f"{kind}_exit@{layer}_pct"] = 100 * counts.get(layer, 0) / n
        return out

    @staticmethod
    def _counted(requests) -> list[bool]:
        """Which requests count in the statistics: lm-eval pads a process's list with copies of
        its last request (the same object beyond its `repeats`); those do not."""
        seen: Counter = Counter()
        out = []
        for r in requests:
            seen[id(r)] += 1
            out.append(seen[id(r)] <= (getattr(r, "repeats", None) or 1))
        return out

    # ------------------------------------------------------------------ scoring
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        return (ctx or [self.eot]), whole[len(ctx) :]

    @torch.no_grad()
    def _score_batch(self, pairs, counted) -> list[tuple[float, bool]]:
        """(loglikelihood, is_greedy) of each (context, continuation) pair: one right-padded
        batch, one exit table, each row's continuation slice."""
        rows = [(ctx + cont)[-(self.max_length + 1) :] for ctx, cont in pairs]
        width = max(1, max(len(ids) - 1 for ids in rows))
        x = torch.full((len(rows), width), self.pad, dtype=torch.long)
        y = x.clone()
        for b, ids in enumerate(rows):
            x[b, : len(ids) - 1] = torch.tensor(ids[:-1])
            y[b, : len(ids) - 1] = torch.tensor(ids[1:])
        table = collect_exit_table(self.model, x, y, self.policy, batch_size=len(rows))
        idx = exit_indices(table, self.policy)
        cols = torch.arange(table.tokens)
        nll = table.nll[idx, cols].view(len(rows), width)
        top1 = table.top1[idx, cols].view(len(rows), width)
        layers = torch.tensor(table.exit_layers)[idx].view(len(rows), width)
        out = []
        for b, ((_, cont), ids, count) in enumerate(zip(pairs, rows, counted)):
            end = len(ids) - 1
            n = min(len(cont), end)
            span = slice(end - n, end)
            if count:
                self.exits["loglikelihood"].update(layers[b, span].tolist())
            greedy = bool((top1[b, span] == torch.tensor(cont[len(cont) - n :])).all())
            out.append((-float(nll[b, span].double().sum()), greedy))
        return out

    def _loglikelihoods(self, pairs, counted, what: str) -> list[tuple[float, bool]]:
        """Longest first, `batch_size` at a time; returned in the order of `pairs`."""
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        chunks = [order[a : a + self.batch_size] for a in range(0, len(order), self.batch_size)]
        out: list = [None] * len(pairs)
        with _progress_per_request_type():
            for chunk in track(chunks, len(chunks), f"lm-eval {what}"):
                scores = self._score_batch([pairs[i] for i in chunk], [counted[i] for i in chunk])
                for i, score in zip(chunk, scores):
                    out[i] = score
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._pair(*r.args) for r in requests]
        return self._loglikelihoods(pairs, self._counted(requests), "loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for k, r in enumerate(requests):
            for context, target in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self._encode(r.args[0]),
                    prefix_token=self.eot,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((list(context), list(target)))
                owner.append(k)
        counted = self._counted(requests)
        scores = self._loglikelihoods(windows, [counted[k] for k in owner], "rolling windows")
        out = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, scores):
            out[k] += ll
        return out

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        decoder = EarlyExitDecoder(self.model, self.policy, self.kv)
        counted = self._counted(requests)
        groups: dict[str, list[int]] = {}  # identical generation settings batch together
        for i, r in enumerate(requests):
            key = json.dumps(r.args[1], sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        chunks = []
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1] or {})
            prompts = {i: self._prompt(requests[i].args[0], kwargs) for i in members}
            members = sorted(members, key=lambda i: -len(prompts[i]))
            for a in range(0, len(members), self.batch_size):
                chunk = members[a : a + self.batch_size]
                chunks.append((chunk, [prompts[i] for i in chunk], kwargs))
        out: list = [None] * len(requests)
        for chunk, prompts, kwargs in track(chunks, len(chunks), "lm-eval generation"):
            texts = self._generate(decoder, prompts, kwargs, [counted[i] for i in chunk])
            for i, text in zip(chunk, texts):
                out[i] = text
        return out

    def _prompt(self, context: str, kwargs: dict) -> list[int]:
        new = _number("max_gen_toks", kwargs.get("max_gen_toks", 256), int)
        return self._encode(context)[-max(1, self.max_length - new) :] or [self.eot]

    def _generate(self, decoder, prompts, kwargs, counted) -> list[str]:
        """One left-padded batch of prompts; each text ends before its first `until` string."""
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else [u for u in until if u]
        new = _number("max_gen_toks", kwargs.get("max_gen_toks", 256), int)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, width - len(p) :], mask[b, width - len(p) :] = torch.tensor(p), 1
        sample = bool(kwargs.get("do_sample", False)) and float(kwargs.get("temperature", 1)) > 0
        res = decoder.generate(
            ids,
            mask,
            new,
            eos_token_id=self.eot,
            pad_token_id=self.pad,
            do_sample=sample,
            temperature=float(kwargs.get("temperature", 1.0) or 1.0),
            top_k=int(kwargs.get("top_k", 0) or 0),
            stop=UntilStrings(self.tokenizer, until) if until else None,
        )
        texts = []
        for b, count in enumerate(counted):
            made = res.exit_layers[b] > 0  # 0: the row had already finished
            tokens = res.new_tokens[b][made].tolist()
            end = tokens.index(self.eot) if self.eot in tokens else len(tokens)
            if count:
                self.exits["generation"].update(res.exit_layers[b][made][:end].tolist())
            text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True)
            for stop in until:
                if stop in text:
                    text = text[: text.index(stop)]
            texts.append(text)
        return texts


class UntilStrings:
    """The decoder's `stop` hook: a row stops once its decoded new text holds an `until` string
    (rows already stopped are not decoded again)."""

    def __init__(self, tokenizer, until: list[str]):
        self.tokenizer, self.until, self.done = tokenizer, until, None

    def __call__(self, new_tokens: torch.Tensor) -> torch.Tensor:
        if self.done is None:
            self.done = torch.zeros(new_tokens.shape[0], dtype=torch.bool)
        for b, row in enumerate(new_tokens.tolist()):
            if not self.done[b]:
                text = self.tokenizer.decode(row, skip_special_tokens=True)
                self.done[b] = any(s in text for s in self.until)
        return self.done.clone()


@contextmanager
def _progress_per_request_type():
    """`collect_exit_table` reports progress per call; here a call is one batch of requests, so
    progress is reported per request type instead (else a line per batch)."""
    own = records.track
    records.track = lambda items, total, description, fraction=0.1: items
    try:
        yield
    finally:
        records.track = own


def run_harness(model: EexitLM, tasks, include_path: str | None, limit) -> tuple:
    """(metric rows per task, early-exit statistics, the harness's result dict). `tasks`: names
    or `prepare_tasks`' result. Under several processes every process calls it; the rows and
    the result dict are the main process's (empty / None elsewhere), the statistics everyone's."""
    import lm_eval

    if not isinstance(tasks, Tasks):
        tasks = prepare_tasks(list(tasks), include_path)
    res = lm_eval.simple_evaluate(
        model=model, tasks=tasks.built, task_manager=tasks.manager, limit=limit, log_samples=True
    )
    rows = []
    for task, metrics in sorted((res or {}).get("results", {}).items()):
        row = {"task": task}
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[key.replace(",none", "")] = float(value)
        rows.append(row)
    return rows, model.early_exit_stats(), res


def main(argv: list[str] | None = None) -> int:
    """lm-eval's own CLI with the "eexit" model registered. Its default --device (cuda:0)
    becomes auto; an EexitError (a bad model_args, a device this machine lacks) is one line with
    exit code 2; after lm-eval's table the main process prints the early-exit statistics,
    summed over the processes, as one JSON line."""
    global _KEEP
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if "--model" in args and not any(a == "--device" or a.startswith("--device=") for a in args):
        args += ["--device", "auto"]
    old, sys.argv, _KEEP = sys.argv, [sys.argv[0], *args], {}
    try:
        _check_model_args(args)
        cli_evaluate()
        lm = _KEEP.get("lm")
        if lm is not None:
            stats = lm.early_exit_stats()
            if lm.runtime.is_main:
                print("eexit early exit: " + json.dumps(stats, sort_keys=True), flush=True)
        _end_process_group(wait=True)
    except EexitError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        sys.argv, _KEEP = old, None
        _end_process_group(wait=False)
    return 0


def _end_process_group(wait: bool) -> None:
    """Under several processes: (after a run that ended well, once every process is there) tear
    the group down before the interpreter exits: a group left to the interpreter's teardown can
    abort a process with "terminate called without an active exception"."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            if wait:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def _check_model_args(args: list[str]) -> None:
    """lm-eval's CLI always passes its own batch_size and device beside --model_args: the same
    keys in --model_args would be a Python TypeError deep inside lm-eval, so say it first."""
    keys: set[str] = set()
    for i, a in enumerate(args):
        if a not in ("--model_args", "-a"):
            continue
        for value in args[i + 1 :]:
            if value.startswith("-"):
                break
            if value.lstrip().startswith("{"):
                try:
                    keys |= set(json.loads(value))
                except ValueError:
                    pass  # lm-eval's own message
            else:
                keys |= {kv.split("=")[0].strip() for kv in value.split(",")}
    for key, flag in (("batch_size", "--batch_size"), ("device", "--device")):
        if key in keys:
            raise EexitError(
                f"give {key} as lm-eval's {flag}, not in --model_args (lm-eval passes its own)"
            )
    for i, a in enumerate(args):  # lm-eval's own check is a ValueError traceback
        value = a.split("=", 1)[1] if a.startswith("--limit=") else None
        if a in ("--limit", "-L") and i + 1 < len(args):
            value = args[i + 1]
        if value is None:
            continue
        try:
            ok = float(value) > 0
        except ValueError:
            ok = False
        if not ok:
            raise EexitError(
                f"--limit must be a number of examples >= 1 or a fraction in (0, 1); got {value!r}"
            )


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Several processes: the results are written and the group torn down; what is left is the
        # interpreter's teardown, where a native thread still joinable aborts a process now and
        # then ("terminate called without an active exception", rc 1 in 2 of 4 runs). End here.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
