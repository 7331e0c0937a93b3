"""The one exit rule: offline evaluation, calibration and decoding (full KV) take the same exits,
token for token, for every registered policy and for a custom policy that changes the rule."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from eexit.calibration.calibrate import token_risks
from eexit.evaluation.records import collect_exit_table, exit_indices
from eexit.models.decoding import EarlyExitDecoder
from eexit.models.early_exit import EarlyExitModel
from eexit.policies import POLICIES, ExitPolicy, make_policy
from eexit.policies.learned import CLASSIFIERS

LAYERS = 6


class EvenLayersOnly(ExitPolicy):
    """Custom rule: a score from the first hidden unit, and exits at even layers only."""

    needs_logits = False

    def score(self, view):
        return torch.sigmoid(view.hidden[:, 0].float())

    def exit_rule(self, scores, layers, positions=None, max_steps=None):
        even = torch.as_tensor(layers) % 2 == 0
        return super().exit_rule(scores, layers, positions, max_steps) & even


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = EarlyExitModel(LlamaForCausalLM(cfg).eval(), "all", halting_gate=True).eval()
    with torch.no_grad():
        model.halting_gate.weight.normal_(0, 0.5)
    return model


def bound(name: str, model, min_exit: int) -> ExitPolicy:
    params = {"patience": {"patience": 1}, "topk-saturation": {"k": 1}}.get(name, {})
    if name.endswith("+shortlist"):  # a measure over the first scored exit's top 5 tokens
        name, params = name.removesuffix("+shortlist"), {"shortlist": 5}
    pol = make_policy(name, 0.5, min_exit, **params)
    if pol.needs_classifier:  # a random classifier of the right kind stands in for a fitted one
        torch.manual_seed(2)
        pol.clf, pol.norm = CLASSIFIERS.get(name)(model.hidden_size).eval(), model.parts.final_norm
    return pol


def cases():
    names = [n for n in POLICIES.names() if not POLICIES.get(n).needs_future]
    shortlisted = [("max-prob+shortlist", 1), ("margin+shortlist", 3), ("entropy+shortlist", 2)]
    shortlisted += [("predictor+shortlist", 2)]  # the SpecEE-style predictor, K = 5 (default 8)
    return [(n, m) for n in names for m in (1, 3)] + shortlisted + [("custom", 1)]


@pytest.mark.parametrize("name,min_exit", cases())
def test_evaluation_calibration_and_decoding_take_the_same_exits(llama, name, min_exit):
    model = llama
    prompt = torch.randint(0, 50, (1, 5))
    probe = EvenLayersOnly(0.5, min_exit) if name == "custom" else bound(name, model, min_exit)
    seq = EarlyExitDecoder(model, None, "full").generate(prompt, None, 24).sequences
    table = collect_exit_table(model, seq[:, :-1], seq[:, 1:], probe)
    inner = table.score[:-1][(table.score[:-1] > 0) & (table.score[:-1] < 1)]
    # exits for about half the scores: a threshold midway between two neighbouring scores, so no
    # score sits on it (decoding's and teacher forcing's floats differ in the last bits)
    s = inner.unique().sort().values
    k = len(s) // 2
    pol = probe.at(float(s[k - 1] + s[k]) / 2 if len(s) >= 2 else 0.5)
    out = EarlyExitDecoder(model, pol, "full").generate(prompt, None, 24)
    decoded = out.exit_layers[0, 1:]  # new token t+1 comes from position prompt_len - 1 + t
    # with full KV every decoded token's states equal a teacher-forced pass over the output
    table = collect_exit_table(model, out.sequences[:, :-1], out.sequences[:, 1:], pol)
    idx = exit_indices(table, pol)
    offline = torch.tensor(table.exit_layers)[idx][prompt.shape[1] :]
    assert torch.equal(offline, decoded)
    # calibration's risk at this threshold is the disagreement of exactly these exits
    risk = token_risks(table, pol, [pol.threshold], "consistency")[0]
    cols = torch.arange(table.tokens)
    assert torch.equal(risk, (table.top1[idx, cols] != table.top1[-1]).float())
    assert (decoded < LAYERS).any() or pol.threshold_free  # the test really exits early
    if name == "custom":
        assert (decoded[decoded < LAYERS] % 2 == 0).all()


def test_oracle_is_offline_only_and_uses_the_same_rule(llama):
    x = torch.randint(0, 50, (2, 9))
    pol = make_policy("oracle")
    table = collect_exit_table(llama, x, x, pol)
    idx = exit_indices(table, pol)
    cols = torch.arange(table.tokens)
    assert (table.top1[idx, cols] == table.top1[-1]).all()  # the oracle never changes the output
    with pytest.raises(Exception, match="needs every layer"):
        EarlyExitDecoder(llama, pol, "full")


def test_overriding_decide_is_refused():
    with pytest.raises(TypeError, match="override exit_rule"):

        class Sneaky(ExitPolicy):  # noqa: F841
            def decide(self, view):
                return view.hidden[:, 0] > 0
