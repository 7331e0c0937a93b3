"""Early-exit wrapper around a Hugging Face causal LM.

The exit prediction at layer i is the model's own final norm + LM head applied to the hidden
state that block i outputs (optionally a separate norm + head per exit). Works with any
decoder-only `transformers` model whose blocks, final norm and LM head can be located (GPT-2,
Llama, Mistral, Qwen, SmolLM2 GGUF, ...), built from a small config or loaded pretrained.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from eexit.errors import EexitError

EEXIT_META = "eexit.json"
EXTRA_WEIGHTS = "exit_modules.safetensors"


@dataclass
class Parts:
    base: nn.Module  # the model without LM head
    layers: nn.ModuleList  # transformer blocks in order
    final_norm: nn.Module  # norm applied before the LM head
    lm_head: nn.Module  # hidden -> vocabulary logits


def locate_parts(lm: nn.Module) -> Parts:
    base = lm.base_model
    layers = next((getattr(base, n) for n in ("layers", "h", "blocks") if isinstance(getattr(base, n, None), nn.ModuleList)), None)
    norm = next((getattr(base, n) for n in ("norm", "ln_f", "final_layernorm", "norm_f") if getattr(base, n, None) is not None), None)
    head = lm.get_output_embeddings()
    if layers is None or norm is None or head is None:
        raise EexitError(f"cannot find blocks / final norm / LM head in {type(lm).__name__}; supported: decoder-only causal LMs such as GPT-2 and Llama")
    return Parts(base, layers, norm, head)


def resolve_exit_layers(spec, num_layers: int, min_exit_layer: int = 1) -> list[int]:
    """'all' or a list of 1-based layers -> sorted list that always ends with the last layer."""
    if spec in (None, "all"):
        layers = list(range(1, num_layers + 1))
    else:
        if isinstance(spec, str):
            try:
                spec = [int(s) for s in spec.replace(" ", "").split(",") if s]
            except ValueError:
                raise EexitError(f"exit layers must be 'all' or a comma list of layer numbers, got {spec!r}") from None
        if isinstance(spec, int):
            spec = [spec]
        bad = [x for x in spec if not isinstance(x, int) or not 1 <= x <= num_layers]
        if bad:
            raise EexitError(f"exit layers must be integers in 1..{num_layers}; got {bad}")
        layers = sorted(set(spec))
    layers = [x for x in layers if x >= min_exit_layer]
    if num_layers not in layers:
        layers.append(num_layers)
    return layers


class EarlyExitModel(nn.Module):
    """A causal LM whose hidden state can be read out (exited) after chosen layers."""

    def __init__(self, lm: nn.Module, exit_layers: list[int], exit_heads: str = "shared", halting_gate: bool = False):
        super().__init__()
        self.lm = lm
        self.parts = locate_parts(lm)
        self.num_layers = len(self.parts.layers)
        self.exit_layers = resolve_exit_layers(exit_layers, self.num_layers)
        self.exit_head_mode = exit_heads
        d = self.hidden_size
        self.exit_heads = nn.ModuleDict()
        if exit_heads == "separate":  # seed 002's "output head": own norm + head per shallow exit
            for layer in self.exit_layers[:-1]:
                head = nn.Linear(d, self.vocab_size, bias=False)
                head.weight.data.copy_(self.parts.lm_head.weight.data)
                self.exit_heads[str(layer)] = nn.Sequential(copy.deepcopy(self.parts.final_norm), head)
        # seed 000's exit gate: halting probability per layer, trained by the `ponder` loss
        self.halting_gate = nn.Linear(d, 1) if halting_gate else None

    @property
    def hidden_size(self) -> int:
        return self.parts.lm_head.weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.parts.lm_head.weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.parts.lm_head.weight.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, with_inputs: bool = False) -> list[torch.Tensor]:
        """Run the whole stack once; return every block's output hidden state (before the final norm),
        preceded by the input of block 1 (embeddings, positions included) when `with_inputs`."""
        states: list[torch.Tensor] = []

        def grab(_mod, _inp, out):
            states.append(out[0] if isinstance(out, tuple) else out)

        def grab_input(_mod, args, kwargs):
            states.append(args[0] if args else kwargs["hidden_states"])

        hooks = [layer.register_forward_hook(grab) for layer in self.parts.layers]
        if with_inputs:
            hooks.append(self.parts.layers[0].register_forward_pre_hook(grab_input, with_kwargs=True))
        try:
            self.parts.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        return states

    def exit_logits(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """Vocabulary logits of the exit after `layer` (1-based) for hidden states of that layer."""
        key = str(layer)
        if key in self.exit_heads:
            return self.exit_heads[key](hidden)
        return self.parts.lm_head(self.parts.final_norm(hidden))

    def halting_logits(self, states: list[torch.Tensor]) -> torch.Tensor:
        """Per-exit halting logits [n_exits, ...] from the exit gate (ponder)."""
        if self.halting_gate is None:
            raise EexitError("this model has no halting gate; train it with --loss ponder")
        return torch.stack([self.halting_gate(states[l - 1]).squeeze(-1) for l in self.exit_layers])

    # ------------------------------------------------------------------ save / load
    def save(self, out_dir: str | Path, tokenizer=None, extra_meta: dict | None = None) -> None:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        extras = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if not k.startswith("lm.")}
        if extras:
            save_file(extras, str(out / EXTRA_WEIGHTS))
        meta = {
            "exit_layers": self.exit_layers,
            "exit_heads": self.exit_head_mode,
            "halting_gate": self.halting_gate is not None,
            **(extra_meta or {}),
        }
        (out / EEXIT_META).write_text(json.dumps(meta, indent=2))


def build_lm(cfg, vocab_size: int, bos_id: int, eos_id: int) -> nn.Module:
    """A small causal LM from config (trained from scratch)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if cfg.arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_positions=cfg.max_len, n_embd=cfg.d_model, n_layer=cfg.n_layers,
            n_head=cfg.n_heads, n_inner=cfg.d_ff, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout, bos_token_id=bos_id, eos_token_id=eos_id,
        )
        return GPT2LMHeadModel(config)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads, max_position_embeddings=cfg.max_len,
        attention_dropout=cfg.dropout, tie_word_embeddings=True, bos_token_id=bos_id, eos_token_id=eos_id,
    )
    return LlamaForCausalLM(config)


