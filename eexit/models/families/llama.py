"""Llama-style blocks: RMSNorm, rotary positions, separate q/k/v projections, grouped-query
attention. Also Mistral (sliding-window attention), SmolLM2 (GGUF) and unknown variants with the
same block structure."""

from __future__ import annotations

import torch

from eexit.models.blocks import BlockAdapter
from eexit.models.families.base import Family, register_family

# norms computing weight * x / rms(x) exactly as transformers' LlamaRMSNorm (the batched KV fill
# shares the statistics across layers; any other norm is asked layer by layer)
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


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
        # the rotary angles of the last positions seen: every layer of a decode step rotates at
        # the same positions, so they are computed once per step (keyed on the very tensor and
        # its version, so an edited or another tensor is computed again)
        self._rope_memo: tuple | None = None

    @property
    def scaling(self):
        return self._scaling

    def embed(self, ids, positions):
        return self.model.parts.base.embed_tokens(ids)

    def _split(self, x, heads):
        b, t, _ = x.shape
        return x.view(b, t, heads, self.head_dim).transpose(1, 2)

    def _rope(self, h, positions):
        """(cos, sin) [B, t, dh] at `positions`, unsqueezed for [B, heads, t, dh]."""
        memo = self._rope_memo
        if (
            memo is not None
            and memo[0] is positions
            and memo[1] == positions._version
            and memo[2] == h.dtype
        ):
            return memo[3], memo[4]
        cos, sin = self.rotary(h, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        self._rope_memo = (positions, positions._version, h.dtype, cos, sin)
        return cos, sin

    @staticmethod
    def _rotate(x, cos, sin):
        """Rotary embedding of x [B, heads, t, dh] (the same arithmetic as transformers')."""
        half = x.shape[-1] // 2
        return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)

    def qkv(self, l, h, positions):
        blk = self.layers[l]
        x = blk.input_layernorm(h)
        a = blk.self_attn
        q, k, v = (
            self._split(a.q_proj(x), self.n_heads),
            self._split(a.k_proj(x), self.n_kv_heads),
            self._split(a.v_proj(x), self.n_kv_heads),
        )
        cos, sin = self._rope(h, positions)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin), v

    def kv(self, l, h, positions):
        blk = self.layers[l]
        x = blk.input_layernorm(h)
        a = blk.self_attn
        k, v = self._split(a.k_proj(x), self.n_kv_heads), self._split(a.v_proj(x), self.n_kv_heads)
        cos, sin = self._rope(h, positions)
        return self._rotate(k, cos, sin), v

    def kv_many(self, first, stop, h, positions):
        """All skipped layers at once: the RMS statistics of h are shared (only each layer's norm
        weight differs), then one batched matmul over the layers' stacked K/V projections and one
        rotation (the positions are the same)."""
        layers = range(first, stop)
        norm = self.layers[first].input_layernorm
        if len(layers) < 2 or type(norm).__name__ not in RMS_NORMS:
            return super().kv_many(first, stop, h, positions)
        w_norm, w_kv, b_kv = self.stacked(first, stop, self._stack_kv)
        eps = norm.variance_epsilon
        x = h.to(torch.float32)
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
        b, t, d = h.shape
        xs = (w_norm[:, None, :] * x.reshape(1, b * t, d)).to(w_kv.dtype)  # [layers, b t, d]
        kv = torch.bmm(xs, w_kv) if b_kv is None else torch.baddbmm(b_kv, xs, w_kv)
        kv = kv.view(len(layers), b, t, 2, self.n_kv_heads, self.head_dim).permute(3, 0, 1, 4, 2, 5)
        cos, sin = self._rope(h, positions)
        return self._rotate(kv[0], cos[None], sin[None]), kv[1]

    @staticmethod
    def _stack_kv(blks):
        """Norm weights [layers, d], K/V weights [layers, d, 2 Hkv dh] and biases (or None)."""
        w_norm = torch.stack([b.input_layernorm.weight for b in blks])
        w_kv = torch.stack(
            [torch.cat([b.self_attn.k_proj.weight, b.self_attn.v_proj.weight]).t() for b in blks]
        ).contiguous()
        b_kv = None
        if blks[0].self_attn.k_proj.bias is not None:
            b_kv = torch.stack(
                [torch.cat([b.self_attn.k_proj.bias, b.self_attn.v_proj.bias]) for b in blks]
            )[:, None, :]
        return w_norm, w_kv, b_kv

    def finish(self, l, h, ctx, rows):
        blk = self.layers[l]
        b, _, t, _ = ctx.shape
        h = h + blk.self_attn.o_proj(ctx.transpose(1, 2).reshape(b, t, -1))
        return h + blk.mlp(blk.post_attention_layernorm(h))

    def window(self, l):
        attn = self.layers[l].self_attn
        if hasattr(attn, "sliding_window"):  # per layer (Qwen2: only the sliding layers)
            return attn.sliding_window or None
        return getattr(self.model.lm.config, "sliding_window", None) or None  # Mistral: every layer


@register_family
class Llama(Family):
    name = "llama"
    model_types = ("llama", "mistral")
    blocks = LlamaBlocks

    def looks_like(self, lm):
        parts = self.parts(lm)
        first = parts.layers[0]
        return (
            hasattr(first, "self_attn")
            and hasattr(first.self_attn, "q_proj")
            and hasattr(parts.base, "rotary_emb")
        )

    def build(self, cfg, vocab_size, bos_id, eos_id):
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**llama_style(cfg, vocab_size, bos_id, eos_id)))


def llama_style(cfg, vocab_size: int, bos_id: int, eos_id: int) -> dict:
    """Config keywords of a small Llama-style model from `model.*` fields (tied embeddings)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        max_position_embeddings=cfg.max_len,
        attention_dropout=cfg.dropout,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )
