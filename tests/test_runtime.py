"""Where a command runs: device and dtype validated before any model loads (one line, exit 2),
every command in bfloat16 on the CPU, float32 scores whatever the weights' dtype, logits in token
chunks (the same table whatever the chunk), and contiguous process shards that restore one
process's order."""

from __future__ import annotations

import json

import pytest
import torch

from eexit.errors import EexitError
from eexit.runtime import Runtime, logits_chunk_tokens, parse_device, parse_dtype
from tests.conftest import message_lines, run_cli


def test_auto_is_the_cpu_in_float32_on_this_machine():
    dev = parse_device("auto")
    assert dev.type == "cpu"
    assert parse_dtype("auto", dev) == torch.float32
    assert parse_dtype("bfloat16", dev) == torch.bfloat16


@pytest.mark.parametrize(
    "spec, words",
    [
        ("cuda", "no CUDA GPU"),
        ("cuda:7", "no CUDA GPU"),
        ("tpu", "unknown --device"),
        ("gpu0", "unknown --device"),
        ("cpu:1", "one CPU device"),
    ],
)
def test_an_unavailable_or_unknown_device_is_one_line(spec, words):
    with pytest.raises(EexitError, match=words):
        parse_device(spec)


def test_an_unknown_dtype_is_refused_with_the_valid_ones():
    with pytest.raises(EexitError, match="valid: auto, float32, bfloat16, float16"):
        parse_dtype("float64", torch.device("cpu"))


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_contiguous_shards_cover_every_item_once_in_order(world):
    for n in (0, 1, 4, 7, 13):
        blocks = [list(Runtime(rank=r, world=world).shard(n)) for r in range(world)]
        assert [i for b in blocks for i in b] == list(range(n))


def test_the_chunk_follows_the_vocabulary():
    small, large = logits_chunk_tokens(1000, "cpu"), logits_chunk_tokens(128_000, "cpu")
    assert large < small
    # a 128k vocabulary: at most 1 GiB of logits and their float32 copies at a time
    assert large * 128_000 * 4 * 4 <= 2**30


