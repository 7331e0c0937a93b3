import json

import pytest

from tests.conftest import message_lines, run_cli, tiny_overrides


def one_line_error(code, err):
    assert code == 2, err
    lines = message_lines(err)
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "args,expect",
    [
        (["train", "--loss", "weighted_ce"], "did you mean 'weighted-ce'"),
        (["train", "--set", "train.lrr=1"], "unknown config key 'train.lrr'"),
        (["train", "--set", "data.dataset=wiki"], "unknown dataset 'wiki'"),
        (["train", "--config", "nope.yaml"], "config file not found"),
        (["train", "--set", "lr"], "--set expects key=value"),
    ],
)
def test_train_bad_input(args, expect, tmp_path):
    code, _, err = run_cli(*args, "--out", str(tmp_path / "x"))
    assert expect in one_line_error(code, err)
    assert not (tmp_path / "x").exists()


def test_empty_config_and_empty_dataset_file(tmp_path):
    (tmp_path / "e.yaml").write_text("")
    code, _, err = run_cli("train", "--config", str(tmp_path / "e.yaml"))
    assert "is empty" in one_line_error(code, err)
    (tmp_path / "empty.txt").write_text("  \n")
    code, _, err = run_cli(
        "train",
        *tiny_overrides(f"data.dataset={tmp_path / 'empty.txt'}"),
        "--out",
        str(tmp_path / "o"),
    )
    assert "dataset file is empty" in one_line_error(code, err)


@pytest.mark.parametrize(
    "args,expect",
    [
        (["--policy", "maxprob"], "did you mean 'max-prob'"),
        (["--thresholds", "0.5:"], "malformed thresholds"),
        (["--thresholds", "0.5:1.5"], r"in [0, 1]"),
        (["--thresholds", "0.9:0.5"], "below the start"),
        (["--dataset", "nosuchcorpus"], "unknown dataset"),
        (["--split", "dev"], "unknown split 'dev'"),
    ],
)
def test_sweep_bad_input(args, expect, tiny_checkpoint, tmp_path):
    code, _, err = run_cli(
        "sweep", "--model", str(tiny_checkpoint), *args, "--out", str(tmp_path / "r")
    )
    assert expect in one_line_error(code, err)
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_model_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "folder").mkdir()
    code, _, err = run_cli("evaluate", "--model", str(tmp_path / "folder"))
    assert "not a model checkpoint" in one_line_error(code, err)
    code, _, err = run_cli("evaluate", "--model", str(tmp_path / "missing"))
    assert "not found" in one_line_error(code, err)


def test_evaluate_threshold_out_of_range(tiny_checkpoint):
    code, _, err = run_cli("evaluate", "--model", str(tiny_checkpoint), "--threshold", "1.5")
    assert "threshold must be in [0, 1]" in one_line_error(code, err)


