"""GPT-2: learned absolute positions, fused c_attn projection (Conv1D), LayerNorm."""

from __future__ import annotations

import torch

from eexit.errors import EexitError
from eexit.models.blocks import BlockAdapter
from eexit.models.families.base import Family, register_family


class GPT2Blocks(BlockAdapter):
    def __init__(self, model):
        super().__init__(model)
        attn = self.layers[0].attn
        self.n_heads = self.n_kv_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.split = attn.split_size
        self._scaling = getattr(attn, "scaling", self.head_dim**-0.5)
        if getattr(attn, "scale_attn_by_inverse_layer_idx", False) or getattr(
            attn, "reorder_and_upcast_attn", False
        ):
            raise EexitError(
                "GPT-2 variants with scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are "
                "not supported by the decoder"
            )

    @property
    def scaling(self):
        return self._scaling

    def embed(self, ids, positions):
        base = self.model.parts.base
        return base.wte(ids) + base.wpe(positions)

    def _split(self, x):
        b, t, _ = x.shape
        return x.view(b, t, -1, self.head_dim).transpose(1, 2)

    def qkv(self, l, h, positions):
        blk = self.layers[l]
        q, k, v = blk.attn.c_attn(blk.ln_1(h)).split(self.split, dim=2)
        return self._split(q), self._split(k), self._split(v)

    def kv(self, l, h, positions):
        blk = self.layers[l]
        x = blk.ln_1(h)
        w, b = blk.attn.c_attn.weight, blk.attn.c_attn.bias  # Conv1D: x @ W + b, W [d, 3d]
        kv = torch.addmm(b[self.split :], x.reshape(-1, x.shape[-1]), w[:, self.split :]).view(
            *x.shape[:-1], 2 * self.split
        )
        k, v = kv.split(self.split, dim=-1)
        return self._split(k), self._split(v)

    def kv_many(self, first, stop, h, positions):
        """All skipped layers at once: LayerNorm's statistics of h are shared (only each layer's
        affine weights differ), then one batched matmul over the layers' K/V columns of c_attn."""
        if stop - first < 2:
            return super().kv_many(first, stop, h, positions)
        w_ln, b_ln, w_kv, b_kv, eps = self.stacked(first, stop, self._stack_kv)
        b, t, d = h.shape
        x = torch.nn.functional.layer_norm(h, (d,), eps=eps).reshape(1, b * t, d)
        xs = x * w_ln[:, None, :] + b_ln[:, None, :]  # [layers, b t, d]: each layer's affine
        kv = torch.baddbmm(b_kv, xs, w_kv).view(stop - first, b, t, 2, self.n_heads, self.head_dim)
        kv = kv.permute(3, 0, 1, 4, 2, 5)  # [2, layers, b, heads, t, dh]
        return kv[0], kv[1]

    def _stack_kv(self, blks):
        """LayerNorm weights / biases [layers, d], c_attn's K/V columns [layers, d, 2d] and
        their biases, and LayerNorm's eps."""
        return (
            torch.stack([blk.ln_1.weight for blk in blks]),
            torch.stack([blk.ln_1.bias for blk in blks]),
            torch.stack([blk.attn.c_attn.weight[:, self.split :] for blk in blks]).contiguous(),
            torch.stack([blk.attn.c_attn.bias[self.split :] for blk in blks])[:, None, :],
            blks[0].ln_1.eps,
        )

    def finish(self, l, h, ctx, rows):
        blk = self.layers[l]
        b, _, t, _ = ctx.shape
        h = h + blk.attn.c_proj(ctx.transpose(1, 2).reshape(b, t, -1))
        return h + blk.mlp(blk.ln_2(h))


@register_family
class GPT2(Family):
    name = "gpt2"
    model_types = ("gpt2",)
    blocks = GPT2Blocks
    learned_positions = True

    def looks_like(self, lm):
        first = self.parts(lm).layers[0]
        return hasattr(first, "attn") and hasattr(first.attn, "c_attn")

    def build(self, cfg, vocab_size, bos_id, eos_id):
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=cfg.max_len,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            n_inner=cfg.d_ff,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
        )
        return GPT2LMHeadModel(config)
