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
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from eexit.config import EXIT_HEADS, resolve_exit_layers  # noqa: F401  (re-exported)
from eexit.errors import EexitError
from eexit.files import atomic_json, atomic_write, library_write_error
from eexit.models.checkpoint import EEXIT_META, EXTRA_WEIGHTS, model_card
from eexit.models.families import family_of
from eexit.models.lora import has_lora, merged


class Translator(nn.Module):
    """A tuned-lens style exit adapter: h + W h + b before the shared final norm and LM head
    (rank 0: W is d x d; rank r: W = B A with A: d -> r, B: r -> d). Initialised to the
    identity (W = 0, b = 0), so an untrained adapter is the plain exit."""

    def __init__(self, d: int, rank: int = 0):
        super().__init__()
        self.rank = rank
        if rank:
            self.down = nn.Linear(d, rank, bias=False)
            self.up = nn.Linear(rank, d, bias=True)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        else:
            self.linear = nn.Linear(d, d, bias=True)
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        delta = self.up(self.down(h)) if self.rank else self.linear(h)
        return h + delta

    def macs(self, d: int) -> float:
        return 2.0 * d * self.rank if self.rank else float(d * d)


class EarlyExitModel(nn.Module):
    """A causal LM whose hidden state can be read out (exited) after chosen layers."""

    def __init__(
        self,
        lm: nn.Module,
        exit_layers: list[int],
        exit_heads: str = "shared",
        halting_gate: bool = False,
        lens_rank: int = 0,
    ):
        super().__init__()
        self.lm = lm
        self.family = family_of(lm)
        self.parts = self.family.parts(lm)
        self.num_layers = len(self.parts.layers)
        self.exit_layers = resolve_exit_layers(exit_layers, self.num_layers)
        if exit_heads not in EXIT_HEADS:
            raise EexitError(
                f"exit heads must be one of {', '.join(EXIT_HEADS)}; got {exit_heads!r}"
            )
        self.exit_head_mode, self.lens_rank = exit_heads, int(lens_rank)
        d = self.hidden_size
        self.exit_heads = nn.ModuleDict()
        # exit adapters (lens): one translator per shallow exit before the shared norm + head
        self.translators = nn.ModuleDict()
        if exit_heads == "lens":
            for layer in self.exit_layers[:-1]:
                self.translators[str(layer)] = Translator(d, self.lens_rank)
        if exit_heads == "separate":  # seed 002's "output head": own norm + head per shallow exit
            for layer in self.exit_layers[:-1]:
                head = nn.Linear(d, self.vocab_size, bias=False)
                head.weight.data.copy_(self.parts.lm_head.weight.data)
                self.exit_heads[str(layer)] = nn.Sequential(
                    copy.deepcopy(self.parts.final_norm), head
                )
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

    def encode(
        self, source_ids: torch.Tensor, source_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Encoder output of an encoder-decoder model."""
        return self.parts.encoder(
            input_ids=source_ids, attention_mask=source_mask
        ).last_hidden_state

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        with_inputs: bool = False,
        source_ids: torch.Tensor | None = None,
        source_mask: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Run the whole stack once; return every block's output hidden state (before the final
        norm),
        preceded by the input of block 1 (embeddings, positions included) when `with_inputs`.
        Encoder-decoder models: `input_ids` are the decoder inputs and `source_ids` the
        encoder's."""
        states: list[torch.Tensor] = []

        def grab(_mod, _inp, out):
            states.append(out[0] if isinstance(out, tuple) else out)

        def grab_input(_mod, args, kwargs):
            states.append(args[0] if args else kwargs["hidden_states"])

        hooks = [layer.register_forward_hook(grab) for layer in self.parts.layers]
        if with_inputs:
            hooks.append(
                self.parts.layers[0].register_forward_pre_hook(grab_input, with_kwargs=True)
            )
        extra = {}
        if self.is_seq2seq:
            if source_ids is None:
                raise EexitError("an encoder-decoder model needs source_ids (the encoder input)")
            extra = {
                "encoder_hidden_states": self.encode(source_ids, source_mask),
                "encoder_attention_mask": source_mask,
            }
        try:
            self.parts.base(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra
            )
        finally:
            for h in hooks:
                h.remove()
        return states

    def exit_logits(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """Vocabulary logits of the exit after `layer` (1-based) for hidden states of that layer."""
        key = str(layer)
        if key in self.exit_heads:
            return self.exit_heads[key](hidden)
        return self.head(self.translate(hidden, layer))

    @property
    def adapter_macs(self) -> float:
        """Multiply-adds of one exit adapter for one token (0 without adapters)."""
        first = next(iter(self.translators.values()), None)
        return first.macs(self.hidden_size) if first is not None else 0.0

    def decision_macs(self, policy) -> float:
        """What one exit decision of `policy` costs for one token, adapters included."""
        own = policy.decision_macs(self.hidden_size, self.vocab_size)
        return own + (self.adapter_macs if policy.needs_logits else 0.0)

    def first_decision_extra_macs(self, policy) -> float:
        return policy.first_decision_extra_macs(self.hidden_size, self.vocab_size)

    def translate(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """The exit adapter of `layer` (identity without one)."""
        key = str(layer)
        return self.translators[key](hidden) if key in self.translators else hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The shared final norm and LM head."""
        return self.parts.lm_head(self.parts.final_norm(hidden))

    def halting_logits(self, states: list[torch.Tensor]) -> torch.Tensor:
        """Per-exit halting logits [n_exits, ...] from the exit gate (ponder)."""
        if self.halting_gate is None:
            raise EexitError("this model has no halting gate; train it with --loss ponder")
        return torch.stack([self.halting_gate(states[l - 1]).squeeze(-1) for l in self.exit_layers])

    # ------------------------------------------------------------------ save / load
    def save(
        self,
        out_dir: str | Path,
        tokenizer=None,
        extra_meta: dict | None = None,
        state_dict: dict | None = None,
    ) -> None:
        """A `save_pretrained` folder plus eexit.json and the exit modules. Written into a hidden
        folder beside `out_dir` first, then each file is renamed into place: no file of an
        earlier save is ever replaced by a truncated one. `state_dict` (this model's keys): the
        weights to write instead of the module's own, e.g. gathered from FSDP shards."""
        from safetensors.torch import save as safetensors_bytes

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.saving-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        exits = {
            "exit_layers": self.exit_layers,
            "exit_heads": self.exit_head_mode,
            "lens_rank": self.lens_rank,
            "halting_gate": self.halting_gate is not None,
        }
        self.lm.config.eexit = exits  # the exits, readable from config.json without eexit
        # a model loaded from GGUF holds dequantized float weights: save them as a plain
        # checkpoint (transformers refuses to re-serialize the GGUF quantization itself)
        gguf = type(getattr(self.lm, "hf_quantizer", None)).__name__ == "GgufHfQuantizer"
        saved = (self.lm.hf_quantizer, self.lm.config.quantization_config) if gguf else None
        if gguf:
            self.lm.hf_quantizer = None
            del self.lm.config.quantization_config
        try:
            state = self.state_dict() if state_dict is None else state_dict
            if has_lora(self.lm):  # the merged weights: a plain model, loadable without peft
                merged(self.lm).save_pretrained(tmp)
            elif state_dict is not None:
                lm = {k.removeprefix("lm."): v for k, v in state.items() if k.startswith("lm.")}
                self.lm.save_pretrained(tmp, state_dict=lm)
            else:
                self.lm.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            extras = {
                k: v.detach().contiguous().cpu()
                for k, v in state.items()
                if not k.startswith("lm.")
            }
            if extras:
                atomic_write(tmp / EXTRA_WEIGHTS, safetensors_bytes(extras))
            meta = {**exits, **(extra_meta or {})}
            atomic_json(tmp / EEXIT_META, meta)
            atomic_write(tmp / "README.md", model_card(meta, type(self.lm).__name__))
            for f in sorted(tmp.iterdir()):  # eexit.json last: it marks a complete save
                if f.name != EEXIT_META:
                    os.replace(f, out / f.name)
            os.replace(tmp / EEXIT_META, out / EEXIT_META)
        except EexitError:
            raise
        except Exception as e:  # noqa: BLE001  (safetensors / torch wrap write failures)
            error = library_write_error(e, out, tmp)
            if error is not None:
                raise error from None
            if not isinstance(e, (RuntimeError, ValueError)):
                raise
            raise EexitError(f"cannot write the model to {out}: {str(e).splitlines()[0]}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if saved is not None:
                self.lm.hf_quantizer, self.lm.config.quantization_config = saved
