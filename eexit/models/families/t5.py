"""T5 (encoder-decoder): the exits are on the decoder blocks, read through the decoder's final
norm, T5's d_model^-0.5 output scaling and the LM head; the encoder always runs in full."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eexit.errors import EexitError
from eexit.models.blocks import BlockAdapter, Parts
from eexit.models.families.base import Family, register_family


class ScaledNorm(nn.Module):
    """T5's final norm followed by the d_model^-0.5 scaling its LM head expects (tied
    embeddings)."""

    def __init__(self, norm: nn.Module, scale: float):
        super().__init__()
        self.norm, self.scale = norm, scale

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h) * self.scale


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
            raise EexitError(
                "an encoder-decoder model generates from source_ids (the encoder input)"
            )
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
        bucket = a._relative_position_bucket(
            kpos[None, None, :] - qpos[:, :, None],
            bidirectional=False,
            num_buckets=a.relative_attention_num_buckets,
            max_distance=a.relative_attention_max_distance,
        )
        return a.relative_attention_bias(bucket).permute(0, 3, 1, 2)  # [B, t, S, H] -> [B, H, t, S]

    def finish(self, l, h, ctx, rows):
        blk = self.layers[l]
        b, _, t, _ = ctx.shape
        h = h + blk.layer[0].SelfAttention.o(ctx.transpose(1, 2).reshape(b, t, -1))
        cross = blk.layer[1]
        x = cross.layer_norm(h)
        k, v = self.cross[l]
        q = self._split(cross.EncDecAttention.q(x))
        c = F.scaled_dot_product_attention(
            q, k[rows], v[rows], attn_mask=self.source_mask[rows, None, None, :], scale=1.0
        )
        h = h + cross.EncDecAttention.o(c.transpose(1, 2).reshape(b, t, -1))
        return blk.layer[2](h)


@register_family
class T5(Family):
    name = "t5"
    model_types = ("t5",)
    blocks = T5Blocks
    seq2seq = True

    def parts(self, lm):
        dec, head = lm.get_decoder(), lm.get_output_embeddings()
        layers, norm = getattr(dec, "block", None), getattr(dec, "final_layer_norm", None)
        if layers is None or norm is None or head is None:
            raise EexitError(
                f"cannot find decoder blocks / final norm / LM head in {type(lm).__name__}"
            )
        if getattr(lm.config, "scale_decoder_outputs", False):
            norm = ScaledNorm(norm, lm.config.d_model**-0.5)
        return Parts(dec, layers, norm, head, lm.get_encoder())

    def build(self, cfg, vocab_size, bos_id, eos_id):
        """The decoder starts from the EOS token (our BPE's only special token)."""
        from transformers import T5Config, T5ForConditionalGeneration

        config = T5Config(
            vocab_size=vocab_size,
            d_model=cfg.d_model,
            d_kv=cfg.d_model // cfg.n_heads,
            d_ff=cfg.d_ff,
            num_layers=cfg.n_encoder_layers or cfg.n_layers,
            num_decoder_layers=cfg.n_layers,
            num_heads=cfg.n_heads,
            dropout_rate=cfg.dropout,
            feed_forward_proj="relu",
            pad_token_id=eos_id,
            eos_token_id=eos_id,
            decoder_start_token_id=eos_id,
            bos_token_id=bos_id,
        )
        return T5ForConditionalGeneration(config)
