"""ModernBERT, the one architecture behind Ettin's encoders and decoders, as a plain nn.Module.

Weight names are transformers' ``ModernBertForMaskedLM`` names, so the Hugging Face mapping in
``ettin.hub`` is a short, readable function. Whether the model runs as an encoder (bidirectional) or
as a decoder (causal) is a forward-time choice: the same weights serve both.

Inside, every batch is unpadded: tokens of all sequences are concatenated into one [N, H] stream with
``cu_seqlens`` marking where each sequence starts, so padding costs no compute. RoPE positions restart
at 0 for every sequence and attention never crosses one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ettin.config import ModelConfig

log = logging.getLogger("ettin")

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None


# ------------------------------------------------------------------------------------------------
# Unpadded layout and attention


@dataclass
class Layout:
    """Where each sequence lies in the flat token stream, and what its tokens may attend to."""

    cu_seqlens: torch.Tensor  # int32 [num_seqs + 1]
    max_seqlen: int
    positions: torch.Tensor  # int64 [N], restarting at 0 for each sequence
    causal: bool
    window: int
    # Built lazily per backend and shared by the layers of one forward pass.
    cache: dict

    @staticmethod
    def build(cu_seqlens: torch.Tensor, max_seqlen: int, causal: bool, window: int) -> "Layout":
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths.long())
        positions = torch.arange(int(cu_seqlens[-1]), device=cu_seqlens.device) - starts
        return Layout(cu_seqlens, int(max_seqlen), positions, causal, window, {})

    @property
    def lengths(self) -> torch.Tensor:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    def padded_index(self) -> torch.Tensor:
        """For each flat token, its index in a [num_seqs * max_seqlen] padded grid."""
        if "padded_index" not in self.cache:
            seq = torch.repeat_interleave(torch.arange(len(self.lengths), device=self.positions.device),
                                          self.lengths)
            self.cache["padded_index"] = seq * self.max_seqlen + self.positions
        return self.cache["padded_index"]

    def dense_mask(self, sliding: bool) -> torch.Tensor:
        """Boolean [num_seqs, 1, T, T] mask for sdpa/eager: True where query i may see key j."""
        key = ("dense", sliding)
        if key not in self.cache:
            t = self.max_seqlen
            idx = torch.arange(t, device=self.positions.device)
            valid = idx[None, :] < self.lengths[:, None]  # [S, T]
            allowed = valid[:, None, :].expand(-1, t, -1)  # key must be a real token
            distance = idx[:, None] - idx[None, :]  # query - key
            pattern = torch.ones(t, t, dtype=torch.bool, device=idx.device)
            if self.causal:
                pattern &= distance >= 0
            if sliding:
                pattern &= distance.abs() <= self.window
            # Padded query rows see only themselves, so no row is empty (an empty row gives NaN).
            mask = (allowed & pattern) | torch.eye(t, dtype=torch.bool, device=idx.device)
            self.cache[key] = mask[:, None]
        return self.cache[key]

    def block_mask(self, sliding: bool):
        """FlexAttention BlockMask over the flat stream: same document, causal, window."""
        key = ("flex", sliding)
        if key not in self.cache:
            from torch.nn.attention.flex_attention import create_block_mask

            n = int(self.cu_seqlens[-1])
            document = torch.repeat_interleave(
                torch.arange(len(self.lengths), device=self.positions.device), self.lengths)
            positions, causal, window = self.positions, self.causal, self.window

            def mask_mod(b, h, q, kv):
                allowed = document[q] == document[kv]
                if causal:
                    allowed = allowed & (kv <= q)
                if sliding:
                    allowed = allowed & ((positions[q] - positions[kv]).abs() <= window)
                return allowed

            self.cache[key] = create_block_mask(mask_mod, None, None, n, n,
                                                device=str(self.positions.device))
        return self.cache[key]


def attend(q, k, v, layout: Layout, sliding: bool, backend: str, dropout: float, training: bool):
    """Attention over the unpadded stream. q, k, v: [N, heads, head_dim] -> [N, heads, head_dim]."""
    n, heads, dim = q.shape
    p = dropout if training else 0.0
    if backend == "flash":
        from flash_attn import flash_attn_varlen_func

        window = (layout.window, 0 if layout.causal else layout.window) if sliding else (-1, -1)
        return flash_attn_varlen_func(q, k, v, layout.cu_seqlens, layout.cu_seqlens,
                                      layout.max_seqlen, layout.max_seqlen, dropout_p=p,
                                      causal=layout.causal, window_size=window)
    if backend == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        if p:
            raise ValueError("attention_dropout > 0 is not supported by the flex backend; use sdpa")
        out = flex_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                             v.transpose(0, 1)[None], block_mask=layout.block_mask(sliding))
        return out[0].transpose(0, 1)
    # sdpa / eager: scatter into a padded [seqs, heads, T, dim] grid for the attention only.
    seqs, t = len(layout.lengths), layout.max_seqlen
    index = layout.padded_index()

    def to_grid(x):
        grid = x.new_zeros(seqs * t, heads, dim)
        grid[index] = x
        return grid.view(seqs, t, heads, dim).transpose(1, 2)

    qg, kg, vg = to_grid(q), to_grid(k), to_grid(v)
    mask = layout.dense_mask(sliding)
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, dropout_p=p)
    else:  # eager: the explicit reference
        scores = (qg @ kg.transpose(-1, -2)) * dim**-0.5
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = F.dropout(scores.softmax(-1, dtype=torch.float32).to(qg.dtype), p)
        out = probs @ vg
    return out.transpose(1, 2).reshape(seqs * t, heads, dim)[index]


# ------------------------------------------------------------------------------------------------
# Rotary position embedding (GPT-NeoX "rotate half", full head dim), cos/sin always in fp32


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float):
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos()[:, None, :], angles.sin()[:, None, :]  # [N, 1, dim]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


# ------------------------------------------------------------------------------------------------
# Modules (names follow transformers' ModernBERT)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.config = config
        self.sliding = not config.is_global_layer(layer_index)
        self.theta = config.local_rope_theta if self.sliding else config.global_rope_theta
        h = config.hidden_size
        self.Wqkv = nn.Linear(h, 3 * h, bias=config.attention_bias)
        self.Wo = nn.Linear(h, h, bias=config.attention_bias)
        self.out_drop = nn.Dropout(config.attention_output_dropout)

    def forward(self, x: torch.Tensor, layout: Layout, rope: dict) -> torch.Tensor:
        c = self.config
        q, k, v = self.Wqkv(x).view(-1, 3, c.num_attention_heads, c.head_dim).unbind(1)
        cos, sin = rope[self.theta]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attend(q, k, v, layout, self.sliding, c.attn_implementation, c.attention_dropout,
                     self.training)
        return self.out_drop(self.Wo(out.reshape(-1, c.hidden_size)))


class MLP(nn.Module):
    """GeGLU: the first half of Wi's output goes through GELU, the second half gates it."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.Wi = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.act = nn.GELU()
        self.drop = nn.Dropout(config.mlp_dropout)
        self.Wo = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs, gate = self.Wi(x).chunk(2, dim=-1)
        return self.Wo(self.drop(self.act(inputs) * gate))


