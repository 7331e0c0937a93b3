"""A fitted classifier records the model it was fitted on (depth, width, vocabulary, exits,
weights hash) and is refused on another model, naming both; on its own model it loads."""

import pytest

from eexit.errors import EexitError
from eexit.models.identity import model_identity
from eexit.policies import make_policy
from eexit.policies.learned import CLASSIFIERS, save_classifier
from tests.helpers import tiny


def fitted_on(model, folder):
    clf = CLASSIFIERS.get("meta")(model.hidden_size)
    meta = {"hidden_size": model.hidden_size, "model": model_identity(model)}
    return save_classifier(folder, "meta", clf, meta)


def test_a_classifier_is_refused_on_another_model(tmp_path):
    a, same_shape_other_weights, deeper = tiny(seed=0), tiny(seed=1), tiny(layers=4)
    path = fitted_on(a, tmp_path)
    policy = make_policy("meta", 0.5, 1, classifier=str(path))
    policy.bind(a, tmp_path)  # its own model: loads
    for other, words in ((same_shape_other_weights, "weights"), (deeper, "4 layers")):
        with pytest.raises(EexitError, match="fitted on another model") as e:
            make_policy("meta", 0.5, 1, classifier=str(path)).bind(other, tmp_path)
        assert "3 layers" in str(e.value) and words in str(e.value)


def test_identity_changes_with_the_weights_and_not_otherwise():
    assert model_identity(tiny(seed=0)) == model_identity(tiny(seed=0))
    assert model_identity(tiny(seed=0)) != model_identity(tiny(seed=1))


def test_a_run_on_fewer_exits_keeps_the_classifier_but_not_on_other_exits(tmp_path):
    """`--exit-layers 1,3` selects exits of the model the classifier was fitted on: allowed.
    A file fitted on exits 2,3 only does not know exit 1: refused, naming the exits."""
    every = tiny(seed=0)  # 3 layers, exits 1, 2, 3
    path = fitted_on(every, tmp_path / "all")
    fewer = tiny(seed=0, exits="1,3")
    make_policy("meta", 0.5, 1, classifier=str(path)).bind(fewer, tmp_path)
    part = fitted_on(tiny(seed=0, exits="2,3"), tmp_path / "part")
    with pytest.raises(EexitError, match="exits 2,3") as e:
        make_policy("meta", 0.5, 1, classifier=str(part)).bind(every, tmp_path)
    assert "exits 1,2,3" in str(e.value)
