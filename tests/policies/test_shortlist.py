"""Softmax measures over a shortlist (`--param shortlist=K`): the first scored exit's top-K
tokens are the only candidates later; K = V reproduces the full measure, a small K costs
less in the tables."""

import pytest
import torch

from eexit.evaluation.records import collect_exit_table, exit_metrics
from eexit.policies import make_policy
from tests.helpers import tiny


@pytest.mark.parametrize("name", ["max-prob", "margin", "entropy"])
def test_a_shortlist_of_the_whole_vocabulary_is_the_full_measure(name):
    model = tiny(layers=3)
    torch.manual_seed(0)
    x = torch.randint(0, 97, (2, 9))
    full = collect_exit_table(model, x, x, make_policy(name, 0.5))
    short = collect_exit_table(model, x, x, make_policy(name, 0.5, shortlist=97))
    torch.testing.assert_close(short.score, full.score, atol=1e-5, rtol=1e-4)


def test_a_small_shortlist_costs_less_and_is_counted_honestly():
    model = tiny(layers=3)
    torch.manual_seed(0)
    x = torch.randint(0, 97, (4, 16))
    full_pol, short_pol = make_policy("max-prob", 1.0), make_policy("max-prob", 1.0, shortlist=8)
    full = exit_metrics(collect_exit_table(model, x, x, full_pol), full_pol)
    short = exit_metrics(collect_exit_table(model, x, x, short_pol), short_pol)
    # never exiting: full = 2 decisions x (head + softmax); shortlist = 1 full + 1 of 8 tokens
    d, V, K = model.hidden_size, model.vocab_size, 8
    assert short["overhead_pct"] < full["overhead_pct"]
    ratio = short["overhead_pct"] / full["overhead_pct"]
    assert ratio == pytest.approx(((d * V + 4 * V) + (d * K + 4 * K)) / (2 * (d * V + 4 * V)))
    assert make_policy("max-prob", shortlist=8).stateful  # scored at every exit
    with pytest.raises(Exception, match="shortlist must be >= 0"):
        make_policy("margin", shortlist=-1)


def test_a_shortlist_beyond_the_vocabulary_is_refused_and_never_counted_above_it():
    """K > V scores the V tokens there are: the cost columns count V, not K (a K of 10,000 on a
    97-token model once reported a 30-fold overhead), and a loaded model refuses it."""
    from eexit.errors import EexitError

    model = tiny(layers=3)
    torch.manual_seed(0)
    x = torch.randint(0, 97, (2, 16))
    at_v, above = (
        make_policy("margin", 1.0, shortlist=97),
        make_policy("margin", 1.0, shortlist=10_000),
    )
    d, V = model.hidden_size, model.vocab_size
    assert above.decision_macs(d, V) == at_v.decision_macs(d, V) == d * V + 4 * V
    assert above.first_decision_extra_macs(d, V) == 0.0  # K = V: the first decision is the same
    rows = [exit_metrics(collect_exit_table(model, x, x, p), p) for p in (at_v, above)]
    assert rows[0]["overhead_pct"] == pytest.approx(rows[1]["overhead_pct"])
    assert rows[0]["ppl"] == pytest.approx(rows[1]["ppl"])
    with pytest.raises(EexitError, match=r"shortlist=10000 .* must be <= 97"):
        above.check_model(model)
    at_v.check_model(model)  # K = V is allowed
