"""The Llama family also serves Mistral, whose every layer attends within a sliding window."""

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from eexit.models.decoding import KV_MODES, EarlyExitDecoder
from eexit.models.early_exit import EarlyExitModel
from eexit.policies import make_policy


@pytest.mark.parametrize("mode", KV_MODES)
def test_mistral_sliding_window_decoding_equals_transformers_generate(mode):
    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        sliding_window=3,
        pad_token_id=0,
    )
    lm = MistralForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.mul_(4.0)
    model = EarlyExitModel(lm, "all").eval()
    assert model.family.name == "llama" and model.family.adapter(model).window(0) == 3
    ids = torch.randint(3, 97, (2, 6))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    ref = lm.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=10,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    never = make_policy("max-prob", threshold=1.0)
    out = EarlyExitDecoder(model, never, mode).generate(ids, mask, 10, pad_token_id=0)
    assert torch.equal(out.sequences, ref)
