"""The one evaluation entry behind `eexit evaluate` and `eexit sweep-threshold`.

It validates the options, opens the model once (`open_context`: checkpoint metadata read once,
policy bound) and dispatches on what is evaluated:
- a task dataset (translation, summarization, QA): early-exit decoding scored by the task metric;
- `generate`: early-exit decoding of LM prompts against full-depth decoding (speed, agreement);
- otherwise: teacher-forced language modelling (perplexity, compute, exit shares).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from eexit.errors import EexitError
from eexit.evaluation.context import EvalRequest, open_context
from eexit.evaluation.generation import GenerationOptions, run_generation
from eexit.evaluation.lm import run_lm
from eexit.evaluation.tasks import TaskOptions, run_task_sweep
from eexit.files import check_output_path, output_folder
from eexit.model_source import model_path

CALIBRATED_FILE = "calibrated.json"


@dataclass(kw_only=True)
class EvalResult:
    kind: str  # lm | task | generation
    rows: list[dict]  # one per threshold (task: the full-depth row first; generation: per sample)
    total: dict | None = None  # generation: the whole run
    dataset: str = ""
    main: bool = True  # the main process (the only one that writes and prints)


def evaluate(
    request: EvalRequest,
    *,
    out: str | None = None,
    overwrite: bool = False,
    sweep: bool = False,
    generation: GenerationOptions | None = None,
    task: TaskOptions | None = None,
) -> EvalResult:
    """Evaluate `request` (one row per threshold); `sweep` writes the sweep tables and plot."""
    if generation is not None:
        generation.check()
    task = task or TaskOptions()
    task.check()
    if out:
        check_output_path(Path(out), overwrite)  # before any work
    ctx = open_context(request)
    if not ctx.is_task:  # task-only options on an LM dataset (--generate reads the token count)
        unused = [f for f in task.given if generation is None or f == "--examples"]
        if unused:
            raise EexitError(
                f"{', '.join(unused)}: for task datasets only (decoded examples); "
                f"{ctx.dataset!r} is a language-modelling dataset; leave "
                + ("it" if len(unused) == 1 else "them")
                + " out"
            )
    main = ctx.runtime.is_main  # several processes: each computes its shard, the main one writes
    with output_folder(out, overwrite) if out and main else nullcontext(None) as folder:
        result = EvalResult(kind="lm", rows=[], dataset=ctx.dataset, main=main)
        if ctx.is_task and generation is None:
            result.kind, result.rows = "task", run_task_sweep(ctx, task, folder)
        elif generation is not None:
            result.kind = "generation"
            result.rows, result.total = run_generation(ctx, generation, folder)
        else:
            result.rows = run_lm(ctx, folder, sweep)
    ctx.runtime.barrier()
    return result


def read_calibrated(folder: str) -> dict:
    """The policy and threshold chosen by `eexit calibrate --out FOLDER`."""
    p = Path(folder) / CALIBRATED_FILE
    if not p.is_file():
        raise EexitError(
            f"{folder} holds no {CALIBRATED_FILE} (make one with eexit calibrate ... --out "
            f"{folder})"
        )
    try:
        c = json.loads(p.read_text())
        keys = ("policy", "threshold", "min_exit_layer", "policy_params")
        missing = [k for k in keys if k not in c]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
    except (ValueError, UnicodeDecodeError, TypeError) as e:
        raise EexitError(f"{p} is not a calibration result ({str(e).splitlines()[0]})") from None
    return c


def apply_calibrated(request: EvalRequest, folder: str) -> EvalRequest:
    """The request with the calibrated policy, threshold, min exit layer and exits."""
    c = read_calibrated(folder)
    same = (
        Path(model_path(c.get("model") or "")).resolve()
        == Path(model_path(request.model)).resolve()
    )
    if c.get("model") and not same:  # the same model, named by path or as package:file
        raise EexitError(f"{folder} was calibrated for model {c['model']}, not {request.model}")
    request.policy, request.thresholds = c["policy"], [c["threshold"]]
    request.min_exit_layer, request.policy_params = c["min_exit_layer"], c["policy_params"]
    if not request.exit_layers and c.get("exit_layers"):
        request.exit_layers = ",".join(str(x) for x in c["exit_layers"])
    if c.get("model_identity"):  # checked once the model is loaded (open_context)
        request.calibrated_on = (folder, c["model_identity"])
    return request