@pytest.mark.parametrize(
    "command",
    [
        ["evaluate"],
        ["sweep", "--thresholds", "0.5"],
        ["calibrate", "--policy", "max-prob"],
        ["analyze-monotonicity"],
    ],
)
@pytest.mark.parametrize(
    "option, words",
    [
        (["--device", "cuda"], "--device cuda: this machine has no CUDA GPU"),
        (["--device", "cuda:7"], "--device cuda:7: this machine has no CUDA GPU"),
        (["--dtype", "float64"], "unknown --dtype 'float64'"),
    ],
)
def test_bad_placement_is_refused_before_the_model_loads(
    command, option, words, tiny_checkpoint, tmp_path, monkeypatch
):
    import eexit.evaluation.context as context  # imported before patching: restored after

    def never(*_a, **_k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(context, "load_model", never)
    out = tmp_path / "out"
    code, _, err = run_cli(*command, "-m", str(tiny_checkpoint), *option, "--out", str(out))
    assert code == 2, err
    lines = message_lines(err)
    assert len(lines) == 1 and words in lines[0], err
    assert not out.exists()


def _rows(folder, name):
    return json.loads((folder / f"{name}.json").read_text())


def _runtime_of(folder):
    prov = json.loads((folder / "provenance.json").read_text())
    table = next(iter(prov["tables"].values()))
    config = table["config"]
    return config.get("runtime") or config["data"][0].get("runtime")


def test_every_command_runs_in_bfloat16_on_the_cpu(tiny_checkpoint, tmp_path):
    """bfloat16 weights, float32 scores: the numbers stay close to float32's and are finite."""
    m = str(tiny_checkpoint)
    common = ["-m", m, "--max-tokens", "512"]
    for dtype in ("float32", "bfloat16"):
        code, _, err = run_cli(
            "sweep", *common, "--thresholds", "0.3,0.9", "--dtype", dtype,
            "--out", str(tmp_path / f"sweep-{dtype}"),
        )  # fmt: skip
        assert code == 0, err
    f32, b16 = (
        _rows(tmp_path / "sweep-float32", "sweep"),
        _rows(tmp_path / "sweep-bfloat16", "sweep"),
    )
    assert _runtime_of(tmp_path / "sweep-bfloat16")["dtype"] == "bfloat16"
    assert _runtime_of(tmp_path / "sweep-float32")["dtype"] == "float32"
    for a, b in zip(f32, b16):
        assert b["ppl"] == pytest.approx(a["ppl"], rel=0.05)
        assert b["compute_pct"] == pytest.approx(a["compute_pct"], abs=15)
    assert f32[0]["ppl"] != b16[0]["ppl"]  # the bf16 run did run in bf16

    code, _, err = run_cli(
        "evaluate", *common, "--dtype", "bfloat16", "--out", str(tmp_path / "ev")
    )
    assert code == 0, err
    assert _runtime_of(tmp_path / "ev")["dtype"] == "bfloat16"
    code, _, err = run_cli(
        "evaluate", "-m", m, "--generate", "--prompts", "2", "--prompt-len", "8",
        "--max-new-tokens", "6", "--dtype", "bfloat16", "--out", str(tmp_path / "gen"),
    )  # fmt: skip
    assert code == 0, err
    assert _runtime_of(tmp_path / "gen")["dtype"] == "bfloat16"
    code, _, err = run_cli(
        "calibrate", *common, "--policy", "max-prob", "--epsilon", "0.2", "--dtype", "bfloat16",
        "--out", str(tmp_path / "cal"),
    )  # fmt: skip
    assert code == 0, err
    summary = _rows(tmp_path / "cal", "calibration")[0]
    assert _runtime_of(tmp_path / "cal")["dtype"] == "bfloat16"
    assert summary["calibration_tokens"] > 0
    code, _, err = run_cli(
        "analyze-monotonicity", *common, "--dtype", "bfloat16", "--out", str(tmp_path / "mono"),
    )  # fmt: skip
    assert code == 0, err
    assert _runtime_of(tmp_path / "mono")["dtype"] == "bfloat16"
    rows = _rows(tmp_path / "mono", "per_layer")
    assert all(0 <= r["top1_equals_final"] <= 100 for r in rows)


def test_the_exit_table_is_the_same_whatever_the_logits_chunk(tiny_checkpoint):
    from eexit.evaluation.context import EvalRequest, lm_windows, open_context
    from eexit.evaluation.records import collect_exit_table

    ctx = open_context(EvalRequest(model=str(tiny_checkpoint), max_tokens=300, policy="entropy"))
    x, y, _ = lm_windows(ctx)
    whole = collect_exit_table(ctx.model, x, y, ctx.policy, 4, chunk_tokens=10_000)
    chunked = collect_exit_table(ctx.model, x, y, ctx.policy, 4, chunk_tokens=7)
    assert torch.equal(whole.top1, chunked.top1)
    assert torch.allclose(whole.nll, chunked.nll, atol=1e-5)
    assert torch.allclose(whole.score, chunked.score, atol=1e-5)
    assert torch.equal(whole.positions, chunked.positions)


def test_bfloat16_weights_give_float32_scores(tiny_checkpoint):
    from eexit.evaluation.context import EvalRequest, lm_windows, open_context
    from eexit.evaluation.records import collect_exit_table

    ctx = open_context(EvalRequest(model=str(tiny_checkpoint), max_tokens=64, dtype="bfloat16"))
    assert next(ctx.model.parameters()).dtype == torch.bfloat16
    x, y, _ = lm_windows(ctx)
    table = collect_exit_table(ctx.model, x, y, ctx.policy, 4, ctx.runtime)
    assert table.nll.dtype == torch.float32 and table.score.dtype == torch.float32
    assert torch.isfinite(table.nll).all()


def test_training_takes_bf16_mixed_precision_from_accelerate_and_records_it(tmp_path):
    """`accelerate launch --mixed_precision bf16` sets ACCELERATE_MIXED_PRECISION: the run trains
    under bf16 autocast (on the CPU too) and its checkpoint says so. A fresh process: accelerate's
    state is process-wide."""
    import os
    import subprocess
    import sys

    from tests.conftest import tiny_overrides

    out = tmp_path / "bf16"
    env = dict(os.environ, ACCELERATE_MIXED_PRECISION="bf16", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "eexit.cli", "train", *tiny_overrides("train.steps=3")]
    proc = subprocess.run(
        [*cmd, "--out", str(out)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((out / "eexit.json").read_text())
    assert meta["mixed_precision"] == "bf16"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
