"""The GPU check cannot rot (issue 17): its CPU dry run (`scripts/gpu_check.sh --device cpu --tiny
--no-install` on the tiny trained checkpoint, no SmolLM2 load) runs the identity checks in float32
and bfloat16 and the decoding benchmark, and writes tables whose provenance names the device and
dtype; and the identity check fails when eexit's side is wrong (a check that cannot fail is
worthless)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def gpu_check(model: Path, out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, list]:
    """Run the script on the CPU with this interpreter's venv; (process, its IDENTITY records)."""
    env = {**os.environ, "VENV": str(Path(sys.executable).parent.parent)}
    args = ["--device", "cpu", "--tiny", "--no-install", "--model", str(model), "--out", str(out)]
    args += ["--threads", "1"]  # one thread: fast and steady on a shared machine
    proc = subprocess.run(
        ["bash", str(SCRIPT), *args, *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    records = [
        json.loads(line.removeprefix("IDENTITY "))
        for line in proc.stdout.splitlines()
        if line.startswith("IDENTITY ")
    ]
    return proc, records


def test_cpu_dry_run_checks_identities_and_writes_tables_with_provenance(tiny_checkpoint, tmp_path):
    out = tmp_path / "gpu"
    proc, records = gpu_check(tiny_checkpoint, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # every identity ran, in both dtypes, and held
    checks = {(r["check"].split(" ")[0], r["dtype"], r["batch"]) for r in records}
    for dtype in ("float32", "bfloat16"):
        for batch in (1, 2):
            assert ("never-exit", dtype, batch) in checks
            assert ("self-speculative", dtype, batch) in checks
        assert ("exit-table", dtype, 4) in checks
    assert all(r["verdict"] in ("identical", "equal", "equal up to ties") for r in records)
    assert all(r["device"] == "cpu" for r in records)
    f32 = [r for r in records if r["dtype"] == "float32" and "PPL" not in r["check"]]
    assert all(r["verdict"] == "identical" and r["equal_tokens_pct"] == 100.0 for r in f32)
    assert json.loads((out / "identity.json").read_text()) == records
    # the decoding benchmark, side by side at two batch sizes
    rows = json.loads((out / "decoding.json").read_text())
    names = {r["decoder"] for r in rows}
    assert {"transformers greedy generate", "eexit full depth"} <= names
    assert any(n.startswith("eexit early exit, max-prob @") for n in names)
    assert any(n.startswith("eexit self-speculative") for n in names)
    assert any("assistant_early_exit" in n for n in names)  # GPT-2: a row saying it cannot run
    timed = [r for r in rows if "tokens_per_s" in r]
    assert {r["batch"] for r in timed} == {1, 2}
    assert all(r["device"] == "cpu" and r["dtype"] == "float32" for r in timed)
    assert all(r["tokens_per_s"] > 0 for r in timed)
    full = [r for r in timed if r["decoder"] == "eexit full depth"]
    assert all(r["agreement_pct"] == 100.0 for r in full)
    # provenance: the device and dtype of each table
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["config"]["device"] == "cpu" and prov["config"]["attention"] == "sdpa"
    tables = prov["tables"]
    assert tables["decoding"]["config"]["dtype"] == "float32"
    assert tables["identity"]["config"]["dtype"] == "float32,bfloat16"
    assert "gpu_check.py" in tables["decoding"]["command"]
    for name in ("identity", "decoding"):
        md = (out / f"{name}.md").read_text()
        assert "## Provenance" in md and '"device": "cpu"' in md


def test_the_identity_check_fails_on_a_wrong_model(tiny_checkpoint, tmp_path):
    out = tmp_path / "gpu"
    proc, records = gpu_check(
        tiny_checkpoint, out, "--inject-mismatch", "--identity-dtypes", "float32"
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "identity check(s) FAILED" in proc.stderr
    assert records and all(r["verdict"] == "FAIL" for r in records)
    assert {r["check"].split(" ")[0] for r in records} == {
        "never-exit",
        "self-speculative",
        "exit-table",
    }
    assert json.loads((out / "identity.json").read_text()) == records  # the failure is kept
    assert not (out / "decoding.json").exists()  # no benchmark of a wrong decoder


def test_an_unavailable_device_is_one_line_exit_2(tiny_checkpoint, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = {**os.environ, "VENV": str(Path(sys.executable).parent.parent)}
    args = ["--no-install", "--tiny", "--model", str(tiny_checkpoint), "--out", str(tmp_path)]
    proc = subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "--device cuda" in errors[0] and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize("args", [["--model"], ["--out", "--tiny"], ["--prompts"]])
def test_an_option_without_its_value_is_one_line_exit_2(args, tmp_path):
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--no-install", *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"gpu_check.sh: {args[0]} needs a value (see --help)"
    assert not any(tmp_path.iterdir())


def test_an_existing_out_is_kept_unless_overwrite_and_then_replaced_whole(
    tiny_checkpoint, tmp_path
):
    """The GPU check writes its folder like every eexit command: refused before any work when it
    exists (nothing touched), replaced as a unit with --overwrite (staged under a lock)."""
    out = tmp_path / "gpu"
    out.mkdir()
    (out / "old.md").write_text("an earlier run")
    proc, records = gpu_check(tiny_checkpoint, out, "--identity-only")
    assert proc.returncode == 2 and not records  # no identity check ran
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "--overwrite" in errors[0] and "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["old.md"]
    proc, records = gpu_check(
        tiny_checkpoint, out, "--identity-only", "--identity-dtypes", "float32", "--overwrite"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert records and (out / "identity.json").is_file() and not (out / "old.md").exists()
    assert (out / "complete.json").is_file()  # written as a unit
