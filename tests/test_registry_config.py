import pytest

from eexit.config import load_config
from eexit.errors import EexitError
from eexit.policies.base import POLICIES
from eexit.policies.thresholds import parse_thresholds
from eexit.registry import Registry
from eexit.training.losses import LOSSES


def test_registry_did_you_mean_lists_valid_names():
    with pytest.raises(EexitError) as e:
        LOSSES.get("weighted_ce")
    msg = str(e.value)
    assert "did you mean 'weighted-ce'" in msg
    for name in ["final", "weighted-ce", "aux", "deep-supervision", "free-kd", "ponder"]:
        assert name in msg
    assert set(POLICIES.names()) >= {
        "max-prob",
        "margin",
        "entropy",
        "saturation",
        "static",
        "oracle",
    }


def test_registry_rejects_double_registration():
    r = Registry("thing")
    r.register("a")(object)
    with pytest.raises(ValueError):
        r.register("a")(object)


def test_yaml_then_overrides_precedence(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  n_layers: 6\n  exit_layers: [2, 4]\ntrain:\n  lr: 0.01\n  steps: 7\n")
    cfg = load_config(p, ["train.lr=3e-4", "loss.name=aux"])
    assert cfg.model.n_layers == 6 and cfg.model.exit_layers == [2, 4]
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.steps == 7
    assert cfg.loss.name == "aux"
    assert cfg.model.d_model == 128  # default untouched


def test_unknown_config_key_is_an_error(tmp_path):
    with pytest.raises(EexitError, match="did you mean 'train.lr'"):
        load_config(None, ["train.lrr=1"])
    p = tmp_path / "c.yaml"
    p.write_text("modle:\n  n_layers: 2\n")
    with pytest.raises(EexitError, match="unknown config key 'modle'"):
        load_config(p)


def test_bad_config_values(tmp_path):
    with pytest.raises(EexitError, match="must be a number"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(EexitError, match="divisible"):
        load_config(None, ["model.d_model=30", "model.n_heads=4"])
    empty = tmp_path / "e.yaml"
    empty.write_text("")
    with pytest.raises(EexitError, match="empty"):
        load_config(empty)


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("0.5:0.95", [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]),
        ("0.2:0.8:0.3", [0.2, 0.5, 0.8]),
        ("0.5,0.7,0.9", [0.5, 0.7, 0.9]),
        ("1.0", [1.0]),
    ],
)
def test_parse_thresholds(spec, expected):
    assert parse_thresholds(spec) == pytest.approx(expected)


@pytest.mark.parametrize(
    "spec,match",
    [
        ("0.5:", "not a number"),
        ("0.9:0.5", "below the start"),
        ("0.5:0.9:0", "step must be positive"),
        ("1:2:3:4", "malformed"),
        ("0.5,1.5", r"in \[0, 1\]"),
        ("-0.1:0.5", r"in \[0, 1\]"),
        ("", "empty"),
    ],
)
def test_parse_thresholds_rejects(spec, match):
    with pytest.raises(EexitError, match=match):
        parse_thresholds(spec)
