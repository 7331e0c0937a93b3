"""The model-family registry: what eexit needs to know about one architecture.

A family says how to recognise a loaded `transformers` model (`model_types`, or `looks_like` for
unknown variants of the same block structure), where its blocks, final norm and LM head are
(`parts`), how to build a small one from `model.*` config fields (`build`), and which
`BlockAdapter` the early-exit decoder uses. One file per family in this folder; every module
here is imported (and so registered) when `eexit.models.families` is imported.
"""

from __future__ import annotations

from torch import nn

from eexit.errors import EexitError
from eexit.models.blocks import BlockAdapter, Parts
from eexit.registry import Registry

FAMILIES: Registry[Family] = Registry("model family")


def register_family(cls: type[Family]) -> type[Family]:
    """Class decorator: register one instance under the class's `name`."""
    FAMILIES.register(cls.name)(cls())
    return cls


class Family:
    name = "?"
    model_types: tuple[str, ...] = ()  # `config.model_type` values handled by this family
    blocks: type[BlockAdapter] = BlockAdapter  # layer-by-layer access for the decoder
    learned_positions = False  # an absolute position table limits the sequence length
    seq2seq = False  # encoder-decoder: the exits are on the decoder

    def looks_like(self, lm: nn.Module) -> bool:
        """Structural match for a model_type this family does not list (fallback)."""
        return False

    def parts(self, lm: nn.Module) -> Parts:
        return decoder_only_parts(lm)

    def build(self, cfg, vocab_size: int, bos_id: int, eos_id: int) -> nn.Module:
        """A small randomly initialised model from `model.*` config fields (`ModelConfig`)."""
        raise EexitError(
            f"model family {self.name!r} cannot be built from config; load it pretrained"
        )

    def adapter(self, model) -> BlockAdapter:
        return self.blocks(model)


def decoder_only_parts(lm: nn.Module) -> Parts:
    """Blocks, final norm and LM head of a decoder-only `transformers` causal LM."""
    base = lm.base_model
    layers = next(
        (
            getattr(base, n)
            for n in ("layers", "h", "blocks")
            if isinstance(getattr(base, n, None), nn.ModuleList)
        ),
        None,
    )
    norm = next(
        (
            getattr(base, n)
            for n in ("norm", "ln_f", "final_layernorm", "norm_f")
            if getattr(base, n, None) is not None
        ),
        None,
    )
    head = lm.get_output_embeddings()
    if layers is None or norm is None or head is None:
        raise EexitError(
            f"cannot find blocks / final norm / LM head in {type(lm).__name__}; "
            f"supported families: {', '.join(FAMILIES.names())}"
        )
    return Parts(base, layers, norm, head)


def family_of(lm: nn.Module) -> Family:
    """The family of a loaded model: by `config.model_type`, else by block structure."""
    model_type = getattr(lm.config, "model_type", None)
    for name in FAMILIES.names():
        if model_type in FAMILIES.get(name).model_types:
            return FAMILIES.get(name)
    for name in FAMILIES.names():
        if FAMILIES.get(name).looks_like(lm):
            return FAMILIES.get(name)
    raise EexitError(
        f"unsupported model type {model_type!r} ({type(lm).__name__}); "
        f"supported families: {', '.join(FAMILIES.names())}"
    )
