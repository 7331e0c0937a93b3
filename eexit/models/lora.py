"""LoRA on the backbone through `peft` (LayerSkip's recipe fine-tunes the whole model; LoRA is
the cheap variant): adapters injected into the backbone's linear layers in place, so every
eexit path that calls the blocks runs them; the rest of the backbone is frozen. A saved
checkpoint holds the merged weights, which plain `transformers` loads without peft."""

from __future__ import annotations

import copy

from torch import nn

from eexit.errors import EexitError


def add_lora(lm: nn.Module, rank: int, alpha: float, targets) -> None:
    """Inject rank-`rank` LoRA adapters into `targets` of `lm` (peft's names, or "all-linear":
    every linear layer of the blocks, not the LM head) and freeze everything else of `lm`."""
    from peft import LoraConfig, inject_adapter_in_model

    # GPT-2's Conv1D stores its weight transposed: peft is told so rather than warning
    conv1d = any(type(m).__name__ == "Conv1D" for m in lm.modules())
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets,
        lora_dropout=0.0,
        fan_in_fan_out=conv1d,
    )
    try:
        inject_adapter_in_model(config, lm)
    except ValueError as e:
        if "not found" not in str(e) and "match" not in str(e):
            raise
        names = sorted({n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if _linear(m)})
        raise EexitError(
            f'model.lora_targets {targets!r} match no layer of the model; use "all-linear" '
            f"or names among: {', '.join(names)}"
        ) from None
    for name, param in lm.named_parameters():
        param.requires_grad_("lora_" in name)


def _linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def has_lora(lm: nn.Module) -> bool:
    """Whether `lm` carries LoRA adapters (checked by name: no peft import when it does not)."""
    return any("lora_" in name for name, _ in lm.named_parameters())


def merged(lm: nn.Module) -> nn.Module:
    """A copy of `lm` with every LoRA adapter merged into its base layer (a plain model)."""
    from peft.tuners.lora import LoraLayer

    out = copy.deepcopy(lm)
    for name, module in list(out.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = out.get_submodule(parent_name) if parent_name else out
            setattr(parent, child, module.get_base_layer())
    return out
