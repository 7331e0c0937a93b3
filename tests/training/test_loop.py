import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import message_lines, run_cli, tiny_overrides
from tests.helpers import ACCELERATE_LAUNCH

LOG = re.compile(r"^\[\d\d:\d\d:\d\d\] ")


def weights(path):
    return load_file(str(path / "model.safetensors"))


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_train_writes_a_loadable_checkpoint(tiny_checkpoint):
    meta = json.loads((tiny_checkpoint / "eexit.json").read_text())
    assert (
        meta["exit_layers"] == [1, 2, 3] and meta["train_config"]["loss"]["name"] == "weighted-ce"
    )
    metrics = json.loads((tiny_checkpoint / "metrics.json").read_text())
    assert metrics["finished"] and metrics["step"] == 6
    log = [json.loads(l) for l in (tiny_checkpoint / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]  # it learns
    assert {"ce@1", "ce@2", "ce@3", "tokens_per_s"} <= set(log[0])


def test_resumed_run_equals_uninterrupted(tmp_path):
    args = tiny_overrides("loss.exit_token_fraction=0.5")  # loss-side sampling RNG must resume too
    code, _, err = run_cli("train", *args, "--out", str(tmp_path / "full"))
    assert code == 0, err
    code, out, err = run_cli("train", *args, "--out", str(tmp_path / "cut"), "--stop-after", "3")
    assert code == 0, err
    assert "stopped" in out and not (tmp_path / "cut" / "model.safetensors").exists()
    # accelerate save_state: optimizer, scheduler (custom_checkpoint_0), RNG; weights: the HF folder
    state = tmp_path / "cut" / "checkpoint-3" / "accelerate_state"
    assert {"optimizer.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl"} <= {
        p.name for p in state.iterdir()
    }
    assert not list(state.glob("model*"))
    assert (tmp_path / "cut" / "checkpoint-3" / "model.safetensors").is_file()
    code, _, err = run_cli("train", *args, "--out", str(tmp_path / "cut"), "--resume")
    assert code == 0, err
    assert max_diff(weights(tmp_path / "full"), weights(tmp_path / "cut")) == 0.0
    steps = [
        json.loads(l)["step"]
        for l in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()
        if "loss" in json.loads(l)
    ]
    assert steps == [1, 2, 3, 4, 5, 6]  # the log of a resumed run has each step once
    m_full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    m_cut = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    for k in ("loss", "val_ppl@1", "val_ppl@3"):
        assert m_full[k] == m_cut[k]


def test_a_checkpoint_of_an_older_eexit_is_refused_for_resume_in_one_line(tmp_path):
    old = tmp_path / "old" / "checkpoint-3"
    old.mkdir(parents=True)
    (old / "trainer_state.pt").write_bytes(b"x")
    code, _, err = run_cli("train", *tiny_overrides(), "--out", str(tmp_path / "old"), "--resume")
    assert code == 2 and "older eexit" in err and "Traceback" not in err


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    code, _, err = run_cli(
        "train",
        *tiny_overrides(
            "train.lr=1e30",
            "train.warmup_steps=1",
            "train.save_every=1",
            "train.grad_clip=0",
            "train.steps=20",
        ),
        "--out",
        str(out),
    )
    assert code == 2
    line = message_lines(err)
    assert len(line) == 1 and "loss became" in line[0] and "last good checkpoint" in line[0]
    assert "Traceback" not in err
    kept = sorted(p.name for p in out.glob("checkpoint-*"))
    assert kept, "the checkpoint written before the NaN must survive"
    assert not (out / "model.safetensors").exists()


def test_existing_output_folder_is_not_overwritten(tmp_path, tiny_checkpoint):
    target = tmp_path / "exists"
    shutil.copytree(tiny_checkpoint, target)
    before = (target / "model.safetensors").read_bytes()
    code, _, err = run_cli("train", *tiny_overrides(), "--out", str(target))
    assert code == 2 and "already exists" in err and "--resume" in err
    assert (target / "model.safetensors").read_bytes() == before
    code, _, err = run_cli(
        "train", *tiny_overrides(), "--out", str(tmp_path / "nothing"), "--resume"
    )
    assert code == 2 and "no checkpoint found" in err
    # --overwrite is a swap: a new run stopped before its first checkpoint leaves the old run
    code, _, err = run_cli(
        "train", *tiny_overrides(), "--out", str(target), "--overwrite", "--stop-after", "2"
    )
    assert code == 0, err
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]  # no staging folder left
    # ... and one that reaches a checkpoint (save_every=3) replaces it
    code, _, err = run_cli(
        "train", *tiny_overrides(), "--out", str(target), "--overwrite", "--stop-after", "3"
    )
    assert code == 0, err
    assert not (target / "model.safetensors").exists() and not (target / "metrics.json").exists()
    assert (target / "checkpoint-3").is_dir()
    assert len((target / "train_log.jsonl").read_text().splitlines()) == 4  # 3 steps + 1 eval


