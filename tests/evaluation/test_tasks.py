"""Task evaluation end to end: early-exit decoding scored by the task metric, T5 and
decoder-only."""

import json
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from eexit.data.corpora import train_tokenizer
from eexit.data.task_data import task_split
from eexit.models.early_exit import EarlyExitModel
from tests.conftest import message_lines, run_cli


def _randomize(lm):
    torch.manual_seed(0)
    with (
        torch.no_grad()
    ):  # large random weights: long, varied outputs (EOS is rare) without training
        for p in lm.parameters():
            p.normal_(0, 0.5)
    return lm


@pytest.fixture(scope="module")
def tokenizer():
    _, train = task_split("bible-en-fr", "train", 400)
    return train_tokenizer([e.source for e in train] + [e.target for e in train], 300)


def _save(lm, tok, path, dataset):
    meta = {
        "train_config": {"data": {"dataset": dataset, "max_source_len": 24, "max_target_len": 8}}
    }
    EarlyExitModel(lm.eval(), "all").save(path, tok, meta)
    return path


@pytest.fixture(scope="module")
def random_t5(tokenizer, tmp_path_factory):
    eos = tokenizer.eos_token_id
    cfg = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=3,
        num_decoder_layers=3,
        num_heads=2,
        pad_token_id=eos,
        eos_token_id=eos,
        decoder_start_token_id=eos,
    )
    return _save(
        _randomize(T5ForConditionalGeneration(cfg)),
        tokenizer,
        tmp_path_factory.mktemp("t5") / "m",
        "bible-en-fr",
    )


@pytest.fixture(scope="module")
def random_llama(tokenizer, tmp_path_factory):
    eos = tokenizer.eos_token_id
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return _save(
        _randomize(LlamaForCausalLM(cfg)),
        tokenizer,
        tmp_path_factory.mktemp("llama") / "m",
        "wiki-cloze-qa",
    )


def _rows(out):
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["full_depth"] for r in rows] == [True] + [False] * (len(rows) - 1)
    return {"full" if r["full_depth"] else str(r["threshold"]): r for r in rows}


@pytest.mark.parametrize("kv", ["propagate", "recompute"])
def test_t5_translation_sweep_threshold_one_is_the_full_model_and_zero_exits_at_layer_one(
    random_t5, tmp_path, kv
):
    out = tmp_path / "sweep"
    code, _, err = run_cli(
        "sweep",
        "-m",
        str(random_t5),
        "--policy",
        "max-prob",
        "--thresholds",
        "0,1",
        "--examples",
        "4",
        "--batch-size",
        "2",
        "--kv",
        kv,
        "--out",
        str(out),
    )
    assert code == 0, err
    rows = _rows(out)
    full, never, always = rows["full"], rows["1.0"], rows["0.0"]
    assert (
        full["tokens"] == 4 * 8 and full["compute_pct"] == 100.0
    )  # 8 new tokens each: no EOS from these weights
    assert (
        never["bleu"] == full["bleu"]
        and never["chrf"] == full["chrf"]
        and never["agreement_pct"] == 100.0
    )
    assert never["compute_pct"] == 100.0
    # threshold 0: every token but the first (always full depth) exits at layer 1 of 3
    assert always["exit@1_pct"] == pytest.approx(100 * 7 / 8)
    assert always["compute_pct"] == pytest.approx(100 * (3 + 7 * 1) / (8 * 3))
    assert always["agreement_pct"] < 100.0
    md = (out / "sweep.md").read_text()
    assert "tok:13a" in md and "Provenance" in md and (out / "sweep.png").is_file()


def test_decoder_only_prompted_qa_and_errors(random_llama, tmp_path):
    out = tmp_path / "qa"
    code, _, err = run_cli(
        "evaluate",
        "-m",
        str(random_llama),
        "--policy",
        "max-prob",
        "--threshold",
        "1.0",
        "--examples",
        "3",
        "--batch-size",
        "3",
        "--out",
        str(out),
    )
    assert code == 0, err
    rows = _rows(out)
    assert set(rows) == {"full", "1.0"}
    assert (
        rows["1.0"]["f1"] == rows["full"]["f1"]
        and rows["1.0"]["exact_match"] == rows["full"]["exact_match"]
    )
    assert 0 <= rows["full"]["f1"] <= 100 and rows["1.0"]["agreement_pct"] == 100.0
    # bad input: one line, exit 2, the existing results untouched
    before = (out / "sweep.json").read_text()
    code, _, err = run_cli(
        "evaluate",
        "-m",
        str(random_llama),
        "--examples",
        "3",
        "--kv",
        "copy",
        "--out",
        str(out),
        "--overwrite",
    )
    assert code == 2 and "unknown KV mode 'copy'" in err and len(message_lines(err)) == 1
    assert (out / "sweep.json").read_text() == before
    code, _, err = run_cli(
        "evaluate", "-m", str(random_llama), "--dataset", "aclsun", "--out", str(tmp_path / "x")
    )
    assert code == 2 and "did you mean 'aclsum'" in err


def test_prompts_and_answers_beyond_the_models_positions_are_refused_before_decoding(
    random_llama, tmp_path
):
    """512 positions: 3 cloze prompts fit with short answers; an answer budget that does not fit
    is refused with the largest that does, instead of an embedding index error midway."""
    out = tmp_path / "long"
    args = ["evaluate", "-m", str(random_llama), "--examples", "3", "--out", str(out)]
    code, _, err = run_cli(*args, "--max-new-tokens", "600")
    lines = message_lines(err)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "beyond the model's 512; set --max-new-tokens to at most" in lines[0]
    prompt = int(re.search(r"prompts of up to (\d+) tokens", lines[0]).group(1))
    assert int(lines[0].rsplit(" ", 1)[1]) == 512 - prompt > 0 and not out.exists()
    code, _, err = run_cli(*args, "--max-new-tokens", "2", "--threshold", "1.0")
    assert code == 0, err  # a budget that fits runs
