"""LayerSkip's layer dropout: rates rising with depth, a skipped block passes its input through
for that row only, nothing skipped in evaluation."""

import math

import pytest
import torch

from eexit.training.layer_dropout import layer_dropout, layer_dropout_rates
from tests.helpers import tiny


def test_rates_rise_with_depth_from_zero_to_the_maximum():
    exp = layer_dropout_rates(4, 0.2, "exp")
    assert exp == pytest.approx([0.0, 0.2 * (2 ** (1 / 3) - 1), 0.2 * (2 ** (2 / 3) - 1), 0.2])
    assert layer_dropout_rates(5, 0.2, "linear") == pytest.approx([0, 0.05, 0.1, 0.15, 0.2])
    assert layer_dropout_rates(3, 0.1, "uniform") == [0.1] * 3
    assert all(math.isclose(r, 0) for r in layer_dropout_rates(4, 0.0))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_skipped_block_passes_its_input_through_for_that_row_only(arch):
    m = tiny(arch=arch, layers=3)
    x = torch.randint(0, 97, (64, 6))
    plain = m(x)
    torch.manual_seed(0)
    with layer_dropout(m.parts.layers, [0.0, 0.5, 0.0]):
        dropped = m(x)
    skipped = (dropped[1] == dropped[0]).flatten(1).all(1)  # block 2's output is its input
    assert 10 < int(skipped.sum()) < 54  # about half of the 64 rows
    kept = ~skipped
    assert torch.equal(dropped[1][kept], plain[1][kept])  # other rows: block 2 ran as usual
    assert torch.allclose(dropped[0], plain[0])  # block 1 is never skipped at rate 0
    # hooks are gone afterwards
    assert all(torch.equal(a, b) for a, b in zip(m(x), plain))


def test_training_module_skips_only_in_training(tmp_path):
    from eexit.config import RunConfig
    from eexit.training.loop import TrainingModule

    cfg = RunConfig()
    cfg.train.layer_dropout = 0.9
    module = TrainingModule(tiny(layers=3), cfg)
    assert module.skip_rates == pytest.approx(layer_dropout_rates(3, 0.9))
    x, y = torch.randint(0, 97, (8, 6)), torch.randint(0, 97, (8, 6))
    module.eval()
    a, b = module(x, y)[0], module(x, y)[0]
    assert a.item() == b.item()  # no skipping: deterministic
    module.train()
    torch.manual_seed(1)
    losses = {round(module(x, y)[0].item(), 6) for _ in range(4)}
    assert len(losses) > 1  # skipping varies the loss from draw to draw
