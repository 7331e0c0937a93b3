"""docs/extending.md: every worked example runs as written and does what the guide says."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

from eexit.config import LossConfig
from eexit.data.corpora import corpus_split, load_corpus
from eexit.data.names import CORPORA
from eexit.data.tasks import TASKS, Example, get_task
from eexit.models.decoding import EarlyExitDecoder
from eexit.policies import POLICIES, make_policy
from eexit.training.losses import LOSSES, LossBatch, make_loss
from tests.helpers import tiny

DOC = Path(__file__).resolve().parents[2] / "docs" / "extending.md"


def examples() -> dict[str, str]:
    blocks = re.findall(r"```python\n# example: ([a-z]+)[^\n]*\n(.*?)```", DOC.read_text(), re.S)
    return {name: code for name, code in blocks}


@pytest.fixture
def run_example():
    """Execute one example of the guide; unregister what it registered afterwards."""
    added: list[tuple[object, str]] = []

    def run(name: str, registry, registered: str) -> dict:
        module = types.ModuleType(f"docs_example_{name}")
        sys.modules[module.__name__] = module  # dataclasses look their module up
        exec(compile(examples()[name], f"{DOC}:{name}", "exec"), module.__dict__)
        assert registered in registry
        added.append((registry, registered, module.__name__))
        return module.__dict__

    yield run
    for registry, name, module in added:
        registry.remove(name)
        sys.modules.pop(module, None)


def test_the_guide_has_one_example_per_kind():
    assert sorted(examples()) == ["dataset", "family", "loss", "metric", "policy"]


def test_policy_example(run_example):
    run_example("policy", POLICIES, "top2-ratio")
    model = tiny(layers=3)
    x = torch.randint(0, 97, (2, 8))
    never = EarlyExitDecoder(model, make_policy("top2-ratio", 1.0), "full").generate(x, None, 6)
    assert (never.exit_layers[:, 1:] == 3).all()  # threshold 1.0 never exits early
    always = EarlyExitDecoder(model, make_policy("top2-ratio", 0.0), "full").generate(x, None, 6)
    assert (always.exit_layers[:, 1:] == 1).all()  # threshold 0 exits at the first exit
    # the score is 1 - p2/p1, checked against the exit's softmax
    states = model(x, with_inputs=True)
    probs = torch.softmax(model.exit_logits(states[1][0], 1).float(), -1)
    top = probs.topk(2, -1).values
    pol = make_policy("top2-ratio")
    from eexit.policies import ExitView

    view = ExitView(1, 3, [s[0] for s in states], lambda: model.exit_logits(states[1][0], 1))
    torch.testing.assert_close(pol.score(view), 1 - top[:, 1] / top[:, 0])


def test_loss_example(run_example):
    run_example("loss", LOSSES, "last-two")
    model = tiny(layers=3)
    torch.manual_seed(0)
    x, y = torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8))
    batch = LossBatch(model, model(x), y)
    loss, logs = make_loss(LossConfig(name="last-two", params={"weight": 0.3}))(batch)

    def ce(layer):
        logits = model.exit_logits(batch.states[layer - 1], layer)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 97), y.reshape(-1))

    assert loss.item() == pytest.approx((ce(3) + 0.3 * ce(2)).item(), rel=1e-5)
    assert logs["ce_last"] == pytest.approx(ce(3).item(), rel=1e-5)


def test_family_example_is_the_qwen2_file():
    """The guide shows eexit/models/families/qwen2.py verbatim (tested in test_qwen2.py)."""
    source = Path(__file__).resolve().parents[2] / "eexit" / "models" / "families" / "qwen2.py"
    assert examples()["family"] == source.read_text()


def test_metric_example(run_example):
    run_example("metric", TASKS, "copy")
    task = get_task("copy")
    exs = [Example(source="abc", target="abc"), Example(source="abcd", target="abcd")]
    scores = task.score(["abc", "abxd"], exs)
    assert scores == {"exact": 50.0, "char_acc": pytest.approx(100 * 6 / 7)}


def test_dataset_example(run_example):
    run_example("dataset", CORPORA, "counting")
    corpus = load_corpus("counting")
    assert sum(len(corpus_split(corpus, s, "counting")) for s in corpus) == 200
    assert load_corpus("counting") == corpus  # the split is a function of the document keys
