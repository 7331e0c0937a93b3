import json

import pytest
import torch

from eexit.errors import EexitError
from eexit.models.early_exit import resolve_exit_layers
from eexit.models.loading import load_model
from tests.helpers import tiny


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_last_exit_equals_the_models_own_logits(arch):
    m = tiny(arch)
    x = torch.randint(0, 97, (2, 11))
    states = m(x)
    assert len(states) == 3
    ours = m.exit_logits(states[-1], 3)
    theirs = m.lm(x).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    # an intermediate exit differs from the final one (it reads an earlier state)
    assert not torch.allclose(m.exit_logits(states[0], 1), theirs, atol=1e-3)


def test_resolve_exit_layers():
    assert resolve_exit_layers("all", 4) == [1, 2, 3, 4]
    assert resolve_exit_layers([1, 3], 3) == [1, 3]
    assert resolve_exit_layers("2", 4) == [2, 4]  # last layer always added
    assert resolve_exit_layers("all", 6, min_exit_layer=4) == [4, 5, 6]
    with pytest.raises(EexitError, match=r"in 1\.\.3"):
        resolve_exit_layers([0, 5], 3)


def test_separate_heads_start_equal_to_the_shared_head_and_are_used():
    m = tiny(exits=[1, 3], heads="separate")
    assert list(m.exit_heads) == ["1"]
    h = torch.randn(5, 32)
    assert torch.allclose(m.exit_logits(h, 1), m.exit_logits(h, 3), atol=1e-6)
    with torch.no_grad():
        m.exit_heads["1"][1].weight.add_(1.0)
    assert not torch.allclose(m.exit_logits(h, 1), m.exit_logits(h, 3))


def test_save_and_load_roundtrip_and_plain_transformers_load(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    m = tiny(exits=[1, 3], heads="separate", gate=True)
    with torch.no_grad():
        m.exit_heads["1"][1].weight.mul_(2.0)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    )
    m.save(tmp_path / "ck", tok, {"note": "x"})
    meta = json.loads((tmp_path / "ck" / "eexit.json").read_text())
    assert (
        meta["exit_layers"] == [1, 3] and meta["exit_heads"] == "separate" and meta["halting_gate"]
    )
    loaded, _, info = load_model(str(tmp_path / "ck"))
    assert loaded.exit_layers == [1, 3] and info.extra["note"] == "x"
    assert info.exit_heads == "separate" and info.halting_gate and info.folder == tmp_path / "ck"
    h = torch.randn(4, 32)
    assert torch.allclose(loaded.exit_logits(h, 1), m.exit_logits(h, 1), atol=1e-6)
    assert torch.allclose(loaded.halting_gate(h), m.halting_gate(h), atol=1e-6)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")  # backbone loads without eexit
    x = torch.randint(0, 97, (1, 7))
    assert torch.allclose(plain(x).logits, m.lm(x).logits, atol=1e-5)


def test_load_model_errors(tmp_path):
    (tmp_path / "notackpt").mkdir()
    with pytest.raises(EexitError, match="not a model checkpoint"):
        load_model(str(tmp_path / "notackpt"))
    with pytest.raises(EexitError, match="not found"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(EexitError, match="GGUF file not found"):
        load_model(str(tmp_path / "x.gguf"))
