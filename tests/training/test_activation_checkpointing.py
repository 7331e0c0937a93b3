"""train.activation_checkpointing: each block recomputed in the backward pass gives the same loss
and gradients as keeping its activations, with LayerSkip's layer dropout on (the recomputed
block must skip the same rows)."""

import copy

import pytest
import torch

from eexit.config import RunConfig
from eexit.errors import EexitError
from eexit.training.loop import TrainingModule
from tests.helpers import tiny


def step(model, checkpointing: bool, dropout: float, seed: int = 3):
    cfg = RunConfig()
    cfg.loss.name = "layerskip"
    cfg.train.layer_dropout = dropout
    cfg.train.activation_checkpointing = checkpointing
    module = TrainingModule(copy.deepcopy(model), cfg).train()
    torch.manual_seed(seed)
    x, y = torch.randint(0, 97, (4, 12)), torch.randint(0, 97, (4, 12))
    loss, _ = module(x, y, step=0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return loss.item(), grads


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_recomputed_blocks_give_the_same_loss_and_gradients(arch):
    model = tiny(arch, layers=4)
    plain, checkpointed = step(model, False, 0.6), step(model, True, 0.6)
    assert step(model, False, 0.0)[0] != pytest.approx(plain[0])  # some block was skipped
    assert checkpointed[0] == pytest.approx(plain[0], rel=1e-6)
    assert checkpointed[1].keys() == plain[1].keys()
    for n in plain[1]:
        assert torch.allclose(checkpointed[1][n], plain[1][n], rtol=1e-5, atol=1e-7), n


def test_checkpointing_is_on_in_the_model_only_when_asked():
    model = tiny("llama", layers=2)
    cfg = RunConfig()
    cfg.train.activation_checkpointing = True
    assert TrainingModule(copy.deepcopy(model), cfg).model.lm.is_activation_checkpointing
    cfg.train.activation_checkpointing = False
    assert not TrainingModule(copy.deepcopy(model), cfg).model.lm.is_activation_checkpointing


def test_a_model_without_checkpointing_support_is_refused_in_one_line():
    model = tiny("llama", layers=2)
    type(model.lm).supports_gradient_checkpointing = False
    try:
        cfg = RunConfig()
        cfg.train.activation_checkpointing = True
        with pytest.raises(EexitError, match="does not support gradient checkpointing"):
            TrainingModule(model, cfg)
    finally:
        type(model.lm).supports_gradient_checkpointing = True
