"""Qwen2 (one file: eexit/models/families/qwen2.py): recognised, built from config, and its
never-exiting early-exit decoding equals `transformers` greedy `generate` in every KV mode,
with and without sliding-window attention."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from eexit.config import ModelConfig
from eexit.models.decoding import KV_MODES, EarlyExitDecoder
from eexit.models.early_exit import EarlyExitModel
from eexit.models.loading import build_lm
from eexit.policies import make_policy


def tiny_qwen2(**extra) -> EarlyExitModel:
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **extra,
    )
    lm = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # larger random weights: varied predictions without training
        for p in lm.parameters():
            p.mul_(4.0)
    return EarlyExitModel(lm, "all").eval()


def padded_batch():
    torch.manual_seed(3)
    ids = torch.randint(3, 97, (3, 7))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    ids[2, :5], mask[2, :5] = 0, 0
    return ids, mask


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("mode", KV_MODES)
def test_never_exiting_decoding_equals_transformers_generate(mode, window):
    extra = {"use_sliding_window": True, "sliding_window": window, "max_window_layers": 1}
    model = tiny_qwen2(**(extra if window else {}))
    assert model.family.name == "qwen2"
    if window:  # layers 2 and 3 see the last 4 positions only
        assert [model.family.adapter(model).window(i) for i in range(3)] == [None, 4, 4]
    ids, mask = padded_batch()
    ref = model.lm.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    never = make_policy("max-prob", threshold=1.0)
    out = EarlyExitDecoder(model, never, mode).generate(ids, mask, 12, pad_token_id=0)
    assert torch.equal(out.sequences, ref)


def test_the_window_changes_the_output():
    """The sliding window is really applied: without it the same weights decode differently."""
    ids, mask = padded_batch()
    windowed = tiny_qwen2(use_sliding_window=True, sliding_window=2, max_window_layers=0)
    full = tiny_qwen2()
    never = make_policy("max-prob", threshold=1.0)
    a = EarlyExitDecoder(windowed, never, "full").generate(ids, mask, 12, pad_token_id=0)
    b = EarlyExitDecoder(full, never, "full").generate(ids, mask, 12, pad_token_id=0)
    assert not torch.equal(a.sequences, b.sequences)


def test_built_from_config():
    cfg = ModelConfig(arch="qwen2", n_layers=2, d_model=32, n_heads=2, d_ff=64, max_len=32)
    model = EarlyExitModel(build_lm(cfg, 97, 0, 0), "all")
    assert model.family.name == "qwen2" and model.num_layers == 2
    x = torch.randint(0, 97, (2, 5))
    states = model(x)
    torch.testing.assert_close(model.exit_logits(states[-1], 2), model.lm(x).logits)
