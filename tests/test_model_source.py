"""Where `--model` points (`eexit.model_source`): paths are never sent to the hub, a hub id is
tried only when the hub answers or the id is cached, and "not found" says where it looked."""

import pytest

from eexit import model_source as ms
from eexit.errors import EexitError


@pytest.mark.parametrize(
    "spec,local",
    [
        ("gpt2", False),
        ("HuggingFaceTB/SmolLM2-135M", False),
        ("owner/name.v2", False),
        ("nothere/typo", False),  # shaped like owner/name: the hub is asked (if it answers)
        ("./checkpoints/typo", True),
        ("/abs/model", True),
        ("~/model", True),
        ("a/b/c", True),
        ("folder/", True),
        ("bad name", True),
        ("owner/na..me", True),
        ("model.pt", True),
        ("owner/model.safetensors", True),
        ("weights.bin", True),
    ],
)
def test_what_looks_like_a_path(spec, local):
    assert ms.looks_local(spec) is local


def test_a_folder_that_exists_makes_a_nested_name_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not ms.looks_local("checkpoints/typo")
    (tmp_path / "checkpoints").mkdir()
    assert ms.looks_local("checkpoints/typo")
    with pytest.raises(EexitError, match="model checkpoint not found: checkpoints/typo"):
        ms.model_source("checkpoints/typo")


def test_offline_hub_is_not_asked_and_the_message_names_both_places(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    asked = []
    monkeypatch.setattr(ms, "hub_reachable", lambda *a: asked.append(1) or True)
    monkeypatch.setattr(ms, "_ACCESS", {})
    with pytest.raises(EexitError) as e:
        ms.model_source("owner/typo")
    msg = str(e.value)
    assert f"no file or folder owner/typo in {tmp_path}" in msg
    assert "no hub model 'owner/typo' in the local hub cache (HF_HUB_OFFLINE is set" in msg
    assert asked == []  # offline: not even a connection attempt


def test_an_unreachable_hub_loads_a_cached_id_from_the_cache_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(ms, "_ACCESS", {})
    monkeypatch.setattr(ms, "hub_reachable", lambda *a: False)
    monkeypatch.setattr(ms, "in_hub_cache", lambda spec: spec == "owner/cached")
    assert ms.model_source("owner/cached") == ("owner/cached", {"local_files_only": True})
    with pytest.raises(EexitError, match="could not be reached within 3 s"):
        ms.model_source("owner/missing")
    monkeypatch.setattr(ms, "hub_reachable", lambda *a: True)
    assert ms.model_source("owner/online") == ("owner/online", {})  # transformers asks the hub


def test_reachability_gives_up_within_its_timeout(monkeypatch):
    import time

    def hang(*a, **k):
        time.sleep(3)
        raise OSError("timed out")

    monkeypatch.setattr(ms.socket, "create_connection", hang)
    t0 = time.perf_counter()
    assert ms.hub_reachable(timeout=0.2) is False
    assert time.perf_counter() - t0 < 2


def test_transformers_repository_errors_are_recognised():
    class RepositoryNotFoundError(Exception):
        pass

    wrapped = OSError("x is not a local folder and is not a valid model identifier listed on hub")
    try:
        try:
            raise RepositoryNotFoundError("404")
        except RepositoryNotFoundError as inner:
            raise OSError("could not load") from inner
    except OSError as outer:
        assert ms.not_on_hub(outer)
    assert ms.not_on_hub(wrapped)
    assert not ms.not_on_hub(ValueError("truncated safetensors"))
