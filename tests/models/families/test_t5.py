"""T5 (encoder-decoder): exits on the decoder, early-exit decoding with every KV mode, training on
task pairs."""

import json

import pytest
import torch

from eexit.models.decoding import KV_MODES, EarlyExitDecoder
from eexit.models.loading import load_model
from eexit.policies.base import make_policy
from tests.conftest import run_cli, tiny_overrides
from tests.helpers import HiddenSign


def test_last_exit_equals_the_models_logits_and_shallow_exits_differ(t5):
    model, ids, mask = t5
    dec = torch.randint(0, 50, (3, 7))
    states = model(dec, source_ids=ids, source_mask=mask)
    logits = model.lm(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert len(states) == 3 and model.is_seq2seq
    torch.testing.assert_close(model.exit_logits(states[-1], 3), logits)
    assert (model.exit_logits(states[0], 1) - logits).abs().max() > 1e-2


@pytest.mark.parametrize("mode", KV_MODES)
def test_never_exiting_equals_transformers_generate(t5, mode):
    model, ids, mask = t5
    ref = model.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    out = EarlyExitDecoder(model, make_policy("max-prob", threshold=1.0), mode).generate(
        torch.zeros(3, 1, dtype=torch.long), max_new_tokens=20, source_ids=ids, source_mask=mask
    )
    assert len(set(ref[:, 1:].flatten().tolist())) > 3  # a non-degenerate reference
    assert torch.equal(out.sequences, ref)
    assert (out.exit_layers == 3).all()


def test_recompute_gives_full_kv_so_exits_match_teacher_forcing_and_propagate_differs(t5):
    """With recompute, a token emitted at layer l equals the argmax of exit l of a teacher-forced
    forward over the generated sequence (every earlier position has its full-depth KV)."""
    model, ids, mask = t5
    start = torch.zeros(3, 1, dtype=torch.long)
    decoders = {
        m: EarlyExitDecoder(model, HiddenSign(threshold=0.5), m) for m in ("recompute", "propagate")
    }
    res = {
        m: d.generate(start, max_new_tokens=16, source_ids=ids, source_mask=mask)
        for m, d in decoders.items()
    }
    out = res["recompute"]
    exits = out.exit_layers[:, 1:]
    assert (exits < 3).float().mean() > 0.2 and (exits == 3).any()  # real early exits, not all
    states = model(out.sequences[:, :-1], source_ids=ids, source_mask=mask)
    top1 = torch.stack(
        [model.exit_logits(s, l + 1).argmax(-1) for l, s in enumerate(states)]
    )  # [L, B, T]
    want = top1.gather(0, (out.exit_layers - 1)[None]).squeeze(0)
    assert torch.equal(out.new_tokens, want)
    # CALM's propagation fills the skipped layers' keys from the exited state: not the full model's
    k = {m: d.cache["k"][2][:, :, :16] for m, d in decoders.items()}
    assert (k["propagate"] - k["recompute"]).abs().max() > 1e-3


def test_train_t5_on_translation_pairs_and_evaluate(tmp_path):
    out = tmp_path / "t5"
    code, _, err = run_cli(
        "train",
        "--loss",
        "weighted-ce",
        *tiny_overrides(
            "model.arch=t5",
            "data.dataset=bible-en-fr",
            "data.max_source_len=24",
            "data.max_target_len=16",
        ),
        "--out",
        str(out),
    )
    assert code == 0, err
    log = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    assert {"ce@1", "ce@2", "ce@3"} <= set(log[0])
    model, tok, _ = load_model(str(out))
    assert model.is_seq2seq and model.exit_layers == [1, 2, 3]
    assert model.lm.config.decoder_start_token_id == tok.eos_token_id
    # teacher-forced on the validation pairs: fit the 3-state MLP, calibrate its threshold with
    # Learn-then-Test
    cal = tmp_path / "cal"
    code, _, err = run_cli(
        "calibrate",
        "-m",
        str(out),
        "--fit",
        "mlp3",
        "--policy",
        "mlp3",
        "--max-tokens",
        "600",
        "--epsilon",
        "0.3",
        "--out",
        str(cal),
    )
    assert code == 0, err
    summary = json.loads((cal / "calibration.json").read_text())[0]
    assert summary["calibration_tokens"] > 100 and summary["test_tokens"] > 100
    assert summary["threshold"] is None or summary["test_compute_pct"] <= 100.0
    assert (out / "exit_classifiers").is_dir()
    # seed 001's monotonicity analysis on the T5 decoder, teacher-forced on reference translations
    mono = tmp_path / "mono"
    code, _, err = run_cli(
        "analyze-monotonicity", "-m", str(out), "--max-tokens", "300", "--out", str(mono)
    )
    assert code == 0, err
    rows = json.loads((mono / "per_layer.json").read_text())
    assert [r["layer"] for r in rows] == [1, 2, 3] and rows[-1]["top1_equals_final"] == 100.0
