"""The hub paths stay in the code for users who have the hub; offline they fail with one clear
line."""

import pytest

from eexit.errors import EexitError


@pytest.fixture
def offline(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_hub_dataset_offline_is_a_one_line_error(offline):
    from eexit.data.corpora import load_corpus

    with pytest.raises(EexitError, match="could not load hub dataset 'Salesforce/wikitext'"):
        load_corpus("wikitext")
    with pytest.raises(EexitError, match="could not load hub dataset 'someone/corpus'"):
        load_corpus("hf:someone/corpus:cfg")


def test_hub_model_offline_is_a_one_line_error(offline):
    from eexit.models.loading import load_model

    with pytest.raises(EexitError, match="could not load model 'HuggingFaceTB/SmolLM2-135M'"):
        load_model("HuggingFaceTB/SmolLM2-135M")
