"""LoRA through peft: adapters in the blocks, the rest frozen; the saved checkpoint holds the
merged weights and plain transformers (no peft, no eexit) loads it with the same outputs."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from eexit.models.lora import add_lora, has_lora, merged
from tests.conftest import run_cli, tiny_overrides
from tests.helpers import tiny


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_merged_model_computes_what_the_adapted_one_does(arch, tmp_path):
    m = tiny(arch=arch, layers=2)
    x = torch.randint(0, 97, (2, 7))
    before = m.lm(x).logits
    add_lora(m.lm, rank=4, alpha=8, targets="all-linear")
    assert has_lora(m.lm)
    trainable = [n for n, p in m.lm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert torch.allclose(m.lm(x).logits, before)  # LoRA starts as the identity (B = 0)
    with torch.no_grad():
        for n, p in m.lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    adapted = m.lm(x).logits
    assert (adapted - before).abs().max() > 1e-3
    plain = merged(m.lm)
    assert not has_lora(plain) and has_lora(m.lm)  # a merged copy; training goes on unmerged
    assert torch.allclose(plain(x).logits, adapted, atol=1e-5)
    m.save(tmp_path / "ck")
    assert not any("lora" in k for k in load_file(str(tmp_path / "ck" / "model.safetensors")))
    # plain transformers, in a process without eexit or peft imported
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ck')!r})\n"
        f"x = torch.tensor({x.tolist()})\n"
        "torch.save(m(x).logits, sys.argv[1])\n"
        "assert 'peft' not in sys.modules and 'eexit' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "l.pt")], capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-1500:]
    assert torch.allclose(torch.load(tmp_path / "l.pt"), adapted, atol=1e-5)


def test_lora_training_changes_only_the_adapted_layers_and_resumes_exactly(
    tiny_checkpoint, tmp_path
):
    args = tiny_overrides(
        f"model.pretrained={tiny_checkpoint}",
        "model.lora_rank=4",
        "train.lr=1e-2",
        "train.layer_dropout=0.2",
        "loss.params.curriculum=rotational",
    )
    code, _, err = run_cli("train", "--loss", "layerskip", *args, "--out", str(tmp_path / "full"))
    assert code == 0, err
    base = load_file(str(tiny_checkpoint / "model.safetensors"))
    tuned = load_file(str(tmp_path / "full" / "model.safetensors"))
    assert set(tuned) == set(base)  # merged: the plain model's keys, no adapter tensors
    attn = [k for k in base if k.endswith("attn.c_attn.weight")]
    assert attn and all((tuned[k] - base[k]).abs().max() > 1e-4 for k in attn)
    frozen = [k for k in base if "wte" in k or "ln_" in k]
    assert frozen and all(torch.equal(tuned[k], base[k]) for k in frozen)
    meta = json.loads((tmp_path / "full" / "eexit.json").read_text())
    assert meta["train_config"]["model"]["lora_rank"] == 4
    card = (tmp_path / "full" / "README.md").read_text()
    assert "LoRA rank 4" in card and "merged into these weights" in card
    assert "started from `tiny` (pretrained)" in card and "- size:" not in card
    assert "layer dropout up to 0.2 (exp scale" in card
    # stopped at a checkpoint and resumed (unmerged LoRA weights from accelerate's state)
    cut = ["train", "--loss", "layerskip", *args, "--out", str(tmp_path / "cut")]
    code, _, err = run_cli(*cut, "--stop-after", "3")
    assert code == 0, err
    code, _, err = run_cli(*cut, "--resume")
    assert code == 0, err
    again = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.equal(again[k], tuned[k]) for k in tuned)
