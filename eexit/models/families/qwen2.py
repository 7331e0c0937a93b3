"""Qwen2: Llama-style blocks with biased q/k/v projections and optional sliding-window attention
(`use_sliding_window`, `sliding_window`, `max_window_layers`); the Llama adapter serves it."""

from __future__ import annotations

from eexit.models.families.base import Family, register_family
from eexit.models.families.llama import LlamaBlocks, llama_style


@register_family
class Qwen2(Family):
    name = "qwen2"
    model_types = ("qwen2",)
    blocks = LlamaBlocks

    def build(self, cfg, vocab_size, bos_id, eos_id):
        from transformers import Qwen2Config, Qwen2ForCausalLM

        return Qwen2ForCausalLM(Qwen2Config(**llama_style(cfg, vocab_size, bos_id, eos_id)))
