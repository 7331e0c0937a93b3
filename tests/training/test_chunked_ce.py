"""The memory-bounded exit loss (training/chunked_ce.py, train.logits_chunk_tokens): the same loss
and gradients as the whole-logits loss, for every loss that uses exit CE, shared and separate
heads, lens adapters, a chunk that does not divide the tokens, sampled positions; and its memory
follows the chunk."""

import pytest
import torch

from eexit.config import LossConfig
from eexit.training.chunked_ce import IGNORE_INDEX, linear_ce
from eexit.training.losses import LossBatch, make_loss
from tests.helpers import tiny

LOSSES = ["final", "weighted-ce", "aux", "deep-supervision", "free-kd", "layerskip", "ponder"]


def loss_and_grads(model, name, chunk, fraction=1.0, seed=0):
    model.zero_grad()
    torch.manual_seed(seed)
    x = torch.randint(0, 97, (3, 9))
    y = torch.randint(0, 97, (3, 9))
    torch.manual_seed(seed + 1)  # the same sampled positions in both runs
    batch = LossBatch(model, model(x), y, fraction, logits_chunk_tokens=chunk)
    loss, _ = make_loss(LossConfig(name=name))(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        assert torch.allclose(grads_a[n], grads_b[n], rtol=1e-5, atol=1e-7), n


@pytest.mark.parametrize("name", LOSSES)
def test_every_exit_loss_chunked_equals_whole(name):
    model = tiny("llama", layers=3, gate=name == "ponder")
    whole = loss_and_grads(model, name, 0)
    assert_same(loss_and_grads(model, name, 5), whole)  # 27 tokens: chunks of 5, 5, ..., 2


@pytest.mark.parametrize("heads", ["separate", "lens"])
def test_separate_heads_and_lens_adapters_chunked_equal_whole(heads):
    model = tiny("gpt2", layers=3, heads=heads)
    torch.manual_seed(5)
    for p in model.translators.parameters():  # lens: live adapters, not the identity start
        p.data.normal_(0, 0.05)
    whole = loss_and_grads(model, "weighted-ce", 0)
    assert_same(loss_and_grads(model, "weighted-ce", 4), whole)


def test_sampled_positions_chunked_equal_whole():
    model = tiny("llama", layers=3)
    whole = loss_and_grads(model, "weighted-ce", 0, fraction=0.5)
    assert_same(loss_and_grads(model, "weighted-ce", 3, fraction=0.5), whole)


def test_ignored_targets_count_nothing_and_get_no_gradient():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 11)
    x = torch.randn(10, 8, requires_grad=True)
    t = torch.randint(0, 11, (10,))
    t[[2, 7]] = IGNORE_INDEX
    ref = torch.nn.functional.cross_entropy(lin(x).float(), t, reduction="none")
    gx_ref, gw_ref = torch.autograd.grad(ref.sum(), [x, lin.weight])
    out = linear_ce(x, lin, t, chunk=3)
    assert torch.allclose(out, ref, atol=1e-6) and out[2] == 0 and out[7] == 0
    gx, gw = torch.autograd.grad(out.sum(), [x, lin.weight])
    assert torch.allclose(gx, gx_ref, atol=1e-6) and torch.allclose(gw, gw_ref, atol=1e-6)
    assert gx[2].abs().max() == 0


def test_the_chunked_loss_keeps_one_chunk_of_logits_not_all():
    """What autograd keeps for the backward pass: the whole loss saves the [N, V] logits, the
    chunked one the inputs and one log-sum-exp per token."""
    torch.manual_seed(0)
    n, d, V = 512, 16, 4096
    lin = torch.nn.Linear(d, V, bias=False)
    x = torch.randn(n, d, requires_grad=True)
    t = torch.randint(0, V, (n,))

    def saved_bytes(fn):
        sizes = []

        def pack(tensor):
            sizes.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            fn().sum()
        return sum(sizes)

    whole = saved_bytes(lambda: linear_ce(x, lin, t, chunk=0))
    chunked = saved_bytes(lambda: linear_ce(x, lin, t, chunk=64))
    assert whole >= n * V * 4  # the float32 logits at least
    # inputs and weight (float32), targets (int64), one log-sum-exp per token: no logits
    assert chunked <= 4 * (n * d + V * d) + 8 * n + 4 * n + 1024


def test_a_negative_chunk_is_refused_in_one_line():
    from eexit.config import RunConfig, validate
    from eexit.errors import EexitError

    cfg = RunConfig()
    cfg.train.logits_chunk_tokens = -1
    with pytest.raises(EexitError, match="logits_chunk_tokens must be >= 0"):
        validate(cfg)


def test_under_mixed_precision_the_backward_pass_recomputes_in_the_same_precision():
    """bf16 autocast (`train --dtype bfloat16`): the chunked loss and its gradients follow the
    whole one within bf16 tolerance, and the backward pass runs (it re-enters the autocast)."""
    model = tiny("llama", layers=3)
    results = []
    for chunk in (0, 5):
        model.zero_grad()
        torch.manual_seed(0)
        x, y = torch.randint(0, 97, (3, 9)), torch.randint(0, 97, (3, 9))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            batch = LossBatch(model, model(x), y, logits_chunk_tokens=chunk)
            loss, _ = make_loss(LossConfig(name="weighted-ce"))(batch)
        loss.backward()
        g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.item(), g))
    (whole, gw), (chunked, gc) = results
    assert chunked == pytest.approx(whole, rel=2e-2)
    for n in gw:
        assert torch.allclose(gc[n], gw[n], rtol=5e-2, atol=5e-3), n
