"""Exit adapters (exit_heads lens): identity at initialisation, trained by KL to the model's own
final distribution on a frozen backbone (full-depth model unchanged), saved and loaded."""

import json

import torch
from safetensors.torch import load_file

from eexit.models.early_exit import EarlyExitModel
from eexit.models.loading import load_model
from tests.conftest import run_cli, tiny_overrides
from tests.helpers import tiny


def test_an_untrained_adapter_is_the_plain_exit():
    plain = tiny(layers=3)
    for rank in (0, 4):
        lens = EarlyExitModel(plain.lm, "all", "lens", lens_rank=rank).eval()
        h = torch.randn(5, 32)
        torch.testing.assert_close(lens.exit_logits(h, 1), plain.exit_logits(h, 1))
        assert sorted(lens.translators) == ["1", "2"]  # the last exit is the model's own


def agreement_at_layer_1(spec, windows):
    model, _, _ = load_model(spec)
    with torch.no_grad():
        states = model(windows)
        first = model.exit_logits(states[0], 1).argmax(-1)
        final = model.exit_logits(states[-1], 3).argmax(-1)
    return (first == final).float().mean().item()


def test_lens_kl_on_a_frozen_backbone(tiny_checkpoint, tmp_path):
    out = tmp_path / "lens"
    args = tiny_overrides(
        f"model.pretrained={tiny_checkpoint}",
        "model.exit_heads=lens",
        "model.lens_rank=8",
        "model.freeze_backbone=true",
        "loss.name=lens-kl",
        "train.steps=30",
        "train.lr=3e-2",
        "train.eval_every=30",
        "train.save_every=30",
        "loss.params.exits_per_step=1",
    )
    code, _, err = run_cli("train", *args, "--out", str(out))
    assert code == 0, err
    # the backbone is untouched: same weights as the checkpoint it started from
    before, after = (load_file(str(p / "model.safetensors")) for p in (tiny_checkpoint, out))
    assert all(torch.equal(before[k], after[k]) for k in before)
    meta = json.loads((out / "eexit.json").read_text())
    assert meta["exit_heads"] == "lens" and meta["lens_rank"] == 8
    extras = load_file(str(out / "exit_modules.safetensors"))
    assert any(k.startswith("translators.1.") for k in extras)
    # the adapters learned something: the exits agree more with the final layer
    torch.manual_seed(0)
    windows = torch.randint(0, 256, (8, 32))
    assert agreement_at_layer_1(str(out), windows) > agreement_at_layer_1(
        str(tiny_checkpoint), windows
    )
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    kls = [r["kl@1"] for r in log if "kl@1" in r] + [r["kl@2"] for r in log if "kl@2" in r]
    assert kls and min(kls) < max(kls)


def test_freeze_backbone_needs_something_to_train(tmp_path):
    code, _, err = run_cli(
        "train", *tiny_overrides("model.freeze_backbone=true"), "--out", str(tmp_path / "x")
    )
    assert code == 2 and "leaves nothing to train" in err