def layer_norm(config: ModelConfig) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)


class Layer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        # The embeddings end in a LayerNorm, so layer 0 needs no pre-attention norm.
        self.attn_norm = nn.Identity() if layer_index == 0 else layer_norm(config)
        self.attn = Attention(config, layer_index)
        self.mlp_norm = layer_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, layout: Layout, rope: dict) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), layout, rope)
        return x + self.mlp(self.mlp_norm(x))


class Embeddings(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                           padding_idx=config.pad_token_id
                                           if config.pad_token_id < config.vocab_size else None)
        self.norm = layer_norm(config)
        self.drop = nn.Dropout(config.embedding_dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm(self.tok_embeddings(input_ids)))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = layer_norm(config)

    def forward(self, input_ids: torch.Tensor, layout: Layout) -> torch.Tensor:
        c = self.config
        rope = {theta: rope_cos_sin(layout.positions, c.head_dim, theta)
                for theta in {c.global_rope_theta, c.local_rope_theta}}
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, layout, rope)
        return self.final_norm(x)


class PredictionHead(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.head_bias)
        self.act = nn.GELU()
        self.norm = layer_norm(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(x)))


class ModernBert(nn.Module):
    """Backbone + prediction head + vocabulary projection tied to the token embeddings."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.head = PredictionHead(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=config.decoder_bias)
        self.decoder.weight = self.model.embeddings.tok_embeddings.weight
        self.reset_parameters()
        if config.attn_implementation == "flash":
            _require_flash_attn()
        log.info("ModernBert: %d layers, hidden %d, attention backend %s", config.num_hidden_layers,
                 config.hidden_size, config.attn_implementation)

    def reset_parameters(self) -> None:
        """Truncated-normal init as Ettin (bert24 ``full_megatron``): sigma for inputs, embeddings
        and the head; sigma / sqrt(2 L) for the projections back into the residual stream."""
        c = self.config
        sigma = c.initializer_range
        out_sigma = sigma / math.sqrt(2.0 * c.num_hidden_layers)

        def init(weight: torch.Tensor, std: float) -> None:
            cutoff = c.initializer_cutoff_factor * std
            nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-cutoff, b=cutoff)

        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        init(self.model.embeddings.tok_embeddings.weight, sigma)
        init(self.head.dense.weight, sigma)
        for layer in self.model.layers:
            init(layer.attn.Wqkv.weight, sigma)
            init(layer.mlp.Wi.weight, sigma)
            init(layer.attn.Wo.weight, out_sigma)
            init(layer.mlp.Wo.weight, out_sigma)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() counts tied weights once

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        *,
        cu_seqlens: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
        causal: Optional[bool] = None,
        loss_reduction: str = "mean",
    ) -> ModelOutput:
        causal = self.config.causal if causal is None else causal
        padded_shape = None
        if cu_seqlens is None:
            if input_ids.dim() != 2:
                raise ValueError("input_ids must be [batch, seq] (or flat with cu_seqlens)")
            padded_shape = input_ids.shape
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            keep = attention_mask.flatten().bool()
            lengths = attention_mask.sum(dim=1, dtype=torch.int32)
            cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
            max_seqlen = int(lengths.max()) if len(lengths) else 0
            input_ids = input_ids.flatten()[keep]
            if labels is not None:
                labels = labels.flatten()[keep]
        elif max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        layout = Layout.build(cu_seqlens.to(torch.int32), max_seqlen, causal, self.config.window)
        hidden = self.model(input_ids, layout)

        if labels is None:
            logits = self.decoder(self.head(hidden))
            if padded_shape is not None:
                full = logits.new_zeros(padded_shape.numel(), logits.shape[-1])
                full[keep] = logits
                logits = full.view(*padded_shape, -1)
            return ModelOutput(logits=logits)
        # Only labelled positions go through the head and the vocabulary projection.
        selected = labels != IGNORE_INDEX
        targets = labels[selected]
        logits = self.decoder(self.head(hidden[selected]))
        loss = F.cross_entropy(logits.float(), targets, reduction=loss_reduction)
        return ModelOutput(logits=logits, loss=loss)


def _require_flash_attn() -> None:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        raise ImportError(
            "attn_implementation='flash' needs flash-attn: pip install -e '.[gpu]' on a CUDA "
            "machine, or choose attn_implementation=sdpa (default) or flex"
        ) from None