def load_model(spec: str, exit_layers=None, device: str | torch.device = "cpu"):
    """Load (EarlyExitModel, tokenizer, meta) from an eexit checkpoint, an HF folder or hub name, or a .gguf file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(spec)
    meta: dict = {}
    kwargs: dict = {}
    if path.suffix == ".gguf":
        if not path.is_file():
            raise EexitError(f"GGUF file not found: {path}")
        src, kwargs = str(path.parent), {"gguf_file": path.name}
    elif path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise EexitError(f"{path} is not a model checkpoint (expected a folder with config.json, or a .gguf file)")
        src = str(path)
        if (path / EEXIT_META).is_file():
            meta = json.loads((path / EEXIT_META).read_text())
    elif spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith("/"):
        raise EexitError(f"model checkpoint not found: {spec}")
    else:
        src = spec  # a hub name
    try:
        lm = AutoModelForCausalLM.from_pretrained(src, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EexitError(f"could not load model {spec!r}: {first}") from None
    lm.to(device).eval()
    layers = exit_layers if exit_layers is not None else meta.get("exit_layers", "all")
    model = EarlyExitModel(lm, layers, meta.get("exit_heads", "shared"), meta.get("halting_gate", False))
    extra = path / EXTRA_WEIGHTS if path.is_dir() else None
    if extra is not None and extra.is_file():
        from safetensors.torch import load_file

        missing = model.load_state_dict(load_file(str(extra)), strict=False)
        bad = [k for k in missing.missing_keys if not k.startswith("lm.")]
        if bad:
            raise EexitError(f"{extra} lacks weights for {bad[:3]}")
    model.to(device).eval()
    return model, tokenizer, meta
