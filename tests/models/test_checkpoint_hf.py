"""eexit checkpoints are proper Hugging Face artefacts: plain transformers (eexit not imported)
loads them and decodes the same greedy tokens; the tokenizer is a standard fast tokenizer with
model_max_length and input ids + attention mask only; a model card; exits in config.json."""

import json
import subprocess
import sys

import torch

from eexit.models.decoding import EarlyExitDecoder
from eexit.models.loading import load_model
from eexit.policies import make_policy

PLAIN = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder = sys.argv[1]
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
enc = tok("The history of the war", return_tensors="pt", truncation=True)
out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
print(json.dumps({"keys": sorted(enc.keys()), "ids": out[0].tolist(),
                  "max_len": tok.model_max_length, "class": type(tok).__name__,
                  "eexit_loaded": "eexit" in sys.modules}))
"""


def test_plain_transformers_loads_the_checkpoint_and_decodes_the_same(tiny_checkpoint):
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN, str(tiny_checkpoint)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    plain = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not plain["eexit_loaded"]
    assert plain["keys"] == ["attention_mask", "input_ids"]
    # transformers 5 names its standard fast tokenizer TokenizersBackend (PreTrainedTokenizerFast)
    assert plain["max_len"] == 32 and plain["class"] in (
        "TokenizersBackend",
        "PreTrainedTokenizerFast",
    )
    model, tok, _ = load_model(str(tiny_checkpoint))
    ids = torch.tensor([tok("The history of the war")["input_ids"]])
    never = make_policy("max-prob", threshold=1.0)
    ours = EarlyExitDecoder(model, never, "full").generate(ids, None, 8).sequences[0].tolist()
    assert plain["ids"][: len(ours)] == ours


def test_model_card_and_exits_in_config_json(tiny_checkpoint):
    card = (tiny_checkpoint / "README.md").read_text()
    assert "library_name: transformers" in card
    assert "exits after layers: [1, 2, 3]" in card and "loss `weighted-ce`" in card
    assert "validation perplexity per exit: layer 1:" in card
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["eexit"] == {
        "exit_layers": [1, 2, 3],
        "exit_heads": "shared",
        "lens_rank": 0,
        "halting_gate": False,
    }
