"""Qwen2: Llama-style blocks with biased q/k/v projections and optional sliding-window attention
(`use_sliding_window`, `sliding_window`, `max_window_layers`); the Llama adapter serves it."""

from __future__ import annotations

from eexit.models.families.base import Family, register_family
from eexit.models.families.llama import LlamaBlocks


@register_family
class Qwen2(Family):
    name = "qwen2"
    model_types = ("qwen2",)
    blocks = LlamaBlocks

    def build(self, cfg, vocab_size, bos_id, eos_id):
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(
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
        return Qwen2ForCausalLM(config)