def test_sweep_writes_tables_plot_and_provenance(tiny_checkpoint, tmp_path):
    out = tmp_path / "sweep"
    code, stdout, err = run_cli(
        "sweep",
        "--model",
        str(tiny_checkpoint),
        "--thresholds",
        "0.0:1.0:0.25",
        "--max-tokens",
        "1024",
        "--out",
        str(out),
    )
    assert code == 0, err
    for f in ("sweep.md", "sweep.csv", "sweep.json", "sweep.png", "provenance.json"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0
    data = json.loads((out / "sweep.json").read_text())
    assert [r["threshold"] for r in data] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert data[-1]["compute_pct"] == 100.0
    prov = json.loads((out / "provenance.json").read_text())
    assert list(prov["tables"]) == ["sweep", "frontier"]  # the oracle frontier beside it
    assert prov["tables"]["sweep"]["command"] == prov["command"]
    data = prov
    assert (
        data["command"].startswith("eexit sweep")
        and data["commit"]
        and data["config"]["policy"] == "max-prob"
    )
    md = (out / "sweep.md").read_text()
    assert "| Threshold | PPL | Compute%" in md and "command: `eexit sweep" in md
    assert (out / "sweep.csv").read_text().count("\n") == 6
    # a second run into the same folder refuses and leaves the results untouched
    before = (out / "sweep.json").read_text()
    code, _, err = run_cli("sweep", "--model", str(tiny_checkpoint), "--out", str(out))
    assert "already exists" in one_line_error(code, err)
    assert (out / "sweep.json").read_text() == before


def test_sweep_alias_and_evaluate_output(tiny_checkpoint, tmp_path):
    code, _, err = run_cli(
        "sweep-threshold",
        "--model",
        str(tiny_checkpoint),
        "--policy",
        "saturation",
        "--thresholds",
        "0.9,0.99",
        "--max-tokens",
        "512",
        "--out",
        str(tmp_path / "s"),
    )
    assert code == 0, err
    code, stdout, err = run_cli(
        "evaluate",
        "--model",
        str(tiny_checkpoint),
        "--policy",
        "static",
        "--param",
        "layer=2",
        "--max-tokens",
        "512",
        "--out",
        str(tmp_path / "e"),
    )
    assert code == 0, err
    row = json.loads((tmp_path / "e" / "evaluate.json").read_text())[0]
    assert row["exit@2_pct"] == 100.0 and row["compute_pct"] == pytest.approx(200 / 3)


@pytest.mark.parametrize(
    "args,expect",
    [
        (["--policy", "topk-saturation", "--param", "k=abc"], "bad parameter"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--seq-len", "500"], "--seq-len must be in 1..32"),
        (["--generate", "--prompt-len", "30", "--max-new-tokens", "8"], "must be <= 32"),
        (["--generate", "--max-new-tokens", "1"], "--max-new-tokens >= 2"),
        (["--calibrated", "nowhere"], "holds no calibrated.json"),
    ],
)
def test_evaluate_bad_numbers_and_params(tiny_checkpoint, args, expect):
    code, _, err = run_cli("evaluate", "--model", str(tiny_checkpoint), *args)
    assert expect in one_line_error(code, err)


def test_bad_training_numbers():
    for kv, msg in [
        ("train.save_every=0", "train.save_every must be >= 1"),
        ("train.keep_checkpoints=0", "keep_checkpoints must be >= 1"),
    ]:
        code, _, err = run_cli("train", "--set", kv)
        assert msg in one_line_error(code, err)


def test_version_and_completion():
    from eexit import __version__

    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"eexit {__version__}"
    code, out, _ = run_cli("--help")
    assert "--install-completion" in out


def test_help_lists_every_registered_name():
    from eexit.data.names import dataset_names
    from eexit.policies import POLICIES
    from eexit.training.losses import LOSSES

    _, sweep_help, _ = run_cli("sweep", "--help")
    _, train_help, _ = run_cli("train", "--help")
    # the help wraps at any hyphen ("topk-" / "saturation"): joined back before looking
    flat = " ".join(sweep_help.split()).replace("- ", "-")
    assert all(name in flat for name in POLICIES.names() + dataset_names())
    train_flat = " ".join(train_help.split()).replace("- ", "-")
    assert all(name in train_flat for name in LOSSES.names())
    assert "0.5:0.95" in flat and "a:b:step" in flat  # threshold syntax shown literally


def test_sweep_one_liner_takes_the_newest_checkpoint(tmp_path, tiny_checkpoint, monkeypatch):
    import os
    import shutil

    shutil.copytree(tiny_checkpoint, tmp_path / "checkpoints" / "older")
    shutil.copytree(tiny_checkpoint, tmp_path / "checkpoints" / "newer")
    old = tmp_path / "checkpoints" / "older" / "eexit.json"
    os.utime(old, (old.stat().st_atime, old.stat().st_mtime - 100))
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("sweep", "--thresholds", "0.5:0.95", "--max-tokens", "256")
    assert code == 0, err
    assert "using the newest checkpoint, checkpoints/newer" in err
    rows = json.loads((tmp_path / "results" / "sweep-newer-max-prob" / "sweep.json").read_text())
    assert [r["threshold"] for r in rows][:2] == [0.5, 0.55]
    shutil.rmtree(tmp_path / "checkpoints")
    code, _, err = run_cli("sweep", "--thresholds", "0.5:0.95")
    assert code == 2 and "no --model given and no trained checkpoint" in err


def test_every_option_a_mode_ignores_is_refused_in_one_line(tiny_checkpoint, tmp_path):
    """IGNORED_BY_MODE: each option a mode does not use is refused, naming the mode, exit 2,
    before any work; the same command without it is not refused for it."""
    from eexit.cli_options import IGNORED_BY_MODE

    given = {
        "--policy": ["--policy", "margin"],
        "--threshold": ["--threshold", "0.5"],
        "--kv": ["--kv", "recompute"],
        "--min-exit-layer": ["--min-exit-layer", "2"],
        "--param": ["--param", "decay_tau=2"],
        "--calibrated": ["--calibrated", str(tmp_path)],
        "--thresholds": ["--thresholds", "0.2,0.4"],
        "--epsilon": ["--epsilon", "0.1"],
        "--delta": ["--delta", "0.2"],
        "--risk": ["--risk", "loss"],
        "--grid": ["--grid", "0:1:0.1"],
        "--method": ["--method", "free"],
        "--zeta": ["--zeta", "0.5"],
        "--free-grid": ["--free-grid", "0.3,0.6"],
        "--free-fit": ["--free-fit", "em"],
        "--test-split": ["--test-split", "validation"],
        "--prompts": ["--prompts", "4"],
        "--test-prompts": ["--test-prompts", "4"],
        "--prompt-len": ["--prompt-len", "8"],
        "--max-new-tokens": ["--max-new-tokens", "8"],
        "--repeats": ["--repeats", "2"],
        "--max-tokens": ["--max-tokens", "512"],
    }
    calibrate = ["calibrate", "--model", str(tiny_checkpoint)]
    base = {
        ("evaluate", "--mode self-spec"): [
            "evaluate", "--model", str(tiny_checkpoint), "--generate", "--mode", "self-spec",
        ],
        ("sweep", "a threshold-free policy"): [
            "sweep", "--model", str(tiny_checkpoint), "--policy", "oracle",
        ],
        ("calibrate", "--fit and no --policy"): [*calibrate, "--fit", "meta"],  # refused first
        ("calibrate", "a token-level risk"): [*calibrate, "--policy", "max-prob"],
        ("calibrate", "a sequence-level risk and no --fit"): [
            *calibrate, "--policy", "max-prob", "--risk", "sequence-mismatch",
        ],
    }  # fmt: skip
    assert set(base) == set(IGNORED_BY_MODE)
    for key, options in IGNORED_BY_MODE.items():
        for flag in options.values():
            code, _, err = run_cli(*base[key], *given[flag], "--out", str(tmp_path / "x"))
            lines = message_lines(err)
            assert code == 2 and len(lines) == 1, err
            assert lines[0].startswith(f"error: {flag} has no effect with {key[1]}"), lines[0]
            assert not (tmp_path / "x").exists()


def test_calibrate_keeps_the_options_its_mode_reads(tiny_checkpoint, tmp_path):
    """The refusals above do not reach what each mode uses: the sequence options under a
    sequence risk, --max-tokens when classifiers are fitted."""
    code, _, err = run_cli(
        "calibrate", "--model", str(tiny_checkpoint), "--policy", "max-prob", "--risk",
        "sequence-mismatch", "--prompts", "3", "--test-prompts", "3", "--prompt-len", "4",
        "--max-new-tokens", "4", "--epsilon", "0.5", "--delta", "0.5", "--out", str(tmp_path / "s"),
    )  # fmt: skip
    assert code == 0, err
    import shutil

    own = shutil.copytree(tiny_checkpoint, tmp_path / "ck")  # the fit writes beside the model
    code, _, err = run_cli(
        "calibrate", "--model", str(own), "--fit", "meta", "--max-tokens", "512",
        "--out", str(tmp_path / "f"),
    )  # fmt: skip
    assert code == 0, err


@pytest.mark.parametrize(
    "args, flags",
    [
        (["evaluate", "--examples", "3"], "--examples"),
        (["evaluate", "--max-new-tokens", "4"], "--max-new-tokens"),
        (["sweep", "--thresholds", "0.5", "--examples", "3", "--max-new-tokens", "4"],
         "--examples, --max-new-tokens"),
        (["evaluate", "--generate", "--examples", "3"], "--examples"),
    ],
)  # fmt: skip
def test_task_only_options_on_an_lm_dataset_are_refused(tiny_checkpoint, tmp_path, args, flags):
    code, _, err = run_cli(*args, "--model", str(tiny_checkpoint), "--out", str(tmp_path / "x"))
    lines = message_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: {flags}: for task datasets only"), lines[0]
    assert "language-modelling dataset" in lines[0]
    assert not (tmp_path / "x").exists()
