"""What a model family exposes to eexit: the parts of the network (`Parts`) and layer-by-layer
access to a block's pieces (`BlockAdapter`), for early-exit decoding with our own KV cache.

An adapter exposes the parts of block l the decoder needs: `qkv` (projections, rotary embedding
applied), `finish` (output projection + residual, then the MLP half with its residual), `kv`
(keys and values only, for CALM's propagation) and `embed`. The weights are the model's own
modules; nothing is re-implemented except the glue. Each family in `eexit.models.families`
brings its adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from eexit.errors import EexitError


@dataclass
class Parts:
    base: nn.Module  # the model without LM head
    layers: nn.ModuleList  # transformer blocks in order
    final_norm: nn.Module  # norm applied before the LM head
    lm_head: nn.Module  # hidden -> vocabulary logits
    encoder: nn.Module | None = None  # encoder-decoder models: the encoder stack


class BlockAdapter:
    n_heads: int
    n_kv_heads: int
    head_dim: int

    def __init__(self, model):
        self.model = model
        self.layers = model.parts.layers
        self.num_layers = len(self.layers)
        self._stacks: dict = {}  # (first, stop) -> weights stacked over those blocks (`stacked`)

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def qkv(self, l: int, h: torch.Tensor, positions: torch.Tensor):
        """Block l (0-based) on hidden h [B, t, d] -> q [B, H, t, dh], k, v [B, Hkv, t, dh]."""
        raise NotImplementedError

    def kv(self, l: int, h: torch.Tensor, positions: torch.Tensor):
        """Only the keys and values of block l for hidden h (CALM's state propagation)."""
        raise NotImplementedError

    def kv_many(self, first: int, stop: int, h: torch.Tensor, positions: torch.Tensor):
        """The keys and values of blocks first..stop-1 for the same hidden h [B, t, d] (KV
        propagate fills every skipped layer from the exited state): k, v [layers, B, Hkv, t,
        dh]. This default asks `kv` layer by layer; a family may batch the layers."""
        pairs = [self.kv(l, h, positions) for l in range(first, stop)]
        return torch.stack([k for k, _ in pairs]), torch.stack([v for _, v in pairs])

    def stacked(self, first: int, stop: int, build):
        """`build(blocks first..stop-1)`, the weights a batched `kv_many` stacks over those
        blocks, built once per adapter and range (a copy of those weights)."""
        key = (first, stop)
        if key not in self._stacks:
            self._stacks[key] = build([self.layers[l] for l in range(first, stop)])
        return self._stacks[key]

    def finish(
        self, l: int, h: torch.Tensor, ctx: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """Attention output ctx [B, H, t, dh] -> block output (output projection, residuals, MLP).
        `rows`: the batch rows of h (encoder-decoder models attend to those rows' encoder
        output)."""
        raise NotImplementedError

    def attn_bias(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor | None:
        """Additive attention bias [B, H, t, S] for query positions [B, t] and key positions [S]
        (None: no bias)."""
        return None

    def begin(self, source_ids: torch.Tensor | None, source_mask: torch.Tensor | None) -> None:
        """Start a generation (encoder-decoder models: encode the source, cache cross-attention
        K/V)."""
        if source_ids is not None:
            raise EexitError("source_ids are for encoder-decoder models only")

    @property
    def scaling(self) -> float:
        return self.head_dim**-0.5

    def window(self, l: int) -> int | None:
        """Sliding-window size of block l's attention (None: the block sees the whole cache)."""
        return None
