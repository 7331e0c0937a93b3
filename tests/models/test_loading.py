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

    # offline and not cached: said at once, naming where it looked, without asking the hub
    with pytest.raises(EexitError, match="no hub model 'HuggingFaceTB/SmolLM2-135M' in the local"):
        load_model("HuggingFaceTB/SmolLM2-135M")


def test_gguf_dequantizing_progress_is_one_log_line_off_a_terminal(capsys):
    """Off a terminal transformers' GGUF tqdm bar (a line of carriage returns in CI logs) is
    replaced by one log line for the load, then restored."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from eexit.models.loading import gguf_progress

    bar = gguf_utils.tqdm
    with gguf_progress(True):
        assert gguf_utils.tqdm is not bar and list(gguf_utils.tqdm([1, 2], desc="x")) == [1, 2]
    assert gguf_utils.tqdm is bar
    assert "de-quantizing the GGUF weights" in capsys.readouterr().err
    with gguf_progress(False):  # not a GGUF file: nothing changes
        assert gguf_utils.tqdm is bar
