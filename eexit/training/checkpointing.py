"""Where a training run writes: its output folder (replaced only once the new run has
something to show), checkpoint-<step>/ folders written as a unit through accelerate's
save_state plus a Hugging Face folder of the gathered weights, and the checks before --resume.
Split from `loop.py`, which runs the steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from eexit.config import RunConfig, to_dict
from eexit.errors import EexitError
from eexit.files import atomic_json, atomic_write, replace_folder

STATE_FILE = "trainer_state.json"  # {"step": N}; written last, it marks a complete checkpoint
ACCELERATE_STATE = "accelerate_state"  # accelerator.save_state: optimizer, scheduler, RNG, shards
LEGACY_STATE_FILE = "trainer_state.pt"  # written before accelerate's save_state: not resumable


def checkpoints(out: Path) -> list[Path]:
    found = [p for p in out.glob("checkpoint-*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


class RunFolder:
    """Where a run writes. Starting again over an existing run (--overwrite), the new run writes
    into a staging folder beside it and replaces the old run at its first checkpoint (or at its
    end); a run that fails or is stopped before that leaves the old run as it was."""

    def __init__(self, out: Path, staged: bool):
        self.out, self.staged = out, staged
        self.path = out.with_name(f".{out.name}.overwrite") if staged else out

    def promote(self, acc) -> None:
        """The run has something to show: it becomes the output folder."""
        acc.wait_for_everyone()
        if self.staged:
            if acc.is_main_process:
                replace_folder(self.path, self.out)
            acc.wait_for_everyone()
            self.path, self.staged = self.out, False

    def abandon(self) -> None:
        if self.staged:
            shutil.rmtree(self.path, ignore_errors=True)


def trim_log(path: Path, step: int) -> None:
    """--resume: drop log lines past the checkpoint (they are written again)."""
    if path.is_file():
        keep = [
            l
            for l in path.read_text().splitlines()
            if l.strip() and json.loads(l).get("step", 0) <= step
        ]
        atomic_write(path, "".join(l + "\n" for l in keep))


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


def check_resumable(ck: Path, cfg: RunConfig) -> None:
    """--resume continues the same model on the same data: say which settings differ."""
    from eexit.models.checkpoint import CheckpointInfo

    saved = CheckpointInfo.read(str(ck)).train_config
    if saved is None:
        raise EexitError(f"--resume: {ck} holds no training config (eexit.json)")
    differ = [
        f"{section}.{k} ({getattr(getattr(saved, section), k)!r} in the checkpoint, "
        f"{getattr(getattr(cfg, section), k)!r} now)"
        for section in ("model", "data")
        for k in getattr(cfg, section).__dataclass_fields__
        if getattr(getattr(saved, section), k) != getattr(getattr(cfg, section), k)
    ]
    if differ:
        raise EexitError(
            f"--resume: the checkpoint was trained with other settings: {'; '.join(differ[:4])}; "
            "resume with the same config, or start a new run"
        )


def save_checkpoint(acc, wrapped, step: int, tokenizer, cfg: RunConfig, folder: Path) -> None:
    """checkpoint-<step>/ written as a unit (a hidden folder renamed into place): the model as a
    Hugging Face folder from the gathered state dict (`accelerator.get_state_dict`: whole weights
    under FSDP / DeepSpeed), and `accelerator.save_state` for optimizer, scheduler, every
    process's RNG (and FSDP / DeepSpeed shards)."""
    out, tmp = folder / f"checkpoint-{step}", folder / f".tmp-checkpoint-{step}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    acc.wait_for_everyone()
    acc.save_state(str(tmp / ACCELERATE_STATE))
    state = gathered_model_state(acc, wrapped)  # every process: a collective under FSDP
    if acc.is_main_process:
        meta = {"train_config": to_dict(cfg), "step": step}
        acc.unwrap_model(wrapped).model.save(tmp, tokenizer, meta, state_dict=state)
        atomic_json(tmp / STATE_FILE, {"step": step})
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
