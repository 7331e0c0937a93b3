import pytest
import torch
import torch.nn.functional as F

from eexit.config import LossConfig
from eexit.errors import EexitError
from eexit.training.losses import LossBatch, halting_distribution, kd_targets, make_loss
from tests.helpers import tiny


def batch(model, seed=0, fraction=1.0):
    torch.manual_seed(seed)
    x = torch.randint(0, 97, (3, 9))
    y = torch.randint(0, 97, (3, 9))
    return LossBatch(model, model(x), y, fraction), y


def loss_of(name, **params):
    return make_loss(LossConfig(name=name, params=params))


def exact_ce(model, b, layer):
    logits = model.exit_logits(b.states[layer - 1], layer)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b.targets.reshape(-1))


def test_final_equals_transformers_own_lm_loss():
    m = tiny()
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (2, 10))
    b = LossBatch(m, m(ids[:, :-1]), ids[:, 1:])
    loss, _ = loss_of("final")(b)
    assert loss.item() == pytest.approx(m.lm(ids, labels=ids).loss.item(), rel=1e-5)


def test_weighted_ce_uses_calm_weights():
    m = tiny(layers=3)
    b, _ = batch(m)
    loss, logs = loss_of("weighted-ce")(b)
    expected = sum(i / 6 * exact_ce(m, b, i) for i in (1, 2, 3))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(logs) == {"ce@1", "ce@2", "ce@3"}


def test_aux_and_deep_supervision():
    m = tiny(layers=3, exits=[1, 3])
    b, _ = batch(m)
    aux, _ = loss_of("aux")(b)
    assert aux.item() == pytest.approx(
        (0.5 * exact_ce(m, b, 1) + 0.5 * exact_ce(m, b, 3)).item(), rel=1e-5
    )
    ds, _ = loss_of("deep-supervision")(b)
    assert ds.item() == pytest.approx(
        ((exact_ce(m, b, 1) + exact_ce(m, b, 3)) / 2).item(), rel=1e-5
    )
    with pytest.raises(EexitError, match="at least two exit layers"):
        loss_of("aux")(batch(tiny(exits=[3]))[0])


def test_sampled_exit_loss_is_unbiased_and_cheaper():
    m = tiny(layers=3)
    b_full, _ = batch(m)
    exact = loss_of("weighted-ce")(b_full)[0].item()
    estimates = []
    for s in range(200):
        torch.manual_seed(100 + s)
        b = LossBatch(m, b_full.states, b_full.targets, exit_token_fraction=0.25)
        ce = b.exit_ce()
        assert ce.per_layer[1].numel() == round(0.25 * 27) and ce.per_layer[3].numel() == 27
        estimates.append(loss_of("weighted-ce")(b)[0].item())
    mean = sum(estimates) / len(estimates)
    spread = torch.tensor(estimates).std().item()
    assert spread > 0  # it really samples
    assert abs(mean - exact) < 4 * spread / len(estimates) ** 0.5 + 1e-4


def test_free_kd_mappings_and_loss():
    m = tiny(layers=6, exits=[2, 6])
    b, _ = batch(m)
    assert kd_targets(b, 2, "last") == [6, 6]
    assert kd_targets(b, 2, "uniform") == [4, 6]
    assert kd_targets(b, 3, "uniform") == [4, 5, 6]
    mapped = kd_targets(b, 2, "closest")
    for i, j in zip((1, 2), mapped):
        dists = {d: F.mse_loss(b.states[i - 1], b.states[d - 1]).item() for d in range(3, 7)}
        assert j == min(dists, key=dists.get)
    loss, logs = loss_of("free-kd", kd_mapping="last")(b)
    wce = loss_of("weighted-ce")(b)[0]
    n = m.parts.final_norm  # the distilled states are the normed ones the LM head reads
    kd = (
        F.mse_loss(n(b.states[0]), n(b.states[5])) + F.mse_loss(n(b.states[1]), n(b.states[5]))
    ) / 2
    assert loss.item() == pytest.approx((wce + kd).item(), rel=1e-5)
    assert logs["kd"] == pytest.approx(kd.item(), rel=1e-5)


def test_halting_distribution_sums_to_one():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0], [5.0, 5.0]])
    p = halting_distribution(logits)
    assert torch.allclose(p.sum(0), torch.ones(2))
    lam = torch.sigmoid(logits)
    assert p[0, 0].item() == pytest.approx(lam[0, 0].item())
    assert p[1, 0].item() == pytest.approx(((1 - lam[0, 0]) * lam[1, 0]).item())


def test_ponder_loss_trains_the_gate():
    m = tiny(layers=3, gate=True)
    b, _ = batch(m)
    loss, logs = loss_of("ponder", ponder_beta=0.1)(b)
    loss.backward()
    assert m.halting_gate.weight.grad is not None and m.halting_gate.weight.grad.abs().sum() > 0
    assert 1.0 <= logs["mean_exit"] <= 3.0 and logs["entropy"] > 0
    with pytest.raises(EexitError, match="halting gate"):
        loss_of("ponder")(batch(tiny())[0])


def test_loss_params_are_the_losses_own_and_checked():
    assert loss_of("free-kd", kd_weight="0.5").params.kd_weight == 0.5  # cast to the field's type
    with pytest.raises(EexitError, match="did you mean 'loss.params.kd_weight'"):
        loss_of("free-kd", kd_weigth=0.5)
    with pytest.raises(EexitError, match="kd_mapping must be one of last, uniform, closest"):
        loss_of("free-kd", kd_mapping="nearest")
    with pytest.raises(EexitError, match="unknown config key 'loss.params.ponder_beta'"):
        loss_of("weighted-ce", ponder_beta=0.1)  # another loss's setting
    assert make_loss(LossConfig(name="ponder")).needs_halting_gate
    assert not make_loss(LossConfig(name="free-kd")).needs_halting_gate


def test_layerskip_scales_rise_with_depth_and_are_normalised():
    m = tiny(layers=4)
    b, _ = batch(m)
    loss, logs = loss_of("layerskip", curriculum="none")(b)
    # block index l = layer - 1: e_scale * sum_{i<=l} i -> 0, 1, 3; last: L-1 + sum_{i<=2} i = 6
    expected = (0 * exact_ce(m, b, 1) + 1 * exact_ce(m, b, 2) + 3 * exact_ce(m, b, 3)) / 10
    expected = expected + 6 / 10 * exact_ce(m, b, 4)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["exits_on"] == 4.0


def test_layerskip_curricula_choose_the_exits_of_each_step():
    rot = loss_of("layerskip", curriculum="rotational", rotation=2)
    assert [rot.active_exits([1, 2, 3, 4], 4, t, 6) for t in (0, 1, 2)] == [
        [1, 3, 4],
        [2, 4],
        [1, 3, 4],
    ]
    grad = loss_of("layerskip", curriculum="gradual")
    assert [grad.active_exits([1, 2, 3, 4], 4, t, 3) for t in (0, 1, 2)] == [
        [3, 4],
        [2, 3, 4],
        [1, 2, 3, 4],
    ]
    # the loss follows the curriculum: at step 1 (rotational) only exit 2 and the last count
    m = tiny(layers=4)
    b, _ = batch(m)
    b.step = 1
    loss, logs = rot(b)
    expected = (1 * exact_ce(m, b, 2) + 6 * exact_ce(m, b, 4)) / 7
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and logs["exits_on"] == 2.0
    with pytest.raises(EexitError, match="curriculum must be one of none, rotational, gradual"):
        loss_of("layerskip", curriculum="cyclic")
