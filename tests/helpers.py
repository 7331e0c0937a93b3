"""Small models and policies shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import sys

import torch

from eexit.config import ModelConfig
from eexit.models.early_exit import EarlyExitModel, resolve_exit_layers
from eexit.models.loading import build_lm
from eexit.policies.base import ExitPolicy


def tiny(arch="gpt2", layers=3, exits="all", heads="shared", gate=False, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, n_layers=layers, d_model=32, n_heads=2, d_ff=64, max_len=32)
    return EarlyExitModel(
        build_lm(cfg, 97, 0, 0), resolve_exit_layers(exits, layers), heads, gate
    ).eval()


class HiddenSign(ExitPolicy):
    """Test policy: exit where the first hidden unit is positive (about half of the rows, varying
    per
    row and step even on a barely trained model)."""

    needs_logits = False

    def score(self, view):
        return (view.hidden[:, 0] > 0).float()


# `accelerate launch` as a test starts it on CPUs: no config file, no mixed precision, no dynamo
ACCELERATE_LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]
