"""The options the `eexit` commands share (one declaration each, the same help everywhere), how
they become an evaluation request, and which of them a mode of a command does not use. Names only
(no torch at import): `eexit --help` stays fast."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from eexit.errors import EexitError
from eexit.names import dataset_names, policy_names

_MODEL = typer.Option(
    None,
    "--model",
    "-m",
    help="eexit checkpoint folder, HF folder / hub name, or .gguf file (default: the newest "
    "trained checkpoint under checkpoints/).",
)
_POLICY = typer.Option("max-prob", help=f"Exit policy: {', '.join(policy_names())}.")
_MIN = typer.Option(1, "--min-exit-layer", help="No exit below this layer.")
_PARAM = typer.Option(
    [], "--param", help="Policy parameter key=value, e.g. --param layer=2 for static."
)
_DATASET = typer.Option(
    None, help=f"Dataset (default: the checkpoint's training data): {', '.join(dataset_names())}."
)
_SPLIT = typer.Option("test", help="train, validation or test.")
_SEQ = typer.Option(None, "--seq-len", help="Window length (default: the training one).")
_MAXTOK = typer.Option(None, "--max-tokens", help="Evaluate at most this many tokens.")
_BS = typer.Option(8, "--batch-size", help="Windows (or, with --generate, prompts) per batch.")
_EXITS = typer.Option(None, "--exit-layers", help="Override the exits: all, or e.g. 1,3.")
_EXAMPLES = typer.Option(
    32, "--examples", help="Task datasets: test examples decoded per threshold."
)
_KV = typer.Option(
    "propagate", "--kv", help="KV of skipped layers when decoding: propagate, recompute or full."
)
_NEW = typer.Option(
    None,
    help="--generate: tokens per prompt (32); task datasets: longest answer (the training "
    "max_target_len).",
)
_OVERWRITE = typer.Option(False, help="Replace an existing results folder.")
_DEVICE = typer.Option(
    "auto",
    help="auto (cuda, then mps, else cpu), cpu, cuda, cuda:N or mps. Several processes: "
    "accelerate launch --multi_gpu --num_processes N -m eexit.cli ...",
)
_DTYPE = typer.Option(
    "auto",
    help="Weights' dtype: auto (bfloat16 on a GPU that has it, float32 on the CPU), float32, "
    "bfloat16 or float16. Scores and log-probabilities are float32 in every case.",
)


# Options that a mode of a command does not use: given there, they are refused in one line
# naming the mode instead of being silently ignored (tests/test_cli.py walks this table).
# what only calibrate's sequence-level risks (decoded prompts) read
SEQUENCE_OPTIONS = {
    "prompts": "--prompts",
    "test_prompts": "--test-prompts",
    "prompt_len": "--prompt-len",
    "max_new_tokens": "--max-new-tokens",
    "kv": "--kv",
    "repeats": "--repeats",
}
IGNORED_BY_MODE = {
    ("evaluate", "--mode self-spec"): {
        "policy": "--policy",
        "threshold": "--threshold",
        "kv": "--kv",
        "min_exit_layer": "--min-exit-layer",
        "param": "--param",
        "calibrated": "--calibrated",
    },
    ("sweep", "a threshold-free policy"): {"thresholds": "--thresholds"},
    # calibrate: the options of a Learn-then-Test run, and those of its two kinds of risk
    ("calibrate", "--fit and no --policy"): {
        "epsilon": "--epsilon",
        "delta": "--delta",
        "risk": "--risk",
        "grid": "--grid",
        "method": "--method",
        "zeta": "--zeta",
        "free_grid": "--free-grid",
        "free_fit": "--free-fit",
        "test_split": "--test-split",
        **SEQUENCE_OPTIONS,
    },
    ("calibrate", "a token-level risk"): SEQUENCE_OPTIONS,
    ("calibrate", "a sequence-level risk and no --fit"): {"max_tokens": "--max-tokens"},
}


# what only a task dataset's decoding reads (on an LM dataset evaluate / sweep refuse them once
# the dataset is known; --max-new-tokens also serves --generate)
TASK_ONLY = {"examples": "--examples", "max_new_tokens": "--max-new-tokens"}


def given_options(ctx: typer.Context, options: dict[str, str]) -> tuple[str, ...]:
    """The flags of `options` (parameter name -> flag) the user typed."""
    return tuple(
        flag
        for name, flag in options.items()
        if getattr(ctx.get_parameter_source(name), "name", None) in ("COMMANDLINE", "ENVIRONMENT")
    )


def refuse_ignored(ctx: typer.Context, command: str, mode: str, why: str) -> None:
    """Refuse each option of IGNORED_BY_MODE[(command, mode)] the user gave."""
    for flag in given_options(ctx, IGNORED_BY_MODE[(command, mode)]):
        raise EexitError(f"{flag} has no effect with {mode} ({why}); leave it out")


def refuse_calibrate_ignored(ctx: typer.Context, fit, policy, risk: str) -> None:
    """calibrate's mode rules: LTT options without a policy to calibrate, the sequence options
    under a token risk, --max-tokens under a sequence risk when nothing is fitted."""
    from eexit.names import SEQUENCE_RISKS, TOKEN_RISKS

    if fit and not policy:
        refuse_ignored(
            ctx, "calibrate", "--fit and no --policy", "only the classifiers are fitted; add "
            "--policy to calibrate a threshold too",
        )  # fmt: skip
    elif risk in SEQUENCE_RISKS:
        if not fit:
            refuse_ignored(
                ctx, "calibrate", "a sequence-level risk and no --fit",
                "the units are --prompts decoded prompts",
            )  # fmt: skip
    elif risk in TOKEN_RISKS:  # (an unknown risk is refused later, naming the valid ones)
        refuse_ignored(
            ctx, "calibrate", "a token-level risk", "token risks are read teacher-forced from "
            "windows of the split; the sequence-* risks decode prompts",
        )  # fmt: skip


def task_options(ctx: typer.Context, examples, max_new_tokens, kv, batch_size):
    """The task decoding options of evaluate / sweep, with the task-only flags the user typed
    (refused on an LM dataset once the dataset is known)."""
    from eexit.evaluation.tasks import TaskOptions

    return TaskOptions(
        examples=examples,
        max_new_tokens=max_new_tokens,
        kv_mode=kv,
        batch_size=batch_size,
        given=given_options(ctx, TASK_ONLY),
    )


def model_or_newest(model: str | None) -> str:
    """--model, or the newest trained checkpoint under checkpoints/ (said on stderr); a --model
    with nothing behind it is refused here, before torch is imported."""
    if model:
        from eexit.model_source import model_source

        model_source(model)
        return model
    from eexit.models.checkpoint import newest_checkpoint

    found = newest_checkpoint(Path("checkpoints"))
    if found is None:
        raise EexitError(
            "no --model given and no trained checkpoint under checkpoints/; train one with "
            "`eexit train` or pass --model"
        )
    typer.echo(f"no --model given: using the newest checkpoint, {found}", err=True)
    return str(found)


def quiet_libraries() -> None:
    from eexit import quiet

    quiet()


def policy_params(items: List[str]) -> dict:
    from eexit.config import parse_override

    return dict(parse_override(i) for i in items)


def request_from(
    model,
    policy,
    thresholds,
    min_exit_layer,
    param,
    dataset,
    split,
    seq_len,
    max_tokens,
    batch_size,
    exit_layers,
    device="auto",
    dtype="auto",
):
    from eexit.evaluation.context import EvalRequest

    return EvalRequest(
        model=model,
        policy=policy,
        thresholds=thresholds,
        min_exit_layer=min_exit_layer,
        policy_params=policy_params(param),
        dataset=dataset,
        split=split,
        seq_len=seq_len,
        max_tokens=max_tokens,
        batch_size=batch_size,
        exit_layers=exit_layers,
        device=device,
        dtype=dtype,
    )
