"""Shared fixtures: a tiny early-exit LM trained for a few steps on the packaged Wikipedia text."""

from __future__ import annotations

import io
import os
import re
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

TINY = [
    "model.n_layers=3",
    "model.d_model=32",
    "model.n_heads=2",
    "model.d_ff=64",
    "model.max_len=32",
    "model.vocab_size=257",  # the smallest byte-level BPE: 256 bytes + end-of-text
    "data.seq_len=32",
    "train.batch_size=4",
    "train.steps=6",
    "train.eval_every=3",
    "train.save_every=3",
    "train.eval_batches=2",
    "train.warmup_steps=2",
    "train.log_every=1",
]


def tiny_overrides(*extra: str) -> list[str]:
    return [a for kv in TINY + list(extra) for a in ("--set", kv)]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["EEXIT_CACHE"] = str(tmp_path_factory.mktemp("eexit-cache"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from eexit import quiet

    quiet()  # transformers / datasets: no info logs, no progress bars


LOG_LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] ")


def message_lines(stderr: str) -> list[str]:
    """stderr without the timestamped progress lines: what the user is told."""
    return [ln for ln in stderr.strip().splitlines() if ln.strip() and not LOG_LINE.match(ln)]


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run `eexit ARGS` in this process; return (exit code, stdout, stderr)."""
    from eexit.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = sys.argv
    sys.argv = ["eexit", *args]
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 3-layer weighted-CE model with exits after every layer."""
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    code, _, err = run_cli("train", "--loss", "weighted-ce", *tiny_overrides(), "--out", str(out))
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def t5():
    """A random 3+3-layer T5 with large weights (varied, confident predictions) and a padded source
    batch."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from eexit.models.early_exit import EarlyExitModel

    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=50,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=3,
        num_decoder_layers=3,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    lm = T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # large random weights: varied, confident predictions without training
        for p in lm.parameters():
            p.normal_(0, 0.5)
    lm.generation_config.eos_token_id = lm.config.eos_token_id = None
    model = EarlyExitModel(lm, "all").eval()
    ids = torch.randint(2, 50, (3, 9))
    mask = torch.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = 0, 0  # right-padded sources
    ids[2, 4:], mask[2, 4:] = 0, 0
    return model, ids, mask
