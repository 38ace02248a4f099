"""Window-aware FLOP counts on real tokens, for benchmarks and the MFU metric.

Training FLOPs = 3 x forward FLOPs (backward costs twice the forward). Forward, per sequence of
length n with T target positions (all tokens for CLM, the masked ones for MLM):

    matmuls   2 * n * L * (4 H^2 + 3 H I)          (Wqkv 3H^2, Wo H^2, Wi 2HI, mlp.Wo IH)
    attention 4 * H * sum over layers of K_layer   (QK^T and AV: 2 H flops per query-key pair each)
    head      2 * T * (H^2 + H V)                  (dense + tied vocabulary projection, targets only)

K_layer is the number of (query, key) pairs the layer actually computes on real tokens: n^2 for a
bidirectional global layer, n(n+1)/2 for a causal one, and for a sliding layer the pairs within the
window (|i - j| <= w, or 0 <= i - j <= w when causal). A causal row with a prefix of p tokens
(PrefixLM) adds the pairs inside the prefix whose key lies after the query (within the window).
Padding is never counted.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Sequence

import torch

from ettin.model.config import ModelConfig

# Dense bf16 peak per device (FLOP/s), without sparsity. Override with ETTIN_PEAK_TFLOPS.
PEAK_BF16_FLOPS = {
    "H200": 989.5e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989.5e12,  # SXM
    "GH200": 989.5e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


@lru_cache(maxsize=4096)
def attention_pairs(n: int, window: int | None, causal: bool, prefix: int = 0) -> int:
    """(query, key) pairs attended in a sequence of n tokens; window None means global; ``prefix``:
    the leading tokens a causal sequence attends to bidirectionally (PrefixLM)."""
    if window is None or window >= n - 1:
        window = max(n - 1, 0)
    w = window
    if not causal:  # query i sees min(n-1, i+w) - max(0, i-w) + 1 keys
        return (2 * w + 1) * n - w * (w + 1)
    # query i sees min(i, w) + 1 keys, and inside a prefix of p the keys i < j < p with j - i <= w:
    # p - d pairs at each distance d <= min(w, p - 1).
    p = min(prefix, n)
    ahead = min(w, max(p - 1, 0))
    return (w + 1) * n - w * (w + 1) // 2 + ahead * p - ahead * (ahead + 1) // 2


def forward_flops(config: ModelConfig, seq_lens: list[int], n_targets: int,
                  causal: bool | Sequence[bool], prefix: Sequence[int] | None = None) -> float:
    """``causal``: the direction of every sequence, or of each (an objective mix); ``prefix``: each
    sequence's prefix length (PrefixLM; ``prefix_lengths`` of its batch), None for none."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    layers = config.num_hidden_layers
    n_global = sum(config.is_global_layer(k) for k in range(layers))
    tokens = sum(seq_lens)
    directions = [causal] * len(seq_lens) if isinstance(causal, bool) else causal
    prefixes = [0] * len(seq_lens) if prefix is None else prefix
    pairs = sum(
        n_global * attention_pairs(n, None, c, p)
        + (layers - n_global) * attention_pairs(n, config.window, c, p)
        for n, c, p in zip(seq_lens, directions, prefixes, strict=True)
    )
    return 2.0 * tokens * layers * (4 * h * h + 3 * h * i) + 4.0 * h * pairs + 2.0 * n_targets * (h * h + h * v)


def training_flops(config: ModelConfig, seq_lens: list[int], n_targets: int,
                   causal: bool | Sequence[bool], prefix: Sequence[int] | None = None) -> float:
    return 3.0 * forward_flops(config, seq_lens, n_targets, causal, prefix)


def peak_flops_per_device() -> float | None:
    """Peak dense bf16 FLOP/s of this process's GPU, from the table or ETTIN_PEAK_TFLOPS."""
    if "ETTIN_PEAK_TFLOPS" in os.environ:
        return float(os.environ["ETTIN_PEAK_TFLOPS"]) * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_FLOPS.items():  # ordered so specific names match first
        if key in name:
            return value
    return None