@pytest.mark.slow
def test_two_process_run_matches_one_process_with_the_same_global_batch(tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU): each process takes half of the global batch,
    gradients are averaged, so the weights equal a 1-process run up to float rounding."""
    args = tiny_overrides("train.batch_size=4")
    code, _, err = run_cli("train", *args, "--out", str(tmp_path / "one"))
    assert code == 0, err
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "eexit.cli",
        "train",
        *args,
        "--out",
        str(tmp_path / "two"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "'processes': 2" in proc.stdout
    diff = max_diff(weights(tmp_path / "one"), weights(tmp_path / "two"))
    assert diff < 1e-5
    # and it is not trivially equal to a run with a different batch
    code, _, err = run_cli(
        "train", *tiny_overrides("train.batch_size=2"), "--out", str(tmp_path / "half")
    )
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "half")) > 1e-3


@pytest.mark.slow
def test_accelerate_launch_two_processes_match_one_and_a_silent_single_process_is_refused(
    tmp_path,
):
    """`accelerate launch --multi_gpu --num_processes 2` on CPUs (gloo) gives the weights of a
    1-process run; `--cpu --num_processes 2`, which accelerate runs as ONE process, is refused."""
    args = tiny_overrides("train.batch_size=4")
    code, _, err = run_cli("train", *args, "--out", str(tmp_path / "one"))
    assert code == 0, err
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = ACCELERATE_LAUNCH
    proc = subprocess.run(
        [
            *launch,
            "--multi_gpu",
            "--num_processes",
            "2",
            "--main_process_port",
            "29519",
            "-m",
            "eexit.cli",
            "train",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "'processes': 2" in proc.stdout
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) < 1e-5
    meta = json.loads((tmp_path / "two" / "eexit.json").read_text())
    assert meta["processes"] == 2
    # stopped at a checkpoint and resumed (accelerate's save_state / load_state, one RNG state
    # per process), the 2-process run ends with the uninterrupted one's weights
    for port, extra in (("29521", ["--stop-after", "3"]), ("29523", ["--resume"])):
        cut = [*launch, "--multi_gpu", "--num_processes", "2", "--main_process_port", port]
        cut += ["-m", "eexit.cli", "train", *args, "--out", str(tmp_path / "cut"), *extra]
        proc = subprocess.run(cut, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert (
        tmp_path / "cut" / "checkpoint-3" / "accelerate_state" / "random_states_1.pkl"
    ).is_file()
    assert max_diff(weights(tmp_path / "two"), weights(tmp_path / "cut")) == 0.0
    proc = subprocess.run(
        [
            *launch,
            "--cpu",
            "--num_processes",
            "2",
            "-m",
            "eexit.cli",
            "train",
            *args,
            "--out",
            str(tmp_path / "silent"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode != 0
    assert "asked for 2 processes but this run has 1" in proc.stderr


def test_progress_is_logged_as_timestamped_lines_when_not_on_a_terminal(tmp_path):
    code, out, err = run_cli(
        "train", *tiny_overrides("train.log_every=3"), "--out", str(tmp_path / "r")
    )
    assert code == 0, err
    steps = [ln for ln in err.splitlines() if "step " in ln and "tok/s" in ln]
    assert [ln.split("step ")[1].split(":")[0] for ln in steps] == ["3/6", "6/6"]
    assert all(LOG.match(ln) for ln in steps) and "about 0 s left" in steps[-1]
    assert "finished:" in out  # the result on stdout, progress on stderr


def test_gradient_accumulation_gives_the_weights_of_one_big_batch(tmp_path):
    """2 micro-batches of 2 windows per step = 1 batch of 4 (same global batch)."""
    code, _, err = run_cli("train", *tiny_overrides(), "--out", str(tmp_path / "one"))
    assert code == 0, err
    code, _, err = run_cli(
        "train", *tiny_overrides("train.grad_accum_steps=2"), "--out", str(tmp_path / "two")
    )
    assert code == 0, err
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    meta = json.loads((tmp_path / "two" / "eexit.json").read_text())
    assert meta["processes"] == 1 and meta["mixed_precision"] == "no"
    code, _, err = run_cli(
        "train", *tiny_overrides("train.grad_accum_steps=3"), "--out", str(tmp_path / "three")
    )
    assert code == 2 and "divisible by train.grad_accum_steps (3)" in err


def test_trackers_must_be_installed(tmp_path):
    code, _, err = run_cli(
        "train", *tiny_overrides("train.report_to=[tensorbored]"), "--out", str(tmp_path / "t")
    )
    assert code == 2 and "unknown tracker 'tensorbored'" in err
    # transformers Trainer's form, one name as a string, is the same list
    code, _, err = run_cli(
        "train", *tiny_overrides("train.report_to=tensorbored"), "--out", str(tmp_path / "t")
    )
    assert code == 2 and "unknown tracker 'tensorbored'" in err


def test_a_list_of_names_may_be_one_string():
    from eexit.config import RunConfig, fill_dataclass

    cfg = fill_dataclass(RunConfig(), {"train": {"report_to": "tensorboard, wandb"}})
    assert cfg.train.report_to == ["tensorboard", "wandb"]


def test_a_diverging_overwrite_leaves_the_old_run_as_it_was(tmp_path, tiny_checkpoint):
    """Issue reproduction: --overwrite of a good run by one whose loss becomes NaN before its
    first checkpoint: the NaN stop is clean and the old run is byte-identical."""
    target = tmp_path / "c"
    shutil.copytree(tiny_checkpoint, target)
    before = {str(p.relative_to(target)): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    code, _, err = run_cli(
        "train",
        *tiny_overrides(
            "train.lr=1e30",
            "train.warmup_steps=0",
            "train.grad_clip=0",
            "train.steps=20",
            "train.save_every=10",
        ),
        "--out",
        str(target),
        "--overwrite",
    )
    assert code == 2 and "loss became" in err and f"{target} is as it was before" in err
    after = {str(p.relative_to(target)): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no staging left


def test_train_places_itself_by_device_and_dtype(tmp_path):
    """`eexit train --device --dtype`: bfloat16 mixed precision on the CPU trains and is recorded;
    a device or precision the machine cannot honour is one line, exit 2, nothing written."""
    code, _, err = run_cli(
        "train", *tiny_overrides(), "--device", "cpu", "--dtype", "bfloat16",
        "--out", str(tmp_path / "bf16"),
    )  # fmt: skip
    assert code == 0, err
    meta = json.loads((tmp_path / "bf16" / "eexit.json").read_text())
    assert meta["mixed_precision"] == "bf16"
    bad = [(["--dtype", "float16"], "--dtype float16 trains on a GPU only")]
    if not torch.cuda.is_available():
        bad.append((["--device", "cuda"], "--device cuda"))
    for args, msg in bad:
        code, _, err = run_cli("train", *tiny_overrides(), *args, "--out", str(tmp_path / "x"))
        lines = message_lines(err)
        assert code == 2 and len(lines) == 1 and msg in lines[0], err
        assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "var, words",
    [
        ("ACCELERATE_USE_FSDP", "asked for FSDP, but accelerate shards only GPU processes"),
        ("ACCELERATE_USE_DEEPSPEED", "asked for DeepSpeed"),
    ],
)
def test_a_sharded_launch_the_cpu_cannot_honour_is_refused(tmp_path, monkeypatch, var, words):
    """accelerate 1.16 turns FSDP on for GPU processes only: `accelerate launch --use_fsdp` on
    CPUs would silently train plain DDP (seen: DDP's own warning under --use_fsdp). Refused in one
    line before any work; DeepSpeed is refused where it is not installed or on the CPU."""
    monkeypatch.setenv(var, "true")
    code, _, err = run_cli(
        "train", *tiny_overrides(), "--device", "cpu", "--out", str(tmp_path / "x")
    )
    lines = message_lines(err)
    assert code == 2 and len(lines) == 1 and words in lines[0], err
    assert not (tmp_path / "x").exists()
