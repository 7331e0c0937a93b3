"""Where a training run writes: its output folder (replaced only once the new run has
something to show), checkpoint-<step>/ folders written as a unit through accelerate's
save_state plus a Hugging Face folder of the gathered weights, and the checks before --resume.
Split from `loop.py`, which runs the steps.

--resume continues one optimisation: every setting that decides the steps (model, exits, LoRA,
loss and its resolved parameters, layer dropout, learning-rate schedule, optimizer, seed, data)
must equal the checkpoint's; only the settings in `RESUME_MAY_CHANGE` (how long the run goes,
how often it evaluates, saves and logs, where it reports) may differ. A list of what may change,
not of what may not: a setting added later is protected without anyone remembering to."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from eexit.config import RunConfig, to_dict
from eexit.errors import EexitError
from eexit.files import (
    atomic_json,
    atomic_write,
    clean_dead_temporaries,
    library_write_error,
    replace_folder,
)

STATE_FILE = "trainer_state.json"  # {"step": N}; written last, it marks a complete checkpoint
ACCELERATE_STATE = "accelerate_state"  # accelerator.save_state: optimizer, scheduler, RNG, shards
LEGACY_STATE_FILE = "trainer_state.pt"  # written before accelerate's save_state: not resumable


RESUME_MAY_CHANGE = (
    "run_name",
    "out_dir",
    "train.steps",
    "train.save_every",
    "train.keep_checkpoints",
    "train.eval_every",
    "train.eval_batches",
    "train.log_every",
    "train.report_to",
)
TMP_CHECKPOINT = ".tmp-checkpoint-"  # a checkpoint being written; renamed when complete


def checkpoints(out: Path) -> list[Path]:
    found = [
        p
        for p in out.glob("checkpoint-*")
        if p.name.split("-", 1)[1].isdigit() and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def checkpoint_step(ck: Path) -> int:
    """The step a checkpoint was written at (trainer_state.json), checked."""
    path = ck / STATE_FILE
    try:
        step = json.loads(path.read_text()).get("step")
    except (ValueError, UnicodeDecodeError, AttributeError):
        step = None
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise EexitError(f'--resume: {path} is malformed (expected {{"step": N}} with N >= 1)')
    return step


def clear_unfinished_checkpoints(folder: Path) -> None:
    """Checkpoints cut off before their rename (a kill or a write failure): never resumed from,
    and only a run holding the folder's lock calls this, so none is being written."""
    for tmp in folder.glob(f"{TMP_CHECKPOINT}*"):
        shutil.rmtree(tmp, ignore_errors=True)


class RunFolder:
    """Where a run writes. Starting again over an existing run (--overwrite), the new run writes
    into a staging folder beside it and replaces the old run at its first checkpoint (or at its
    end); a run that fails or is stopped before that leaves the old run as it was. A new run in
    a folder that was absent or empty and fails before its first checkpoint removes what it
    wrote there, so the same command runs again (no "already exists" for a log alone)."""

    def __init__(self, out: Path, staged: bool, fresh: bool = False):
        self.out, self.staged = out, staged
        self.path = out.with_name(f".{out.name}.overwrite") if staged else out
        self.fresh = fresh and not staged  # `out` absent or empty: everything in it is ours
        self.existed = out.is_dir()

    def promote(self, acc) -> None:
        """The run has something to show: it becomes the output folder."""
        acc.wait_for_everyone()
        if self.staged:
            if acc.is_main_process:
                replace_folder(self.path, self.out)
            acc.wait_for_everyone()
            self.path, self.staged = self.out, False

    def clear_leftovers(self) -> None:
        """Under the run's lock: the staging folder of a killed --overwrite run, and the
        unfinished checkpoints and temporary files of a killed run inside the folder."""
        shutil.rmtree(self.out.with_name(f".{self.out.name}.overwrite"), ignore_errors=True)
        if not self.staged and self.out.is_dir():
            clear_unfinished_checkpoints(self.out)
            clean_dead_temporaries(self.out)

    def abandon(self, failed: bool = False) -> None:
        """The run ends: a staging folder that never replaced the old run goes; so does what a
        failed fresh run wrote, unless it reached a checkpoint (then it is resumable)."""
        if self.staged:
            shutil.rmtree(self.path, ignore_errors=True)
        elif failed and self.fresh and self.out.is_dir() and not checkpoints(self.out):
            shutil.rmtree(self.out, ignore_errors=True)
            if self.existed:
                self.out.mkdir(exist_ok=True)


def trim_log(path: Path, step: int) -> None:
    """--resume: drop log lines past the checkpoint (they are written again)."""
    if path.is_file():
        keep = [l for l in path.read_text(errors="replace").splitlines() if _logged_by(l, step)]
        atomic_write(path, "".join(l + "\n" for l in keep))


