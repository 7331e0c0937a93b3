"""Layer-by-layer access to a decoder block's pieces, for early-exit decoding with our own KV cache.

An adapter exposes, per architecture family, the parts of block l the decoder needs:
`qkv` (projections, rotary embedding applied), `attend` (output projection + residual),
`mlp` (the MLP half with its residual) and `embed`. The weights are the model's own modules;
nothing is re-implemented except the glue. Supported: GPT-2 and Llama-family blocks
(Llama, Mistral, Qwen2, SmolLM2 GGUF ...), and T5 decoder blocks (self-attention with the
relative position bias of block 1, cross-attention over the encoder output, feed-forward).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from eexit.errors import EexitError


class BlockAdapter:
    n_heads: int
    n_kv_heads: int
    head_dim: int

    def __init__(self, model):
        self.model = model
        self.layers = model.parts.layers
        self.num_layers = len(self.layers)

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def qkv(self, l: int, h: torch.Tensor, positions: torch.Tensor):
        """Block l (0-based) on hidden h [B, t, d] -> q [B, H, t, dh], k, v [B, Hkv, t, dh]."""
        raise NotImplementedError

    def kv(self, l: int, h: torch.Tensor, positions: torch.Tensor):
        """Only the keys and values of block l for hidden h (CALM's state propagation)."""
        raise NotImplementedError

    def finish(self, l: int, h: torch.Tensor, ctx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Attention output ctx [B, H, t, dh] -> block output (output projection, residuals, MLP).
        `rows`: the batch rows of h (encoder-decoder models attend to those rows' encoder output)."""
        raise NotImplementedError

    def attn_bias(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor | None:
        """Additive attention bias [B, H, t, S] for query positions [B, t] and key positions [S] (None: no bias)."""
        return None

    def begin(self, source_ids: torch.Tensor | None, source_mask: torch.Tensor | None) -> None:
        """Start a generation (encoder-decoder models: encode the source, cache cross-attention K/V)."""
        if source_ids is not None:
            raise EexitError("source_ids are for encoder-decoder models only")

    @property
    def scaling(self) -> float:
        return self.head_dim ** -0.5


class GPT2Blocks(BlockAdapter):
    def __init__(self, model):
        super().__init__(model)
        attn = self.layers[0].attn
        self.n_heads = self.n_kv_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.split = attn.split_size
        self._scaling = getattr(attn, "scaling", self.head_dim ** -0.5)
        if getattr(attn, "scale_attn_by_inverse_layer_idx", False) or getattr(attn, "reorder_and_upcast_attn", False):
            raise EexitError("GPT-2 variants with scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported by the decoder")

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
        kv = torch.addmm(b[self.split :], x.reshape(-1, x.shape[-1]), w[:, self.split :]).view(*x.shape[:-1], 2 * self.split)
        k, v = kv.split(self.split, dim=-1)
        return self._split(k), self._split(v)

    def finish(self, l, h, ctx, rows):
        blk = self.layers[l]
        b, _, t, _ = ctx.shape
        h = h + blk.attn.c_proj(ctx.transpose(1, 2).reshape(b, t, -1))
        return h + blk.mlp(blk.ln_2(h))


class LlamaBlocks(BlockAdapter):
    def __init__(self, model):
        super().__init__(model)
        attn = self.layers[0].self_attn
        cfg = model.lm.config
        self.head_dim = attn.head_dim
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", self.n_heads)
        self._scaling = attn.scaling
        self.rotary = model.parts.base.rotary_emb
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.apply_rope = apply_rotary_pos_emb

    @property
    def scaling(self):
        return self._scaling

    def embed(self, ids, positions):
        return self.model.parts.base.embed_tokens(ids)

    def _split(self, x, heads):
        b, t, _ = x.shape
        return x.view(b, t, heads, self.head_dim).transpose(1, 2)

    def _rope(self, h, positions):
        return self.rotary(h, positions)

    def qkv(self, l, h, positions):
        blk = self.layers[l]
        x = blk.input_layernorm(h)
        a = blk.self_attn
        q, k, v = self._split(a.q_proj(x), self.n_heads), self._split(a.k_proj(x), self.n_kv_heads), self._split(a.v_proj(x), self.n_kv_heads)
        cos, sin = self._rope(h, positions)
        q, k = self.apply_rope(q, k, cos, sin)
        return q, k, v

    def kv(self, l, h, positions):
        blk = self.layers[l]
        x = blk.input_layernorm(h)
        a = blk.self_attn
        k, v = self._split(a.k_proj(x), self.n_kv_heads), self._split(a.v_proj(x), self.n_kv_heads)
        cos, sin = self._rope(h, positions)
        _, k = self.apply_rope(k, k, cos, sin)
        return k, v

    def finish(self, l, h, ctx, rows):
        blk = self.layers[l]
        b, _, t, _ = ctx.shape
        h = h + blk.self_attn.o_proj(ctx.transpose(1, 2).reshape(b, t, -1))
        return h + blk.mlp(blk.post_attention_layernorm(h))


class T5Blocks(BlockAdapter):
    """T5 decoder blocks: layer[0] self-attention, layer[1] cross-attention, layer[2] feed-forward.
    T5 does not scale q.k (scaling 1); block 1's relative position bias is shared by every block."""

    def __init__(self, model):
        super().__init__(model)
        attn = self.layers[0].layer[0].SelfAttention
        self.n_heads = self.n_kv_heads = attn.n_heads
        self.head_dim = attn.key_value_proj_dim
        self.rel = attn
        self.cross: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.source_mask = None

    @property
    def scaling(self):
        return 1.0

    def begin(self, source_ids, source_mask):
        if source_ids is None:
            raise EexitError("an encoder-decoder model generates from source_ids (the encoder input)")
        if source_mask is None:
            source_mask = torch.ones_like(source_ids)
        enc = self.model.encode(source_ids, source_mask)
        self.source_mask = source_mask.bool()
        self.cross = []
        for blk in self.layers:  # the cross-attention cache: per layer, computed once
            a = blk.layer[1].EncDecAttention
            self.cross.append((self._split(a.k(enc)), self._split(a.v(enc))))

    def embed(self, ids, positions):
        return self.model.parts.base.embed_tokens(ids)

    def _split(self, x):
        b, t, _ = x.shape
        return x.view(b, t, -1, self.head_dim).transpose(1, 2)

    def qkv(self, l, h, positions):
        sub = self.layers[l].layer[0]
        x, a = sub.layer_norm(h), sub.SelfAttention
        return self._split(a.q(x)), self._split(a.k(x)), self._split(a.v(x))

    def kv(self, l, h, positions):
        sub = self.layers[l].layer[0]
        x, a = sub.layer_norm(h), sub.SelfAttention
        return self._split(a.k(x)), self._split(a.v(x))

    def attn_bias(self, qpos, kpos):
        a = self.rel
        bucket = a._relative_position_bucket(kpos[None, None, :] - qpos[:, :, None], bidirectional=False,
                                             num_buckets=a.relative_attention_num_buckets, max_distance=a.relative_attention_max_distance)
        return a.relative_attention_bias(bucket).permute(0, 3, 1, 2)  # [B, t, S, H] -> [B, H, t, S]

    def finish(self, l, h, ctx, rows):
        blk = self.layers[l]
        b, _, t, _ = ctx.shape
        h = h + blk.layer[0].SelfAttention.o(ctx.transpose(1, 2).reshape(b, t, -1))
        cross = blk.layer[1]
        x = cross.layer_norm(h)
        k, v = self.cross[l]
        q = self._split(cross.EncDecAttention.q(x))
        c = F.scaled_dot_product_attention(q, k[rows], v[rows], attn_mask=self.source_mask[rows, None, None, :], scale=1.0)
        h = h + cross.EncDecAttention.o(c.transpose(1, 2).reshape(b, t, -1))
        return blk.layer[2](h)


def block_adapter(model) -> BlockAdapter:
    first = model.parts.layers[0]
    if getattr(model, "is_seq2seq", False) and hasattr(first, "layer") and hasattr(first.layer[0], "SelfAttention"):
        return T5Blocks(model)
    if hasattr(first, "attn") and hasattr(first.attn, "c_attn"):
        return GPT2Blocks(model)
    if hasattr(first, "self_attn") and hasattr(first.self_attn, "q_proj") and hasattr(model.parts.base, "rotary_emb"):
        return LlamaBlocks(model)
    raise EexitError(f"early-exit decoding supports GPT-2, Llama-family and T5 blocks; got {type(first).__name__}")
