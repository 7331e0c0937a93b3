"""Where a command runs, decided once, where the model is opened: the device, the dtype of the
weights, the attention implementation and this process's shard of the data.

Nothing else in eexit chooses a device or a dtype: the model is placed by `load_model(...,
runtime=...)`, and every tensor made later follows the model (`model.device`). Scores, softmax
measures, log-probabilities and LTT statistics are computed in float32 whatever the weights'
dtype (`ExitView.logits` and the exit tables cast once, at the exit).

Several processes (`accelerate launch --multi_gpu --num_processes N -m eexit.cli evaluate ...`,
gloo on CPUs, NCCL on GPUs): each process takes a contiguous block of the batches
(`Runtime.shard`), the results are gathered in rank order (`Runtime.gather`), so every process
holds exactly what one process would have computed, and only the main process writes.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from eexit.errors import EexitError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_CHOICES = "auto, " + ", ".join(DTYPES)
ATTENTION = "sdpa"  # PyTorch's scaled_dot_product_attention: fused kernels on GPUs


@dataclass(frozen=True)
class Runtime:
    """The resolved placement of one command (see the module docstring)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    attention: str = ATTENTION
    rank: int = 0  # this process
    world: int = 1  # processes in the run
    accelerator: object = None  # accelerate.Accelerator when world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def shard(self, n: int) -> range:
        """This process's contiguous block of n items (batches, examples, prompts)."""
        return range(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def gather(self, items: list) -> list:
        """Every process's `items` concatenated in rank order, on every process. With contiguous
        shards this restores the order of one process."""
        if self.world == 1:
            return list(items)
        from accelerate.utils import gather_object

        return list(gather_object(list(items)))

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def synchronize(self) -> None:
        """Wait for the device's queued work (GPU timings are otherwise early)."""
        synchronize(self.device)

    def describe(self) -> dict:
        """Provenance: where the numbers were computed."""
        return {
            "device": str(self.device),
            "device_name": device_name(self.device),
            "dtype": self.dtype_name,
            "attention": self.attention,
            "processes": self.world,
        }


LOCAL = Runtime()  # one process, CPU, float32: what a model built in code starts with


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def now(device: torch.device | str = "cpu") -> float:
    """Wall-clock seconds after the device's queued work: use it for every timing."""
    synchronize(device)
    return time.perf_counter()


CPU_LOGITS_BUDGET = 2**30  # bytes of exit logits at a time on the CPU (fixed: reproducible)
LOGIT_COPIES = 4  # logits in the weights' dtype, in float32, softmax, temporaries


def logits_chunk_tokens(vocab_size: int, device: torch.device | str) -> int:
    """How many tokens' exit logits (and their float32 softmax) to hold at once: a quarter of the
    GPU's free memory, a fixed 1 GiB on the CPU. Tables, calibration and analysis keep only
    per-token summaries (NLL, top-1, scores, top-k), so their peak memory is set by this chunk,
    not by the batch."""
    device = torch.device(device)
    if device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] // 4
    else:
        budget = CPU_LOGITS_BUDGET
    return max(1, int(budget // (vocab_size * 4 * LOGIT_COPIES)))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    import platform

    return platform.processor() or platform.machine() or "cpu"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def parse_device(spec: str) -> torch.device:
    """--device: auto (cuda, then mps, else cpu), cpu, cuda, cuda:N or mps; refused when the
    machine does not have it."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise EexitError(f"unknown --device {spec!r}; valid: {DEVICE_CHOICES}") from None
    if device.type == "cpu":
        if device.index not in (None, 0):  # torch has one CPU device; cpu:N would be ignored
            raise EexitError(f"--device {spec}: there is one CPU device; use --device cpu")
        return torch.device("cpu")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise EexitError(
                f"--device {spec}: this machine has no CUDA GPU usable by torch "
                f"{torch.__version__}; use --device cpu (or auto)"
            )
        index = 0 if device.index is None else device.index
        if index >= count:
            raise EexitError(
                f"--device {spec}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}"
            )
        return torch.device("cuda", index)
    if device.type == "mps":
        if not _mps_available():
            raise EexitError(f"--device {spec}: MPS is not available here; use --device cpu")
        return device
    raise EexitError(f"unknown --device {spec!r}; valid: {DEVICE_CHOICES}")


def parse_dtype(spec: str, device: torch.device) -> torch.dtype:
    """--dtype: auto (bfloat16 on a GPU that supports it, float16 on other GPUs / MPS, float32 on
    the CPU) or an explicit float32, bfloat16, float16 the device can run."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if spec not in DTYPES:
        raise EexitError(f"unknown --dtype {spec!r}; valid: {DTYPE_CHOICES}")
    dtype = DTYPES[spec]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise EexitError(
            f"--dtype bfloat16: {device_name(device)} cannot run bfloat16; use float16 or float32"
        )
    if dtype == torch.bfloat16 and device.type == "mps":
        raise EexitError("--dtype bfloat16 is not supported on MPS here; use float16 or float32")
    return dtype


def check_process_device(device: str, world: int) -> str:
    """--device as given, lower-cased; with several processes only auto, cuda or cpu (each
    process takes its own device)."""
    wanted = (device or "auto").strip().lower()
    if world > 1 and wanted not in ("auto", "cpu", "cuda"):
        raise EexitError(
            f"--device {device}: with {world} processes each process takes its own device; "
            "use --device auto, cuda or cpu"
        )
    return wanted


MIXED_PRECISION = {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}


def check_sharding(device: torch.device) -> None:
    """A sharded launch (`accelerate launch --use_fsdp` / `--use_deepspeed`, or a config file
    that asks for it) that this run cannot honour is refused: accelerate turns FSDP on for GPU
    processes only, so on the CPU it would silently train plain data-parallel (DDP)."""
    import importlib.util

    asked = [
        name
        for name, var in (
            ("FSDP", "ACCELERATE_USE_FSDP"),
            ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"),
        )
        if os.environ.get(var, "false").lower() == "true"
    ]
    if not asked:
        return
    if "DeepSpeed" in asked and importlib.util.find_spec("deepspeed") is None:
        raise EexitError(
            "accelerate launch asked for DeepSpeed, which is not installed here; "
            "pip install deepspeed, or launch without --use_deepspeed"
        )
    if device.type == "cpu":
        raise EexitError(
            f"accelerate launch asked for {asked[0]}, but accelerate shards only GPU processes: "
            "on the CPU this run would be plain data-parallel; launch with --multi_gpu for "
            f"data-parallel on CPUs, or use GPUs for {asked[0]}"
        )


def training_placement(device: str = "auto", dtype: str = "auto") -> dict:
    """`eexit train --device --dtype` as accelerate's settings, checked like every command's:
    {"cpu": run on the CPU, "mixed_precision": accelerate's (None = its own default, i.e. what
    `accelerate launch --mixed_precision` or its config set), "cuda_index": a GPU to use}.
    Weights stay float32; --dtype chooses the autocast precision (mixed precision)."""
    wanted = check_process_device(device, int(os.environ.get("WORLD_SIZE", "1")))
    dev = torch.device("cpu") if wanted == "cpu" else parse_device(wanted)
    if dev.type == "mps":
        raise EexitError("--device mps: training runs on cuda or cpu; use one of them")
    check_sharding(dev)
    out = {"cpu": dev.type == "cpu", "mixed_precision": None, "cuda_index": None}
    if dev.type == "cuda" and dev.index is not None:
        out["cuda_index"] = dev.index
    if (dtype or "auto").strip().lower() != "auto":
        chosen = parse_dtype(dtype, dev)
        if chosen == torch.float16 and dev.type == "cpu":
            raise EexitError(
                "--dtype float16 trains on a GPU only (loss scaling); on the CPU use bfloat16 or "
                "float32"
            )
        out["mixed_precision"] = MIXED_PRECISION[chosen]
    return out


def runtime_of(model) -> Runtime:
    """One process on the model's own device and dtype (a model built or placed in code)."""
    p = next(model.parameters())
    return Runtime(device=p.device, dtype=p.dtype)


@functools.cache
def resolve_runtime(device: str = "auto", dtype: str = "auto") -> Runtime:
    """The placement of this command (validated before any model loads). Started by
    `accelerate launch` / `torchrun` with several processes: one process group (gloo on the CPU),
    each process on its own GPU when there are GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        dev = parse_device(device)
        check_launch(1)
        return Runtime(device=dev, dtype=parse_dtype(dtype, dev))
    from accelerate import Accelerator

    wanted = check_process_device(device, world)
    on_cpu = wanted == "cpu" or not torch.cuda.is_available()
    if not on_cpu:
        parse_device("cuda")  # refused with one line when torch sees no GPU
    acc = Accelerator(cpu=on_cpu)
    check_launch(acc.num_processes)
    dev = acc.device
    return Runtime(
        device=dev,
        dtype=parse_dtype(dtype, dev),
        rank=acc.process_index,
        world=acc.num_processes,
        accelerator=acc,
    )


def check_launch(world: int, command: str | None = None) -> None:
    """A launch that runs fewer processes than asked for (accelerate's --cpu launcher starts one)
    is refused: its numbers would silently be one process's."""
    import sys

    asked = requested_processes()
    command = command or next((a for a in sys.argv[1:] if not a.startswith("-")), "evaluate")
    if asked is not None and asked != world:
        raise EexitError(
            f"accelerate launch asked for {asked} processes but this run has {world}; on CPUs "
            "accelerate's --cpu launcher starts one process: use `accelerate launch --multi_gpu "
            f"--num_processes {asked} -m eexit.cli {command} ...` (gloo) or `torchrun "
            f"--nproc_per_node {asked} -m eexit.cli {command} ...`"
        )


def requested_processes() -> int | None:
    """How many processes `accelerate launch` (our parent process) was asked for, from its
    command line or its config file; None when we were not started by it."""
    try:
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return None
    head = argv[:3]
    by_script = "launch" in argv and any(Path(a).name == "accelerate" for a in head)
    if not (by_script or "accelerate.commands.launch" in head):
        return None
    for flag in ("--num_processes", "--num-processes"):
        if flag in argv and argv.index(flag) + 1 < len(argv):
            return int(argv[argv.index(flag) + 1])
        for a in argv:
            if a.startswith(flag + "="):
                return int(a.split("=", 1)[1])
    if "--config_file" in argv:
        config = Path(argv[argv.index("--config_file") + 1])
    else:
        from accelerate.commands.config import default_config_file

        config = Path(default_config_file)
    if config.is_file():
        import yaml

        data = yaml.safe_load(config.read_text()) or {}
        return int(data.get("num_processes", 1) or 1)
    return None
