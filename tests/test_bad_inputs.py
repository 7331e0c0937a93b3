"""Bad inputs and faults across every subcommand, table-driven: each case must end with exit
code 2, one line on stderr starting with "error:", no traceback, and leave every file that
existed before byte-identical (no staging folder or lock left behind either)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import message_lines, run_cli, tiny_overrides

TINY_TRAIN = tiny_overrides()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_checkpoint) -> Path:
    """A work folder: a checkpoint, corrupt copies of it, an existing results folder, a file."""
    w = tmp_path_factory.mktemp("world")
    ck = w / "ck"
    shutil.copytree(tiny_checkpoint, ck)
    for name in ("trunc", "empty", "badmeta", "listmeta", "badcfg", "nan", "badconfigjson"):
        shutil.copytree(tiny_checkpoint, w / name)
    weights = (w / "trunc" / "model.safetensors").read_bytes()
    (w / "trunc" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (w / "empty" / "model.safetensors").write_bytes(b"")
    (w / "badmeta" / "eexit.json").write_text("{not json")
    (w / "listmeta" / "eexit.json").write_text("[1, 2]")
    meta = json.loads((w / "badcfg" / "eexit.json").read_text())
    meta["train_config"]["train"]["stepz"] = 3
    (w / "badcfg" / "eexit.json").write_text(json.dumps(meta))
    (w / "badconfigjson" / "config.json").write_text("{")
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(w / "nan" / "model.safetensors"))
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = torch.full_like(state[first], float("nan"))
    save_file(state, str(w / "nan" / "model.safetensors"), metadata={"format": "pt"})
    (w / "res").mkdir()
    (w / "res" / "sweep.md").write_text("an earlier result")
    (w / "file.txt").write_text("a file, not a folder")
    (w / "cal").mkdir()
    (w / "cal" / "calibrated.json").write_text('{"policy": "margin"}')
    (w / "badcal").mkdir()
    (w / "badcal" / "calibrated.json").write_text("{oops")
    (ck / "exit_classifiers").mkdir()
    (ck / "exit_classifiers" / "meta.pt").write_bytes(b"a fitted classifier")
    (w / "empty.txt").write_text("  \n")
    (w / "bad.yaml").write_text("model: [unclosed")
    (w / "list.yaml").write_text("- 1\n- 2\n")
    (w / "blank.yaml").write_text("")
    return w


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "/"
        for p in sorted(root.rglob("*"))
    }


M = ["--model", "{ck}"]
EV = ["evaluate", *M, "--max-tokens", "256"]
SW = ["sweep", *M, "--max-tokens", "256"]
CAL = ["calibrate", *M, "--max-tokens", "2048"]
AN = ["analyze-monotonicity", *M, "--max-tokens", "256"]
TR = ["train", *TINY_TRAIN, "--out", "{tmp}/new-run"]

CASES = [
    # ---- train: config
    (["train", "--loss", "weighted_ce"], "did you mean 'weighted-ce'"),
    (["train", "--loss", "nope"], "unknown loss 'nope'"),
    ([*TR, "--set", "train.lrr=1"], "unknown config key 'train.lrr'"),
    ([*TR, "--set", "modle.n_layers=2"], "unknown config key 'modle'"),
    ([*TR, "--set", "train.betas=0.9"], "'train.betas' must be a list"),
    ([*TR, "--set", "train.betas=[2,3]"], "train.betas must be two numbers in [0, 1)"),
    ([*TR, "--set", "train.betas=[0.9]"], "train.betas must be two numbers"),
    ([*TR, "--set", "model.dropout=2"], "model.dropout must be in [0, 1)"),
    ([*TR, "--set", "train.steps=3.5"], "'train.steps' must be a whole number"),
    ([*TR, "--set", "train.steps=0"], "must be positive"),
    ([*TR, "--set", "train.lr=abc"], "'train.lr' must be a number"),
    ([*TR, "--set", "train.lr=0"], "must be positive"),
    ([*TR, "--set", "train.lr=.nan"], "must be a finite number"),
    ([*TR, "--set", "train.min_lr_ratio=-1"], "train.min_lr_ratio must be in [0, 1]"),
    ([*TR, "--set", "train.warmup_steps=-1"], "train.warmup_steps must be >= 0"),
    ([*TR, "--set", "train.save_every=0"], "train.save_every must be >= 1"),
    ([*TR, "--set", "train.weight_decay=-0.1"], "must be >= 0"),
    ([*TR, "--set", "model.n_layers=true"], "'model.n_layers' must be a number"),
    ([*TR, "--set", "model.n_layers=0"], "model.n_layers must be positive"),
    ([*TR, "--set", "model.arch=gpt3"], "unknown model family 'gpt3'"),
    ([*TR, "--set", "model.exit_heads=many"], "model.exit_heads must be shared, separate or lens"),
    ([*TR, "--set", "model.n_heads=3"], "must be divisible by model.n_heads"),
    ([*TR, "--set", "data.seq_len=500"], "data.seq_len must be in 2..model.max_len"),
    ([*TR, "--set", "loss.exit_token_fraction=0"], "loss.exit_token_fraction must be in (0, 1]"),
    ([*TR, "--set", "model.min_exit_layer=0"], "model.min_exit_layer must be >= 1"),
    ([*TR, "--set", "train.layer_dropout=1"], "train.layer_dropout must be in [0, 1)"),
    ([*TR, "--set", "train.layer_dropout_scale=log"], "must be one of exp, linear, uniform"),
    ([*TR, "--set", "model.lora_rank=-1"], "model.lora_rank must be >= 0"),
    (
        [*TR, "--set", "model.lora_rank=2", "--set", "model.lora_targets=[qproj]"],
        "model.lora_targets ['qproj'] match no layer of the model",
    ),
    (
        ["train", "--loss", "layerskip", *TINY_TRAIN, "--set", "loss.params.rotation=0"],
        "loss.params.rotation must be >= 1",
    ),
    ([*TR, "--set", "seed=-1"], "seed must be >= 0"),
    ([*TR, "--set", "data.dataset=wiki"], "unknown dataset 'wiki'"),
    ([*TR, "--set", "data.dataset={tmp}/empty.txt"], "dataset file is empty"),
    ([*TR, "--set", "data.dataset={tmp}/missing.txt"], "not found"),
    ([*TR, "--set", "data.seq_len=[1]"], "'data.seq_len' must be a number"),
    ([*TR, "--set", "data.dataset=[1]"], "'data.dataset' must be a string"),
    ([*TR, "--loss", "free-kd", "--set", "loss.params.kd_mapping=near"], "kd_mapping must be one"),
    ([*TR, "--loss", "free-kd", "--set", "loss.params.kd_weigth=1"], "did you mean"),
    ([*TR, "--set", "loss.params.ponder_beta=1"], "unknown config key 'loss.params.ponder_beta'"),
    ([*TR, "--set", "lr"], "--set expects key=value"),
    (["train", "--config", "{tmp}/nope.yaml"], "config file not found"),
    (["train", "--config", "{tmp}/bad.yaml"], "is not valid YAML"),
    (["train", "--config", "{tmp}/list.yaml"], "must hold a mapping"),
    (["train", "--config", "{tmp}/blank.yaml"], "is empty"),
    # ---- train: output folder, resume, stop
    (["train", *TINY_TRAIN, "--out", "{ck}"], "already exists; pass --resume"),
    (["train", *TINY_TRAIN, "--out", "{tmp}/file.txt"], "is a file"),
    (["train", *TINY_TRAIN, "--out", "{tmp}/nothing", "--resume"], "no checkpoint found"),
    ([*TR, "--stop-after", "-5"], "--stop-after must be >= 1"),
    ([*TR, "--stop-after", "0"], "--stop-after must be >= 1"),
    # ---- evaluate
    ([*EV, "--policy", "max_prob"], "did you mean 'max-prob'"),
    ([*EV, "--policy", "nope"], "unknown policy 'nope'"),
    ([*EV, "--threshold", "1.5"], "threshold must be in [0, 1]"),
    ([*EV, "--threshold", "-0.1"], "threshold must be in [0, 1]"),
    ([*EV, "--policy", "topk-saturation", "--param", "k=abc"], "bad parameter"),
    ([*EV, "--policy", "topk-saturation", "--param", "k=0"], "k must be >= 1"),
    ([*EV, "--policy", "patience", "--param", "patience=0"], "patience must be >= 1"),
    ([*EV, "--param", "k=3"], "takes no parameter"),
    ([*EV, "--param", "k"], "--set expects key=value"),
    ([*EV, "--policy", "static", "--param", "layer=99"], "beyond the model's 3 layers"),
    ([*EV, "--policy", "static", "--param", "layer=0"], "layer must be >= 1"),
    ([*EV, "--param", "decay_tau=-1"], "decay_tau must be >= 0"),
    ([*EV, "--min-exit-layer", "0"], "min_exit_layer must be >= 1"),
    ([*EV, "--min-exit-layer", "99"], "--min-exit-layer 99 is beyond the model's 3 layers"),
    ([*EV, "--batch-size", "0"], "--batch-size must be >= 1"),
    ([*EV, "--max-tokens", "0"], "--max-tokens must be >= 1"),
    ([*EV, "--seq-len", "500"], "--seq-len must be in 1..32"),
    ([*EV, "--seq-len", "0"], "--seq-len must be in 1..32"),
    ([*EV, "--split", "dev"], "unknown split 'dev'"),
    ([*EV, "--dataset", "wiki"], "unknown dataset 'wiki'"),
    ([*EV, "--dataset", "{tmp}/empty.txt"], "dataset file is empty"),
    ([*EV, "--exit-layers", "a,b"], "exit layers must be 'all' or a comma list"),
    ([*EV, "--exit-layers", "9"], "exit layers must be integers in 1..3"),
    ([*EV, "--policy", "meta"], "cannot load exit classifier"),  # a corrupt meta.pt
    ([*EV, "--policy", "lstm", "--param", "classifier={tmp}/file.txt"], "cannot load exit class"),
    ([*EV, "--policy", "halting-cdf"], "needs a model trained with --loss ponder"),
    ([*EV, "--out", "{tmp}/res"], "already exists; pass --overwrite"),
    ([*EV, "--out", "{tmp}/file.txt"], "is a file, not a folder"),
    ([*EV, "--out", "{tmp}/file.txt/sub"], "is a file, not a folder"),
    ([*EV, "--calibrated", "{tmp}/nothing"], "holds no calibrated.json"),
    ([*EV, "--calibrated", "{tmp}/cal"], "is not a calibration result (missing threshold"),
    ([*EV, "--calibrated", "{tmp}/badcal"], "is not a calibration result"),
    ([*EV, "--generate", "--kv", "copy"], "unknown KV mode 'copy'"),
    ([*EV, "--generate", "--prompts", "0"], "--prompts and --prompt-len must be >= 1"),
    ([*EV, "--generate", "--max-new-tokens", "0"], "--max-new-tokens >= 2"),
    ([*EV, "--generate", "--max-new-tokens", "1"], "--max-new-tokens >= 2"),
    ([*EV, "--generate", "--rounds", "0"], "--rounds must be in 1..100"),
    ([*EV, "--generate", "--prompt-len", "30"], "must be <= 32 (the model's positions)"),
    ([*EV, "--dataset", "aclsum", "--examples", "0"], "--examples and --batch-size must be >= 1"),
    ([*EV, "--dataset", "aclsum", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    ([*EV, "--dataset", "aclsum", "--kv", "copy"], "unknown KV mode 'copy'"),
    ([*EV, "--dataset", "aclsum", "--generate"], "--generate decodes LM prompts"),
    # ---- models: missing, not a checkpoint, corrupt
    (["evaluate", "--model", "{tmp}/nope"], "model checkpoint not found"),
    (["evaluate", "--model", "{tmp}/file.txt"], "is not a model checkpoint"),
    (["evaluate", "--model", "{tmp}/res"], "is not a model checkpoint"),
    (["evaluate", "--model", "{tmp}/missing.gguf"], "GGUF file not found"),
    (["evaluate", "--model", "{tmp}/trunc"], "could not load model"),
    (["evaluate", "--model", "{tmp}/empty"], "could not load model"),
    (["evaluate", "--model", "{tmp}/badconfigjson"], "could not load model"),
    (["evaluate", "--model", "{tmp}/badmeta"], "eexit.json is not valid JSON"),
    (["evaluate", "--model", "{tmp}/listmeta"], "eexit.json is not valid JSON (not a JSON object"),
    (["evaluate", "--model", "{tmp}/badcfg"], "unknown config key 'train.stepz'"),
    (["evaluate", "--model", "{tmp}/nan", "--max-tokens", "256"], "non-finite (NaN / inf) weights"),
    (["sweep", "--model", "{tmp}/nan", "--out", "{tmp}/nanres"], "non-finite (NaN / inf) weights"),
    (["sweep", "--model", "{tmp}/trunc", "--out", "{tmp}/x"], "could not load model"),
    (["analyze-monotonicity", "--model", "{tmp}/empty", "--out", "{tmp}/x"], "could not load"),
    # ---- sweep
    ([*SW, "--thresholds", "a:b"], "malformed thresholds 'a:b'"),
    ([*SW, "--thresholds", "0.5:0.1"], "the end is below the start"),
    ([*SW, "--thresholds", "0:1:0"], "the step must be positive"),
    ([*SW, "--thresholds", "0:1:-0.1"], "the step must be positive"),
    ([*SW, "--thresholds", "0:1:1e-7"], "at most 10001"),
    ([*SW, "--thresholds", "0:1:2:3"], "malformed thresholds"),
    ([*SW, "--thresholds", ""], "empty thresholds"),
    ([*SW, "--thresholds", ","], "empty thresholds"),
    ([*SW, "--thresholds", "1.5"], "thresholds must lie in [0, 1]"),
    ([*SW, "--thresholds", "0.5,x"], "'x' is not a number"),
    ([*SW, "--out", "{tmp}/res"], "already exists; pass --overwrite"),
    ([*SW, "--policy", "entropi", "--out", "{tmp}/x"], "did you mean 'entropy'"),
    ([*SW, "--split", "dev", "--out", "{tmp}/x"], "unknown split 'dev'"),
    # ---- calibrate
    (["calibrate", *M], "nothing to do"),
    ([*CAL, "--fit", "svm"], "unknown exit classifier 'svm'"),
    ([*CAL, "--fit", "meta"], "already holds fitted meta; pass --overwrite"),
    ([*CAL, "--fit", "lstm", "--label", "odd"], "unknown label 'odd'"),
    ([*CAL, "--policy", "static"], "has no threshold to calibrate"),
    ([*CAL, "--policy", "oracle"], "has no threshold to calibrate"),
    ([*CAL, "--policy", "margin", "--risk", "tail"], "unknown risk 'tail'"),
    ([*CAL, "--policy", "margin", "--epsilon", "0"], "epsilon and delta must lie in (0, 1)"),
    ([*CAL, "--policy", "margin", "--delta", "1"], "epsilon and delta must lie in (0, 1)"),
    ([*CAL, "--policy", "margin", "--grid", "1:0"], "the end is below the start"),
    (["calibrate", *M, "--policy", "margin", "--max-tokens", "10"], "needs at least 45"),
    ([*CAL, "--policy", "margin", "--out", "{tmp}/res"], "already exists; pass --overwrite"),
    ([*CAL, "--policy", "margin", "--out", "{tmp}/file.txt"], "is a file, not a folder"),
    ([*CAL, "--policy", "margin", "--split", "dev"], "unknown split 'dev'"),
    ([*CAL, "--policy", "nope"], "unknown policy 'nope'"),
    (
        [
            "calibrate",
            *M,
            "--policy",
            "margin",
            "--risk",
            "sequence-mismatch",
            "--repeats",
            "1000000000",
        ],
        "--repeats must be in 0..10000",
    ),
    (
        [
            "calibrate",
            *M,
            "--policy",
            "margin",
            "--risk",
            "sequence-mismatch",
            "--prompts",
            "1000000",
        ],
        "--prompts must be at most 100000",
    ),
    (["calibrate", "--model", "{tmp}/nope", "--policy", "margin"], "model checkpoint not found"),
    # ---- analyze-monotonicity
    ([*AN, "--top-k", "0"], "--top-k and --max-tokens must be >= 1"),
    ([*AN, "--top-k", "100000", "--out", "{tmp}/x"], "above the vocabulary size"),
    ([*AN, "--examples", "-1"], "--examples >= 0"),
    (["analyze-monotonicity", *M, "--max-tokens", "0"], "--top-k and --max-tokens must be >= 1"),
    ([*AN, "--label", "a", "--label", "b"], "--label given 2 times for 1 models"),
    ([*AN, "--dataset", "wiki", "--out", "{tmp}/x"], "unknown dataset 'wiki'"),
    ([*AN, "--seq-len", "500", "--out", "{tmp}/x"], "--seq-len must be in 1..32"),
    ([*AN, "--batch-size", "0", "--out", "{tmp}/x"], "--batch-size must be >= 1"),
    ([*AN, "--out", "{tmp}/res"], "already exists; pass --overwrite"),
    ([*AN, "--out", "{tmp}/file.txt"], "is a file, not a folder"),
    (["analyze-monotonicity", "--model", "{tmp}/nope", "--out", "{tmp}/x"], "not found"),
]


def ids():
    return [
        f"{i:03d}-{c[0][0] if c[0][0] != 'train' or len(c[0]) < 2 else 'train'}"
        for i, c in enumerate(CASES)
    ]


def test_at_least_a_hundred_cases():
    assert len(CASES) >= 100


@pytest.mark.parametrize("args,expect", CASES, ids=ids())
def test_bad_input(world, args, expect):
    argv = [a.replace("{ck}", str(world / "ck")).replace("{tmp}", str(world)) for a in args]
    before = snapshot(world)
    code, _, err = run_cli(*argv)
    lines = message_lines(err)
    assert code == 2, f"exit {code}: {err}"
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert expect in lines[0], lines[0]
    assert snapshot(world) == before  # nothing created, replaced or removed


# ---- training: resume, LoRA, layer dropout, exits, vocabulary; eexit.json fields; calibration
# windows. A world of its own (a finished run with checkpoint-3, damaged copies, a small text),
# checked byte for byte like the one above. Each case fails before any training step.


def _corrupt_meta(folder: Path, change) -> None:
    meta = json.loads((folder / "eexit.json").read_text())
    change(meta)
    (folder / "eexit.json").write_text(json.dumps(meta))


def _set(*path):
    *keys, value = path

    def change(meta):
        d = meta
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value

    return change


BAD_META = {
    "layers-str": _set("exit_layers", "1,2"),
    "layers-map": _set("exit_layers", {"1": 2}),
    "layers-empty": _set("exit_layers", []),
    "layers-bool": _set("exit_layers", [True, 3]),
    "layers-deep": _set("exit_layers", [1, 9]),
    "heads-num": _set("exit_heads", 3),
    "heads-name": _set("exit_heads", "own"),
    "gate-str": _set("halting_gate", "false"),
    "lens-str": _set("lens_rank", "2"),
    "lens-neg": _set("lens_rank", -1),
    "step-str": _set("step", "three"),
    "cfg-str": _set("train_config", "oops"),
    "cfg-list": _set("train_config", [1, 2]),
    "cfg-model": _set("train_config", "model", "gpt2"),
    "cfg-params": _set("train_config", "loss", "params", "fast"),
    "cfg-legacy": _set("train_config", "loss", {"name": "free-kd", "kd_weight": 1, "params": "x"}),
    "cfg-lr": _set("train_config", "train", "lr", "fast"),
    "cfg-betas": _set("train_config", "train", "betas", {"a": 1}),
    "cfg-layers": _set("train_config", "model", "n_layers", [3]),
    "final-list": _set("final", [1]),
}


@pytest.fixture(scope="module")
def train_world(tmp_path_factory, tiny_checkpoint) -> Path:
    w = tmp_path_factory.mktemp("train-world")
    shutil.copytree(tiny_checkpoint, w / "ck")  # a finished run: final model and checkpoint-3
    for name in ("badstate", "badckmeta"):
        shutil.copytree(tiny_checkpoint, w / name)
    (w / "badstate" / "checkpoint-3" / "trainer_state.json").write_text('{"step": "three"}')
    _corrupt_meta(w / "badckmeta" / "checkpoint-3", _set("train_config", "oops"))
    for name, change in BAD_META.items():
        shutil.copytree(tiny_checkpoint, w / f"m-{name}", ignore=shutil.ignore_patterns("check*"))
        _corrupt_meta(w / f"m-{name}", change)
    docs = [f"Document {i} about the river and the hill number {i}." for i in range(60)]
    (w / "small.txt").write_text("\n\n".join(docs) + "\n")
    return w


R = ["train", *TINY_TRAIN, "--out", "{ck}", "--resume"]
NEW = ["train", *TINY_TRAIN, "--out", "{tmp}/new-run"]
EVM = ["evaluate", "--max-tokens", "256", "--model"]
ONLY = "only run_name, out_dir, train.steps"  # what --resume may change, named in the message

TRAIN_CASES = [
    # ---- --resume with a setting that changes the optimisation: named, old -> new
    ([*R, "--loss", "layerskip"], "loss.name 'weighted-ce' -> 'layerskip'"),
    ([*R, "--loss", "layerskip"], "loss.params.rotation unset -> 2"),
    ([*R, "--set", "loss.exit_token_fraction=0.5"], "loss.exit_token_fraction 1.0 -> 0.5"),
    ([*R, "--set", "train.layer_dropout=0.1"], "train.layer_dropout 0.0 -> 0.1"),
    ([*R, "--set", "train.layer_dropout_scale=linear"], "layer_dropout_scale 'exp' -> 'linear'"),
    ([*R, "--set", "model.lora_rank=2"], "model.lora_rank 0 -> 2"),
    ([*R, "--set", "model.exit_layers=[1,3]"], "model.exit_layers 'all' -> [1, 3]"),
    ([*R, "--set", "model.exit_heads=lens"], "model.exit_heads 'shared' -> 'lens'"),
    ([*R, "--set", "model.min_exit_layer=2"], "model.min_exit_layer 1 -> 2"),
    ([*R, "--set", "model.dropout=0.1"], "model.dropout 0.0 -> 0.1"),
    ([*R, "--set", "train.lr=0.002"], "train.lr 0.001 -> 0.002"),
    ([*R, "--set", "train.warmup_steps=1"], "train.warmup_steps 2 -> 1"),
    ([*R, "--set", "train.min_lr_ratio=0.5"], "train.min_lr_ratio 0.1 -> 0.5"),
    ([*R, "--set", "train.weight_decay=0"], "train.weight_decay 0.1 -> 0.0"),
    ([*R, "--set", "train.betas=[0.9,0.99]"], "train.betas [0.9, 0.95] -> [0.9, 0.99]"),
    ([*R, "--set", "train.grad_clip=0.5"], "train.grad_clip 1.0 -> 0.5"),
    ([*R, "--set", "seed=1"], "seed 0 -> 1"),
    ([*R, "--set", "train.batch_size=8"], "train.batch_size 4 -> 8"),
    ([*R, "--set", "train.grad_accum_steps=2"], "train.grad_accum_steps 1 -> 2"),
    ([*R, "--set", "data.seq_len=16"], "data.seq_len 32 -> 16"),
    ([*R, "--set", "data.dataset={tmp}/small.txt"], "data.dataset 'wiki-gensim' -> "),
    ([*R, "--set", "train.lr=0.01", "--set", "seed=2"], "seed 0 -> 2, train.lr 0.001 -> 0.01"),
    ([*R, "--set", "train.lr=0.01"], ONLY),
    (
        ["train", *TINY_TRAIN, "--out", "{tmp}/badstate", "--resume"],
        "trainer_state.json is malform",
    ),
    (
        ["train", *TINY_TRAIN, "--out", "{tmp}/badckmeta", "--resume"],
        "checkpoint-3/eexit.json: field 'train_config' must be a mapping",
    ),
    # ---- LoRA fields, layer dropout, exits and vocabulary of a new run
    ([*NEW, "--set", "model.lora_targets=[]"], 'model.lora_targets must be "all-linear" or'),
    ([*NEW, "--set", "model.lora_targets="], "model.lora_targets must be"),
    ([*NEW, "--set", "model.lora_targets=[c_attn, '']"], "model.lora_targets must be"),
    ([*NEW, "--set", "model.lora_targets={a: 1}"], "model.lora_targets must be"),
    ([*NEW, "--set", "model.lora_alpha=0"], "model.lora_alpha must be > 0"),
    ([*NEW, "--set", "model.lora_alpha=-2"], "model.lora_alpha must be > 0"),
    ([*NEW, "--set", "model.lora_rank=1.5"], "'model.lora_rank' must be a whole number"),
    (
        [*NEW, "--set", "model.lora_rank=2", "--set", "model.freeze_backbone=true"],
        "model.lora_rank and model.freeze_backbone exclude each other",
    ),
    (
        [*NEW, "--set", "model.lora_rank=2", "--set", "model.lora_targets=nothing.*"],
        "match no layer of the model",
    ),
    ([*NEW, "--set", "train.layer_dropout=-0.1"], "train.layer_dropout must be in [0, 1)"),
    ([*NEW, "--set", "train.layer_dropout=abc"], "'train.layer_dropout' must be a number"),
    ([*NEW, "--set", "train.layer_dropout_scale=[exp]"], "'train.layer_dropout_scale' must be a"),
    ([*NEW, "--set", "train.layer_dropout_scale=Exp"], "must be one of exp, linear, uniform"),
    ([*NEW, "--set", "model.min_exit_layer=4"], "model.min_exit_layer 4 is beyond the model's 3"),
    ([*NEW, "--set", "model.exit_layers=[0,2]"], "exit layers must be integers in 1..3; got [0]"),
    ([*NEW, "--set", "model.exit_layers=[4]"], "exit layers must be integers in 1..3; got [4]"),
    ([*NEW, "--set", "model.exit_layers={a: 1}"], "model.exit_layers must be 'all' or a list"),
    ([*NEW, "--set", "model.exit_layers=true"], "model.exit_layers must be 'all' or a list"),
    (
        [*NEW, "--set", "model.pretrained={ck}", "--set", "model.min_exit_layer=9"],
        "model.min_exit_layer 9 is beyond the model's 3 layers",
    ),
    ([*NEW, "--set", "model.vocab_size=256"], "model.vocab_size must be >= 257"),
    (
        [*NEW, "--set", "data.dataset={tmp}/small.txt", "--set", "model.vocab_size=4096"],
        "the BPE tokenizer learned only",
    ),
    # ---- eexit.json fields of the wrong type or out of range: the file and the field named
    ([*EVM, "{tmp}/m-layers-str"], "m-layers-str/eexit.json: field 'exit_layers' must be null"),
    ([*EVM, "{tmp}/m-layers-map"], "field 'exit_layers' must be null, \"all\" or a non-empty"),
    ([*EVM, "{tmp}/m-layers-empty"], "field 'exit_layers' must be"),
    ([*EVM, "{tmp}/m-layers-bool"], "field 'exit_layers' must be"),
    ([*EVM, "{tmp}/m-layers-deep"], "eexit.json: field 'exit_layers': exit layers must be integ"),
    ([*EVM, "{tmp}/m-heads-num"], "field 'exit_heads' must be shared or separate or lens; got 3"),
    ([*EVM, "{tmp}/m-heads-name"], "field 'exit_heads' must be shared or separate or lens"),
    ([*EVM, "{tmp}/m-gate-str"], "field 'halting_gate' must be true or false; got 'false'"),
    ([*EVM, "{tmp}/m-lens-str"], "field 'lens_rank' must be a whole number >= 0; got '2'"),
    ([*EVM, "{tmp}/m-lens-neg"], "field 'lens_rank' must be a whole number >= 0; got -1"),
    ([*EVM, "{tmp}/m-step-str"], "field 'step' must be null or a whole number"),
    ([*EVM, "{tmp}/m-cfg-str"], "field 'train_config' must be a mapping"),
    ([*EVM, "{tmp}/m-cfg-list"], "field 'train_config' must be a mapping"),
    ([*EVM, "{tmp}/m-cfg-model"], "train_config: config section model must be a mapping"),
    ([*EVM, "{tmp}/m-cfg-params"], "train_config: config key 'loss.params' must be a mapping"),
    ([*EVM, "{tmp}/m-cfg-legacy"], "train_config: config key 'loss.params' must be a mapping"),
    ([*EVM, "{tmp}/m-cfg-lr"], "train_config: config key 'train.lr' must be a number"),
    ([*EVM, "{tmp}/m-cfg-betas"], "train_config: config key 'train.betas' must be a list"),
    ([*EVM, "{tmp}/m-cfg-layers"], "train_config: config key 'model.n_layers' must be a numb"),
    ([*EVM, "{tmp}/m-final-list"], "field 'final' must be a mapping"),
    ([*NEW, "--set", "model.pretrained={tmp}/m-gate-str"], "field 'halting_gate' must be true"),
    ([*NEW, "--set", "model.pretrained={tmp}/m-cfg-lr"], "config key 'train.lr' must be a number"),
    # ---- calibration / classifier fitting with --max-tokens below what they need
    (
        ["calibrate", "--model", "{ck}", "--fit", "lstm", "--max-tokens", "10"],
        "--max-tokens 10 holds 0 whole windows of 32 tokens; fitting exit classifiers needs",
    ),
    (
        ["calibrate", "--model", "{ck}", "--policy", "margin", "--max-tokens", "40"],
        "needs at least 45 tokens: 2 windows (--max-tokens >= 64)",
    ),
    (
        [
            "calibrate",
            "--model",
            "{ck}",
            "--fit",
            "lstm",
            "--policy",
            "margin",
            "--max-tokens",
            "64",
        ],
        "in the odd windows (the even ones fit the classifiers): 4 windows (--max-tokens >= 128)",
    ),
]


def test_at_least_fifty_training_cases():
    assert len(TRAIN_CASES) >= 50


@pytest.mark.parametrize(
    "args,expect", TRAIN_CASES, ids=[f"{i:03d}-{c[0][0]}" for i, c in enumerate(TRAIN_CASES)]
)
def test_bad_training_input(train_world, args, expect):
    w = train_world
    argv = [a.replace("{ck}", str(w / "ck")).replace("{tmp}", str(w)) for a in args]
    before = snapshot(w)
    code, _, err = run_cli(*argv)
    lines = message_lines(err)
    assert code == 2, f"exit {code}: {err}"
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert expect in lines[0], lines[0]
    assert snapshot(w) == before  # nothing created, replaced or removed


# ---- evaluation side of the newer features: self-spec, shortlist, --model, task lengths, sweep
# and calibrate options. Model-free checks fail before the load; the others right after it, before
# any work. {V} is the world checkpoint's vocabulary size, read from its config.json.
E_GEN = [*EV, "--generate", "--prompt-len", "8", "--max-new-tokens", "8"]
E_SPEC = [*E_GEN, "--mode", "self-spec"]
E_SW = ["sweep", *M, "--max-tokens", "256", "--out", "{tmp}/x"]
E_CAL = ["calibrate", *M, "--max-tokens", "2048", "--out", "{tmp}/x"]
K_ABOVE = "is more candidates than the vocabulary: K must be <= {V}"

EVAL_CASES = [
    # ---- evaluate --generate --mode self-spec: one validator, nothing silently changed
    ([*E_SPEC, "--draft-layer", "0"], "--draft-layer must be >= 1"),
    ([*E_SPEC, "--draft-layer", "-2"], "--draft-layer must be >= 1"),
    ([*E_SPEC, "--draft-layer", "3"], "--draft-layer must be in 1..2 (below the model's 3 layers)"),
    ([*E_SPEC, "--draft-layer", "99"], "--draft-layer must be in 1..2"),
    ([*E_SPEC, "--draft-vocab", "100000"], "--draft-vocab must be <= the vocabulary size {V}"),
    ([*E_SPEC, "--draft-vocab", "300"], "--draft-vocab must be <= the vocabulary size {V}"),
    ([*E_SPEC, "--draft-vocab", "-1"], "--draft-vocab must be >= 0"),
    ([*E_SPEC, "--draft-length", "0"], "--draft-length must be >= 1"),
    ([*E_SPEC, "--prompts", "0"], "--prompts and --prompt-len must be >= 1"),
    ([*E_SPEC, "--kv", "copy"], "--kv has no effect with --mode self-spec"),
    ([*EV, "--generate", "--mode", "self-spec", "--prompt-len", "30"], "must be <= 32"),
    ([*E_GEN, "--mode", "self_spec"], "unknown --mode 'self_spec' (did you mean 'self-spec'?)"),
    ([*E_GEN, "--draft-length", "2"], "--draft-length 2: for --mode self-spec only"),
    ([*E_GEN, "--draft-vocab", "10"], "--draft-vocab 10: for --mode self-spec only"),
    ([*E_GEN, "--mode", "early-exit", "--draft-layer", "1"], "--draft-layer 1: for --mode self"),
    # ---- decoding options without --generate: refused, not ignored
    ([*EV, "--mode", "self-spec"], "--mode self-spec: for --generate only"),
    ([*EV, "--mode", "early-exit"], "--mode early-exit: for --generate only"),
    ([*EV, "--draft-layer", "1"], "--draft-layer 1: for --generate only"),
    ([*EV, "--prompts", "4"], "--prompts 4: for --generate only"),
    ([*EV, "--prompt-len", "8", "--draft-vocab", "5"], "--prompt-len 8, --draft-vocab 5: for"),
    ([*EV, "--dataset", "aclsum", "--mode", "self-spec"], "--mode self-spec: for --generate"),
    # ---- --param shortlist=K: K <= V wherever a policy is built (the costs count min(K, V))
    ([*EV, "--param", "shortlist=100000"], "shortlist=100000 " + K_ABOVE),
    ([*EV, "--param", "shortlist=300"], K_ABOVE),
    ([*EV, "--policy", "entropy", "--param", "shortlist=300"], K_ABOVE),
    ([*E_GEN, "--param", "shortlist=300"], K_ABOVE),
    ([*E_SW, "--policy", "margin", "--param", "shortlist=300"], K_ABOVE),
    ([*E_CAL, "--policy", "margin", "--param", "shortlist=300"], K_ABOVE),
    ([*EV, "--param", "shortlist=-1"], "shortlist must be >= 0"),
    ([*EV, "--param", "shortlist=abc"], "bad parameter"),
    ([*EV, "--policy", "saturation", "--param", "shortlist=8"], "takes no parameter"),
    # ---- --model: paths never go to the hub, hub ids are not asked offline, both places named
    (["evaluate", "--model", "{tmp}/nope/deeper"], "model checkpoint not found"),
    (["evaluate", "--model", "bad name"], "not tried on the hub: a hub id is owner/name"),
    (["evaluate", "--model", "model.pt"], "model checkpoint not found: model.pt"),
    (["evaluate", "--model", "{ck}/model.safetensors"], "is not a model checkpoint"),
    (["evaluate", "--model", "nothere/typo"], "no hub model 'nothere/typo' in the local hub cache"),
    (["sweep", "--model", "owner/typo", "--out", "{tmp}/x"], "HF_HUB_OFFLINE is set"),
    (["calibrate", "--model", "owner/typo", "--policy", "margin"], "no file or folder owner/typo"),
    (["analyze-monotonicity", *M, "--model", "owner/typo", "--out", "{tmp}/x"], "no hub model"),
    (["lm-eval", "--model", "owner/typo", "--tasks", "x"], "no hub model 'owner/typo'"),
    (["evaluate", "--model", "llm_nope:model.gguf"], "no installed package 'llm_nope'"),
    # ---- task prompts beyond the model's positions: refused before decoding or scoring
    ([*EV, "--dataset", "wiki-cloze-qa", "--examples", "2"], "beyond the model's 32"),
    ([*E_SW, "--dataset", "wiki-cloze-qa", "--examples", "2"], "beyond the model's 32"),
    ([*E_CAL, "--dataset", "wiki-cloze-qa", "--policy", "margin"], "beyond the model's 32"),
    # ---- sweep / calibrate options
    ([*E_SW, "--examples", "0"], "--examples and --batch-size must be >= 1"),
    ([*E_SW, "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    ([*E_CAL, "--policy", "margin", "--grid", "0:2"], "thresholds must lie in [0, 1]"),
    ([*E_CAL, "--policy", "margin", "--test-split", "dev"], "unknown split 'dev'"),
]


def test_at_least_twenty_five_evaluation_cases():
    assert len(EVAL_CASES) >= 25


@pytest.mark.parametrize(
    "args,expect", EVAL_CASES, ids=[f"{i:03d}-{c[0][0]}" for i, c in enumerate(EVAL_CASES)]
)
def test_bad_evaluation_input(world, monkeypatch, args, expect):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id is looked up in the local cache only
    vocab = str(json.loads((world / "ck" / "config.json").read_text())["vocab_size"])
    argv = [a.replace("{ck}", str(world / "ck")).replace("{tmp}", str(world)) for a in args]
    before = snapshot(world)
    code, _, err = run_cli(*argv)
    lines = message_lines(err)
    assert code == 2, f"exit {code}: {err}"
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert expect.replace("{V}", vocab) in lines[0], lines[0]
    assert snapshot(world) == before  # nothing created, replaced or removed