def _logged_by(line: str, step: int) -> bool:
    """A log line written up to `step` (a line cut off by a kill or a full disk is dropped)."""
    try:
        row = json.loads(line)
    except ValueError:
        return False
    return isinstance(row, dict) and isinstance(row.get("step", 0), int) and row["step"] <= step


def check_output_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> None:
    out = cfg.output_dir
    if out.exists() and not out.is_dir():
        raise EexitError(f"output folder {out} is a file; choose a folder path with --out")
    if resume:
        found = checkpoints(out)
        if not found and any(out.glob(f"checkpoint-*/{LEGACY_STATE_FILE}")):
            raise EexitError(
                f"--resume: the checkpoints in {out} were written by an older eexit (without "
                "accelerate's save_state) and cannot be resumed; their weights load as usual "
                "(--model or model.pretrained)"
            )
        if not found:
            raise EexitError(f"--resume: no checkpoint found in {out}")
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise EexitError(
            f"output folder {out} already exists; pass --resume to continue it or --overwrite to "
            "start again"
        )


def optimisation_settings(cfg: RunConfig) -> dict:
    """The config as flat key -> value, loss parameters resolved (defaults filled in, so
    `kd_weight: 1.0` given or left out is the same run), without `RESUME_MAY_CHANGE`."""
    from eexit.training.losses import make_loss

    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix.rstrip(".")] = value

    data = to_dict(cfg)
    data["loss"]["params"] = dataclasses.asdict(make_loss(cfg.loss).params)
    walk("", data)
    return {k: v for k, v in flat.items() if k not in RESUME_MAY_CHANGE}


def _shown(settings: dict, key: str) -> str:
    return repr(settings[key]) if key in settings else "unset"


def check_resumable(ck: Path, cfg: RunConfig) -> None:
    """--resume continues the same optimisation: name every setting that differs, old -> new."""
    from eexit.models.checkpoint import CheckpointInfo

    saved = CheckpointInfo.read(str(ck)).train_config
    if saved is None:
        raise EexitError(f"--resume: {ck} holds no training config (eexit.json)")
    checkpoint_step(ck)
    old, new = optimisation_settings(saved), optimisation_settings(cfg)
    differ = [
        f"{k} {_shown(old, k)} -> {_shown(new, k)}"
        for k in sorted(old.keys() | new.keys())
        if k not in old or k not in new or old[k] != new[k]
    ]
    if differ:
        shown = ", ".join(differ[:6]) + (f" and {len(differ) - 6} more" if len(differ) > 6 else "")
        raise EexitError(
            f"--resume: {ck} was trained with other settings that change the optimisation: "
            f"{shown}; only {', '.join(RESUME_MAY_CHANGE)} may change on resume (resume with "
            "the checkpoint's settings, or start a new run with --overwrite)"
        )


def save_checkpoint(acc, wrapped, step: int, tokenizer, cfg: RunConfig, folder: Path) -> None:
    """checkpoint-<step>/ written as a unit (a hidden folder renamed into place): the model as a
    Hugging Face folder from the gathered state dict (`accelerator.get_state_dict`: whole weights
    under FSDP / DeepSpeed), and `accelerator.save_state` for optimizer, scheduler, every
    process's RNG (and FSDP / DeepSpeed shards)."""
    out, tmp = folder / f"checkpoint-{step}", folder / f"{TMP_CHECKPOINT}{step}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    acc.wait_for_everyone()
    try:
        acc.save_state(str(tmp / ACCELERATE_STATE))
        state = gathered_model_state(acc, wrapped)  # every process: a collective under FSDP
        if acc.is_main_process:
            meta = {"train_config": to_dict(cfg), "step": step}
            acc.unwrap_model(wrapped).model.save(tmp, tokenizer, meta, state_dict=state)
            atomic_json(tmp / STATE_FILE, {"step": step})
    except Exception as e:  # noqa: BLE001  (torch / safetensors wrap a full disk in their own)
        error = library_write_error(e, out, tmp)
        shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoints stay as they were
        if error is None:
            raise
        raise error from None
    if acc.is_main_process:
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        for old in checkpoints(folder)[: -cfg.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def use_hf_folder_for_weights(acc) -> None:
    """The checkpoint's Hugging Face folder holds the model: accelerate's state skips a second
    copy of the weights (its hooks see only models it does not shard itself, so FSDP /
    DeepSpeed shards are still saved and loaded by accelerate)."""
    acc.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
    acc.register_load_state_pre_hook(lambda models, input_dir: models.clear())


def gathered_model_state(acc, wrapped) -> dict:
    """The EarlyExitModel's state dict from the prepared training module, gathered whole under
    FSDP / DeepSpeed (`accelerator.get_state_dict`; every process must call it)."""
    state = acc.get_state_dict(wrapped)
    return {k.removeprefix("model."): v for k, v in state.items()}
