"""Llama-style blocks: RMSNorm, rotary positions, separate q/k/v projections, grouped-query
attention. Also Mistral (sliding-window attention), SmolLM2 (GGUF) and unknown variants with the
same block structure."""

from __future__ import annotations

from eexit.models.blocks import BlockAdapter
from eexit.models.families.base import Family, register_family


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
        q, k, v = (
            self._split(a.q_proj(x), self.n_heads),
            self._split(a.k_proj(x), self.n_kv_heads),
            self._split(a.v_proj(x), self.n_kv_heads),
        )
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
