"""The decoding benchmark (benchmarks/adapted_decoding.py) writes like every eexit command: an
existing --out is refused before any work unless --overwrite, bad input is one line with exit
code 2 and nothing is written."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "adapted_decoding.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "already exists; pass --overwrite"),
        (["--overwrite", "--drafts", "1:x"], "--drafts '1:x': use layer:length[:K]"),
        (["--overwrite", "--calibrated", "{tmp}/none"], "holds no calibrated.json"),
    ],
)
def test_bad_input_is_one_line_and_the_old_folder_is_kept(
    tiny_checkpoint, tmp_path, extra, message
):
    out = tmp_path / "decoding"
    out.mkdir()
    (out / "old.md").write_text("an earlier run")
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    proc = run("--model", str(tiny_checkpoint), "--out", str(out), "--drafts", "1:2", *extra)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["old.md"]
