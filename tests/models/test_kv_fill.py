"""KV propagate fills every skipped layer at once (`BlockAdapter.kv_many`): the batched fill must
give each layer's own keys and values, and the decoder must write them where the skipped layers
read them."""

import pytest
import torch

from eexit.models.decoding import EarlyExitDecoder
from eexit.policies.base import make_policy
from tests.helpers import tiny


def with_random_norms(model):
    """A tiny model whose norm weights differ per layer (fresh ones are all 1: a fill that used
    one layer's norm for every layer would pass unnoticed)."""
    gen = torch.Generator().manual_seed(1)
    for blk in model.parts.layers:
        norm = blk.input_layernorm if hasattr(blk, "input_layernorm") else blk.ln_1
        norm.weight.data = 0.5 + torch.rand(norm.weight.shape, generator=gen)
        if getattr(norm, "bias", None) is not None:
            norm.bias.data = torch.rand(norm.bias.shape, generator=gen) - 0.5
    return model


# qwen2: biased k/v projections; gpt2: LayerNorm (with a bias) and the fused c_attn
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_batched_fill_equals_each_layers_own_projection(arch):
    model = with_random_norms(tiny(arch, layers=4))
    blocks = model.family.adapter(model)
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(3, 1, model.hidden_size, generator=gen)
    pos = torch.tensor([[5], [9], [2]])
    with torch.no_grad():
        k, v = blocks.kv_many(1, 4, h, pos)
        for i, l in enumerate(range(1, 4)):
            k_ref, v_ref = blocks.kv(l, h, pos)
            assert torch.allclose(k[i], k_ref, atol=1e-6), l
            assert torch.allclose(v[i], v_ref, atol=1e-6), l
    assert k.shape == (3, 3, blocks.n_kv_heads, 1, blocks.head_dim)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_propagate_writes_the_exited_states_kv_into_every_skipped_layer(arch):
    """Every token exits at layer 1, so each generated slot of layers 2..L must hold that layer's
    K/V of the layer-1 state, which transformers computes independently (layer 1's cache is
    always full, so its output over the whole sequence is the exited state)."""
    model = with_random_norms(tiny(arch, layers=4))
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(1, 97, (2, 5), generator=gen)
    dec = EarlyExitDecoder(model, make_policy("static", layer=1), "propagate")
    out = dec.generate(prompt, max_new_tokens=8)
    assert (out.exit_layers[:, 1:] == 1).all()
    with torch.no_grad():
        hs = model.lm(out.sequences, output_hidden_states=True).hidden_states
    blocks = dec.blocks
    T0 = prompt.shape[1]
    fed = torch.arange(T0, T0 + 7)  # the slots fed in steps 1..7 (exited at layer 1)
    pos = fed.expand(2, -1)
    with torch.no_grad():
        for l in range(1, 4):
            k_ref, v_ref = blocks.kv(l, hs[1][:, fed], pos)
            assert torch.allclose(dec.cache["k"][l][:, :, fed], k_ref, atol=1e-5), l
            assert torch.allclose(dec.cache["v"][l][:, :, fed], v_ref, atol=1e-5), l
            assert dec.cache["valid"][l][:, fed].all()
