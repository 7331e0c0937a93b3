"""Early-exit wrapper around a Hugging Face causal LM.

The exit prediction at layer i is the model's own final norm + LM head applied to the hidden
state that block i outputs (optionally a separate norm + head per exit). Works with any
decoder-only `transformers` model whose blocks, final norm and LM head can be located (GPT-2,
Llama, Mistral, Qwen, SmolLM2 GGUF, ...), built from a small config or loaded pretrained.
Encoder-decoder models (T5): the exits are on the decoder blocks, through the decoder's final
norm (and T5's d_model^-0.5 output scaling) + LM head; the encoder always runs in full.
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
    encoder: nn.Module | None = None  # encoder-decoder models: the encoder stack


class ScaledNorm(nn.Module):
    """T5's final norm followed by the d_model^-0.5 scaling its LM head expects (tied embeddings)."""

    def __init__(self, norm: nn.Module, scale: float):
        super().__init__()
        self.norm, self.scale = norm, scale

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h) * self.scale


def locate_parts(lm: nn.Module) -> Parts:
    if getattr(lm.config, "is_encoder_decoder", False):
        dec, head = lm.get_decoder(), lm.get_output_embeddings()
        layers, norm = getattr(dec, "block", None), getattr(dec, "final_layer_norm", None)
        if layers is None or norm is None or head is None:
            raise EexitError(f"cannot find decoder blocks / final norm / LM head in {type(lm).__name__}; supported encoder-decoder: T5")
        if getattr(lm.config, "scale_decoder_outputs", False):
            norm = ScaledNorm(norm, lm.config.d_model ** -0.5)
        return Parts(dec, layers, norm, head, lm.get_encoder())
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
    def is_seq2seq(self) -> bool:
        return self.parts.encoder is not None

    @property
    def hidden_size(self) -> int:
        return self.parts.lm_head.weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.parts.lm_head.weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.parts.lm_head.weight.device

    def encode(self, source_ids: torch.Tensor, source_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output of an encoder-decoder model."""
        return self.parts.encoder(input_ids=source_ids, attention_mask=source_mask).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, with_inputs: bool = False,
                source_ids: torch.Tensor | None = None, source_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Run the whole stack once; return every block's output hidden state (before the final norm),
        preceded by the input of block 1 (embeddings, positions included) when `with_inputs`.
        Encoder-decoder models: `input_ids` are the decoder inputs and `source_ids` the encoder's."""
        states: list[torch.Tensor] = []

        def grab(_mod, _inp, out):
            states.append(out[0] if isinstance(out, tuple) else out)

        def grab_input(_mod, args, kwargs):
            states.append(args[0] if args else kwargs["hidden_states"])

        hooks = [layer.register_forward_hook(grab) for layer in self.parts.layers]
        if with_inputs:
            hooks.append(self.parts.layers[0].register_forward_pre_hook(grab_input, with_kwargs=True))
        extra = {}
        if self.is_seq2seq:
            if source_ids is None:
                raise EexitError("an encoder-decoder model needs source_ids (the encoder input)")
            extra = {"encoder_hidden_states": self.encode(source_ids, source_mask), "encoder_attention_mask": source_mask}
        try:
            self.parts.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
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
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    if cfg.arch == "t5":  # encoder-decoder; the decoder starts from the EOS token (our BPE's only special token)
        config = T5Config(
            vocab_size=vocab_size, d_model=cfg.d_model, d_kv=cfg.d_model // cfg.n_heads, d_ff=cfg.d_ff, num_layers=cfg.n_encoder_layers or cfg.n_layers,
            num_decoder_layers=cfg.n_layers, num_heads=cfg.n_heads, dropout_rate=cfg.dropout, feed_forward_proj="relu",
            pad_token_id=eos_id, eos_token_id=eos_id, decoder_start_token_id=eos_id, bos_token_id=bos_id,
        )
        return T5ForConditionalGeneration(config)
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
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

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
        seq2seq = getattr(AutoConfig.from_pretrained(src, **kwargs), "is_encoder_decoder", False)
        lm = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(src, **kwargs)
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
