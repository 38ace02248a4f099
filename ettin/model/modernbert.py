"""ModernBERT, the one architecture behind Ettin's encoders and decoders, as a plain nn.Module.

Weight names are transformers' ``ModernBertForMaskedLM`` names, so ``model.load_state_dict(
hf_mlm.state_dict())`` works as is. Whether the model runs as an encoder (bidirectional) or as a
decoder (causal) is a forward-time choice: the same weights serve both.

Inside, every batch is unpadded: the tokens of all sequences are concatenated into one [N, H] stream
with ``cu_seqlens`` marking where each sequence starts, so padding costs no compute in the matmuls.
RoPE positions restart at 0 for every sequence and attention never crosses one.

Sliding-window layers see ``config.window`` tokens on each side of a query (bidirectional) or the
``window`` previous tokens and the query itself (causal; transformers' decoder calls that
``sliding_window = window + 1``). Layer i is global iff ``i % global_attn_every_n_layers == 0``.

The attention pattern of a forward pass (what an objective's attention spec becomes, ettin.objectives)
is ``causal`` (one bool for every row, or a bool per row) and optionally ``prefix_lengths`` (an int per
row): a query sees the keys of its own row that are

* every key, in a bidirectional row;
* at or before it, or among the row's first ``prefix_lengths`` tokens, in a causal row (PrefixLM:
  bidirectional over the prefix, causal after it; a prefix of 0 is plain causal attention);

and, in a sliding layer, within ``window`` positions of it. ``allowed_pairs`` states that rule once;
every backend's mask is built from it (flex's ``mask_mod`` spells it out for the stream).

Attention backends (``config.attn_implementation``), all computing the same function:

* ``sdpa``  torch scaled_dot_product_attention over a [sequences, heads, max_seqlen, dim] grid (one
            row per sequence, so a packed batch never builds an N x N mask); long sliding layers
            attend block-wise to a band of keys instead of the whole sequence.
* ``flex``  torch FlexAttention over the flat stream with a document / causal / window BlockMask
            (compiled on GPU; on CPU torch runs it uncompiled and without a backward pass).
* ``flash`` flash-attn's varlen kernel with ``window_size`` (optional dependency, GPU only).
* ``eager`` explicit softmax over the same grid as sdpa: the readable reference.

Host-device synchronisation: given what the collators provide (flat ``input_ids`` with
``cu_seqlens``, ``max_seqlen`` and ``target_index``), forward and backward read nothing back from
the device, so a GPU never waits for the host between micro-batches. Without them the model
computes them itself (``nonzero``, ``max``), which synchronises once per call.

The loss (``ModernBert.loss_implementation``): ``plain`` materialises the [targets, vocab] logits
and returns them; ``chunked`` (``linear_cross_entropy``) never holds more than ``loss_chunk_tokens``
rows of logits at once, which is what lets CLM at 8k context fit (the logits alone would be
[tokens x 50,368] fp32), and returns no logits.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ettin.model.config import ModelConfig

log = logging.getLogger("ettin")

IGNORE_INDEX = -100


LOSS_IMPLEMENTATIONS = ("plain", "chunked")


@dataclass
class ModelOutput:
    """Without labels: ``logits`` [B, T, V] for padded input, [N, V] for flat input. With labels:
    ``logits`` [n_targets, V] of the labelled positions in ``target_index``'s order (stream order
    unless grouped; None under the chunked loss), ``loss``, ``targets`` (the labels of those positions, [n_targets]; ``targets.numel()``
    is the count, known without a sync) and ``n_correct`` (0-dim int64 tensor: targets whose
    largest logit is the label, for masked accuracy without indexing on the host).
    ``group_loss`` / ``group_correct`` [groups]: the summed loss and the correct count of each
    target group (``target_groups``; one group, all targets, without it); the loss of a target is
    its cross-entropy times its ``target_weight`` (1 without). ``loss_tokens`` [groups] (host ints):
    what each group's mean divides by, its target count unless given (MDLM: the rows' tokens)."""

    logits: Optional[torch.Tensor]
    loss: Optional[torch.Tensor] = None
    targets: Optional[torch.Tensor] = None
    n_correct: Optional[torch.Tensor] = None
    group_loss: Optional[torch.Tensor] = None
    group_correct: Optional[torch.Tensor] = None
    loss_tokens: Optional[list[int]] = None


# ------------------------------------------------------------------------------------------------
# The unpadded layout: where each sequence lies in the flat stream, and the masks built from it.


class Layout:
    """Sequences of one forward pass in the flat token stream.

    Masks are built once per forward pass (``prepare``, before the layers, so a compiled layer only
    reads them) and shared by all layers of the same type. ``n_tokens`` (the stream's length, from
    the input's shape) saves reading ``cu_seqlens[-1]`` back from the device.

    ``causal``: one direction for every sequence (a bool: the uniform fast paths), or a bool tensor
    [sequences] giving each its own (an objective mix): a query then sees the keys of its own
    sequence, all of them in a bidirectional sequence, those at or before it in a causal one.
    ``prefix``: int tensor [sequences] (PrefixLM), or None: a causal sequence's first ``prefix``
    tokens are also seen by every query of the sequence, the later ones included.
    """

    def __init__(self, cu_seqlens: torch.Tensor, max_seqlen: int, causal: bool | torch.Tensor,
                 window: int, n_tokens: Optional[int] = None, prefix: Optional[torch.Tensor] = None) -> None:
        self.cu_seqlens = cu_seqlens.to(torch.int32)
        self.max_seqlen = int(max_seqlen)
        self.mixed = isinstance(causal, torch.Tensor)
        self.causal = causal.to(device=cu_seqlens.device, dtype=torch.bool) if self.mixed else bool(causal)
        self.window = window
        self.lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        n = int(cu_seqlens[-1]) if n_tokens is None else n_tokens
        device = cu_seqlens.device
        self.prefix = None if prefix is None else prefix.to(device=device, dtype=torch.long)
        # Sequence index of every token, and its position inside its sequence.
        self.sequence = torch.repeat_interleave(torch.arange(len(self.lengths), device=device),
                                                self.lengths, output_size=n)
        self.positions = torch.arange(n, device=device) - cu_seqlens[:-1].long()[self.sequence]
        # No padding in the grid: every length <= max_seqlen, so they are all equal iff they sum to
        # seqs * max_seqlen (shapes only, no sync).
        self.uniform = n == len(self.lengths) * self.max_seqlen
        self._cache: dict = {}

    def causal_of(self, sequence: torch.Tensor) -> bool | torch.Tensor:
        """The direction of the sequences indexed by ``sequence`` (any shape; indices outside the
        batch, the band's stream padding, read as causal, which only hides keys)."""
        if not self.mixed:
            return self.causal
        inside = (sequence >= 0) & (sequence < len(self.lengths))
        return ~inside | self.causal[sequence.clamp(0, len(self.lengths) - 1)]

    def prefix_of(self, sequence: torch.Tensor) -> Optional[torch.Tensor]:
        """The prefix lengths of the sequences indexed by ``sequence`` (0 outside the batch)."""
        if self.prefix is None:
            return None
        inside = (sequence >= 0) & (sequence < len(self.lengths))
        return torch.where(inside, self.prefix[sequence.clamp(0, len(self.lengths) - 1)], 0)

    @property
    def only_backwards(self) -> bool:
        """Whether no query sees a key after it (every sequence plain causal): the kernels' own
        causal mask applies, and a sliding window needs no keys ahead of the query."""
        return self.causal is True and self.prefix is None

    def prepare(self, backend: str, sliding_kinds) -> None:
        """Build the masks that layers of each kind (``sliding`` True / False) will read."""
        for sliding in sliding_kinds:
            if backend == "flex":
                self.block_mask(sliding)
            elif backend in ("sdpa", "eager"):
                if sliding and backend == "sdpa" and self.use_band():
                    self.band()
                else:
                    self.grid_index()
                    self.grid_mask(sliding)

    def cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    # -- sdpa / eager: one row per sequence --------------------------------------------------------
    def grid_index(self) -> torch.Tensor:
        """For each flat token, its row in the [num_seqs * max_seqlen] grid."""
        return self.cached("grid_index", lambda: self.sequence * self.max_seqlen + self.positions)

    def grid_mask(self, sliding: bool) -> Optional[torch.Tensor]:
        """Boolean [num_seqs, 1, T, T]: True where query i may see key j; None when nothing is
        masked (a global bidirectional layer over equal-length sequences)."""
        return self.cached(("grid", sliding), lambda: self._grid_mask(sliding))

    def _grid_mask(self, sliding: bool) -> Optional[torch.Tensor]:
        t = self.max_seqlen
        if self.uniform and not sliding and self.causal is False:
            return None
        idx = torch.arange(t, device=self.lengths.device)
        causal = self.causal[:, None, None] if self.mixed else self.causal
        prefix = None if self.prefix is None else self.prefix[:, None, None]
        pattern = allowed_pairs(idx[:, None], idx[None, :], causal, self.window if sliding else None, prefix)
        if self.uniform:
            return pattern[None, None] if pattern.dim() == 2 else pattern[:, None]
        # Keys must be real tokens. Padded query rows see only themselves so no row is empty (an
        # empty softmax row is NaN); their outputs are never read.
        real_key = idx[None, None, :] < self.lengths[:, None, None]
        return ((pattern & real_key) | torch.eye(t, dtype=torch.bool, device=idx.device))[:, None]

    # -- sdpa, long sliding layers: a band of keys per block of the flat stream ---------------------
    def use_band(self) -> bool:
        """Whether sliding layers attend block-wise over the stream (``band_attention``): when the
        band holds fewer (query, key) pairs than the per-sequence grid."""
        w = self.window
        return len(self.sequence) * (4 * w + 2) * 1.5 < len(self.lengths) * self.max_seqlen**2

    def band(self):
        """Query blocks of ``block = 2 (w + 1)`` stream tokens; block b sees the ``keys`` stream
        tokens from ``b * block - w``. Returns (block, keys, mask [n_blocks, 1, block, keys])."""

        def build():
            w, n = self.window, len(self.sequence)
            block = 2 * (w + 1)
            keys = block + (w if self.only_backwards else 2 * w)
            n_blocks = -(-n // block)
            device = self.sequence.device
            q = torch.arange(n_blocks * block, device=device).view(n_blocks, block, 1)
            k = (torch.arange(n_blocks, device=device) * block - w)[:, None, None] + torch.arange(
                keys, device=device)  # [n_blocks, 1, keys] stream index, may lie outside [0, n)

            def sequence_and_position(i):  # beyond the stream: no sequence (-1 after, -2 before)
                inside = (i >= 0) & (i < n)
                j = i.clamp(0, n - 1)
                seq = torch.where(inside, self.sequence[j], torch.where(i < 0, -2, -1))
                return seq, torch.where(inside, self.positions[j], i)

            q_seq, q_pos = sequence_and_position(q)
            k_seq, k_pos = sequence_and_position(k)
            # Stream padding after the end sees itself, so no softmax row is empty.
            mask = (q_seq == k_seq) & allowed_pairs(q_pos, k_pos, self.causal_of(q_seq), w,
                                                   self.prefix_of(q_seq))
            return block, keys, mask[:, None]

        return self.cached("band", build)

    # -- flex: the flat stream ---------------------------------------------------------------------
    def block_mask(self, sliding: bool):
        """FlexAttention BlockMask over the flat stream: ``allowed_pairs`` within each sequence."""

        def build():
            from torch.nn.attention.flex_attention import create_block_mask

            n = len(self.sequence)
            sequence, positions = self.sequence, self.positions
            causal, window, prefix = self.causal, (self.window if sliding else None), self.prefix
            mixed = self.mixed

            def mask_mod(b, h, q, kv):
                allowed = sequence[q] == sequence[kv]
                if mixed or causal:
                    visible = kv <= q
                    if prefix is not None:
                        visible = visible | (positions[kv] < prefix[sequence[q]])
                    if mixed:
                        visible = visible | ~causal[sequence[q]]
                    allowed = allowed & visible
                if window is not None:
                    allowed = allowed & ((positions[q] - positions[kv]).abs() <= window)
                return allowed

            on_gpu = sequence.device.type == "cuda"  # compiled: never materializes N x N
            return create_block_mask(mask_mod, None, None, n, n, device=sequence.device, _compile=on_gpu)

        return self.cached(("flex", sliding), build)


def allowed_pairs(q: torch.Tensor, k: torch.Tensor, causal: bool | torch.Tensor,
                  window: Optional[int], prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Whether the query at position q may see the key at position k (same sequence assumed);
    ``causal`` a bool, or a bool tensor broadcasting against q and k (each query's direction);
    ``prefix`` None, or an int tensor broadcasting likewise (each query's sequence's prefix length)."""
    shapes = [t.shape for t in (causal, prefix) if isinstance(t, torch.Tensor)]
    allowed = torch.ones(torch.broadcast_shapes(q.shape, k.shape, *shapes), dtype=torch.bool, device=q.device)
    if causal is not False:
        visible = k <= q  # a causal query sees itself and the keys before it,
        if prefix is not None:
            visible = visible | (k < prefix)  # the whole prefix,
        if isinstance(causal, torch.Tensor):
            visible = visible | ~causal  # and a bidirectional row sees every key
        allowed &= visible
    if window is not None:
        allowed &= (q - k).abs() <= window
    return allowed


# ------------------------------------------------------------------------------------------------
# Attention backends. Input: the roped [N, 3, heads, dim] q/k/v stack; output [N, heads, dim].


def attend(qkv: torch.Tensor, layout: Layout, sliding: bool, backend: str, dropout: float) -> torch.Tensor:
    if backend == "flash":
        return flash_attention(qkv, layout, sliding, dropout)
    if backend == "flex":
        return flex_attention(qkv, layout, sliding, dropout)
    return grid_attention(qkv, layout, sliding, eager=backend == "eager", dropout=dropout)


def grid_attention(qkv, layout: Layout, sliding: bool, eager: bool, dropout: float) -> torch.Tensor:
    """sdpa / eager. Long sliding layers (sdpa): ``band_attention``. Otherwise the stream is
    scattered into a [seqs, heads, T, dim] grid for the attention only."""
    if sliding and not eager and layout.use_band():
        return band_attention(qkv, layout, dropout)
    n, _, heads, dim = qkv.shape
    seqs, t = len(layout.lengths), layout.max_seqlen
    index = layout.grid_index()
    if layout.uniform:  # the stream already is the grid
        grid = qkv.view(seqs, t, 3, heads, dim)
    else:
        grid = qkv.new_zeros(seqs * t, 3, heads, dim).index_copy_(0, index, qkv).view(seqs, t, 3, heads, dim)
    q, k, v = grid.permute(2, 0, 3, 1, 4).unbind(0)  # each [seqs, heads, T, dim]
    is_causal = layout.only_backwards and layout.uniform and not sliding
    out = dot_product_attention(q, k, v, layout.grid_mask(sliding), is_causal, eager, dropout)
    out = out.transpose(1, 2).reshape(seqs * t, heads, dim)
    return out if layout.uniform else out.index_select(0, index)


def dot_product_attention(q, k, v, mask: Optional[torch.Tensor], is_causal: bool, eager: bool,
                          dropout: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v over [..., T, dim]; mask True = attend."""
    if not eager:
        if is_causal:  # equal-length causal: the kernel's own causal mask, no mask tensor
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    if is_causal:
        t = q.shape[-2]
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = F.dropout(scores.softmax(-1, dtype=torch.float32).to(q.dtype), dropout)
    return probs @ v


def band_attention(qkv, layout: Layout, dropout: float) -> torch.Tensor:
    """Sliding-window attention that only touches the keys a query can see.

    The flat stream is cut into blocks of ``block = 2 (w + 1)`` tokens; block b attends to the
    stream tokens ``[b block - w, (b + 1) block + w)`` (only backwards: ``... (b + 1) block)``), masked to the
    query's own sequence and window. That is ``block + 2 w`` keys per query instead of a whole
    sequence, and padding costs nothing: for T = 1024 and w = 64 about a quarter of the grid's work.
    """
    n, _, heads, dim = qkv.shape
    w = layout.window
    block, keys, mask = layout.band()
    n_blocks = mask.shape[0]
    after = (n_blocks - 1) * block + keys - w - n  # padding after the stream: the last band's end
    padded = F.pad(qkv, (0, 0, 0, 0, 0, 0, w, after))
    q = padded[w : w + n_blocks * block, 0].view(n_blocks, block, heads, dim).transpose(1, 2)
    # unfold: a strided [n_blocks, heads, dim, keys] view of the band of each block, no copy.
    k = padded[:, 1].unfold(0, keys, block)[:n_blocks].permute(0, 1, 3, 2)
    v = padded[:, 2].unfold(0, keys, block)[:n_blocks].permute(0, 1, 3, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    return out.transpose(1, 2).reshape(n_blocks * block, heads, dim)[:n]


@functools.lru_cache(maxsize=None)
def _flex_kernel(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention as kernel

    if device_type == "cuda":  # uncompiled flex materializes the scores; compiled is the fast path
        return torch.compile(kernel)
    return kernel


def flex_attention(qkv, layout: Layout, sliding: bool, dropout: float) -> torch.Tensor:
    if dropout:
        raise ValueError("attention_dropout > 0 is not supported by the flex backend; use sdpa")
    if qkv.device.type == "cpu" and torch.is_grad_enabled() and qkv.requires_grad:
        raise NotImplementedError(
            "torch FlexAttention has no backward pass on CPU; train on CPU with attn_implementation=sdpa")
    q, k, v = qkv.permute(1, 2, 0, 3)[:, None].unbind(0)  # each [1, heads, N, dim]
    out = _flex_kernel(qkv.device.type)(q, k, v, block_mask=layout.block_mask(sliding))
    return out[0].transpose(0, 1)


def flash_attention(qkv, layout: Layout, sliding: bool, dropout: float) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    if layout.mixed:  # one causal flag per kernel call
        raise ValueError(
            "attn_implementation='flash' cannot give the sequences of one batch different attention "
            "directions (an objective mix); use attn_implementation='sdpa' or 'flex'")
    if layout.prefix is not None:  # causal or not, for a whole sequence
        raise ValueError(
            "attn_implementation='flash' cannot attend bidirectionally over a prefix and causally after "
            "it (prefix_lm); use attn_implementation='sdpa' or 'flex'")
    dtype = qkv.dtype
    if dtype not in (torch.float16, torch.bfloat16):  # flash-attn computes in 16 bits only
        qkv = qkv.to(torch.bfloat16)
    q, k, v = qkv.unbind(1)
    window = (layout.window, 0 if layout.causal else layout.window) if sliding else (-1, -1)
    out = flash_attn_varlen_func(q, k, v, layout.cu_seqlens, layout.cu_seqlens, layout.max_seqlen,
                                 layout.max_seqlen, dropout_p=dropout, causal=layout.causal,
                                 window_size=window)
    return out.to(dtype)


def _require_flash_attn() -> None:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        raise ImportError(
            "attn_implementation='flash' needs flash-attn (pip install -e '.[gpu]' on a CUDA machine); "
            "or choose attn_implementation='sdpa' (default) or 'flex'"
        ) from None


# ------------------------------------------------------------------------------------------------
# The memory-light loss


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, and the number of
    rows whose largest logit is the target, computed ``chunk`` rows at a time. The gradients are
    computed in the forward, chunk by chunk, while each chunk's logits exist (as liger-kernel's
    fused linear cross-entropy does), so no [rows, vocab] tensor is ever alive and nothing is
    recomputed. Matmuls run in ``dtype`` (the autocast dtype), softmax and loss in fp32, the weight
    gradient is accumulated in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, dtype: torch.dtype, row_weight=None):
        grads_needed = any(ctx.needs_input_grad[:3])
        h, w = hidden.to(dtype), weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        n_correct = torch.zeros((), device=hidden.device, dtype=torch.long)
        grad_hidden = torch.empty_like(h) if grads_needed else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if grads_needed else None
        grad_bias = None if bias is None or not grads_needed else torch.zeros_like(bias, dtype=torch.float32)
        for start in range(0, len(h), chunk):
            h_chunk, t_chunk = h[start:start + chunk], targets[start:start + chunk]
            logits = F.linear(h_chunk, w, b).float()
            n_correct += (logits.argmax(-1) == t_chunk).sum()
            log_norm = logits.logsumexp(-1, keepdim=True)
            losses = log_norm.squeeze(1) - logits.gather(1, t_chunk[:, None]).squeeze(1)
            w_chunk = None if row_weight is None else row_weight[start:start + chunk].float()[:, None]
            loss += (losses if w_chunk is None else losses * w_chunk.squeeze(1)).sum()
            if grads_needed:  # d loss / d logits = (softmax - one_hot(target)) x the row's weight
                grad_logits = logits.sub_(log_norm).exp_()
                grad_logits.scatter_add_(1, t_chunk[:, None], grad_logits.new_full((len(t_chunk), 1), -1.0))
                if w_chunk is not None:
                    grad_logits.mul_(w_chunk)
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0)
                grad_logits = grad_logits.to(dtype)
                grad_hidden[start:start + chunk] = grad_logits @ w
                grad_weight += (grad_logits.t() @ h_chunk).float()
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.input_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(n_correct)
        return loss, n_correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_n_correct):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        dtypes = ctx.input_dtypes
        grads = [None if g is None else (g * grad_loss).to(d)
                 for g, d in zip((grad_hidden, grad_weight, grad_bias), dtypes)]
        return (*grads, None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         targets: torch.Tensor, chunk: int,
                         row_weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of cross_entropy(F.linear(hidden, weight, bias), targets) [x row_weight], n_correct)``
    in chunks of ``chunk`` rows; the same values and gradients as the plain computation, in the
    autocast dtype when autocast is on (as ``nn.Linear`` would be)."""
    if chunk < 1:
        raise ValueError(f"loss_chunk_tokens must be >= 1, not {chunk}")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk, dtype, row_weight)


# ------------------------------------------------------------------------------------------------
# Rotary position embedding: GPT-NeoX "rotate half" over the full head dim, cos/sin always in fp32.


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * theta^(-2k/dim), k < dim/2: [N, 1, 1, dim/2] fp32 each."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions.float()[:, None] * inv_freq
    return angles.cos()[:, None, None], angles.sin()[:, None, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cat(cos, cos) + rotate_half(x) * cat(sin, sin), rotate_half(x) = cat(-x2, x1), in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


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
        qkv = self.Wqkv(x).view(-1, 3, c.num_attention_heads, c.head_dim)
        cos, sin = rope[self.theta]
        qkv = torch.cat([apply_rope(qkv[:, :2], cos, sin), qkv[:, 2:]], dim=1)
        out = attend(qkv, layout, self.sliding, c.attn_implementation,
                     c.attention_dropout if self.training else 0.0)
        return self.out_drop(self.Wo(out.reshape(-1, c.hidden_size)))


class MLP(nn.Module):
    """GeGLU: the first half of Wi's output goes through GELU (erf), the second half gates it."""

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
        # The embeddings end in a LayerNorm, so layer 0 has no pre-attention norm (no weight either).
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
        pad = config.pad_token_id if 0 <= config.pad_token_id < config.vocab_size else None
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=pad)
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
        layout.prepare(c.attn_implementation, {layer.attn.sliding for layer in self.layers})
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


def unpad(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
          labels: Optional[torch.Tensor] = None):
    """A padded batch ([B, T], attention_mask 1 = real) as the flat stream of its real tokens:
    ``(input_ids [N], labels [N] or None, cu_seqlens, max_seqlen, keep)``, ``keep`` being the real
    tokens' positions in the flattened grid (None without a mask: every token is real)."""
    if input_ids.dim() != 2:
        raise ValueError("input_ids must be [batch, seq], or flat [N] with cu_seqlens")
    if attention_mask is None:
        keep = None
        lengths = torch.full((input_ids.shape[0],), input_ids.shape[1], dtype=torch.int32,
                             device=input_ids.device)
        input_ids = input_ids.flatten()
        labels = None if labels is None else labels.flatten()
    else:
        keep = attention_mask.flatten().nonzero().squeeze(1)
        lengths = attention_mask.sum(dim=1, dtype=torch.int32)
        input_ids = input_ids.flatten()[keep]
        labels = None if labels is None else labels.flatten()[keep]
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    max_seqlen = int(lengths.max()) if len(lengths) else 0
    return input_ids, labels, cu_seqlens, max_seqlen, keep


class ModernBert(nn.Module):
    """Backbone + prediction head + vocabulary projection tied to the token embeddings.

    ``loss_implementation``: ``plain`` or ``chunked`` (see the module docstring); an attribute, so
    it can be switched on a built model, as can ``loss_chunk_tokens``."""

    def __init__(self, config: ModelConfig, *, loss_implementation: str = "plain",
                 loss_chunk_tokens: int = 4096) -> None:
        super().__init__()
        if config.attn_implementation == "flash":
            _require_flash_attn()
        if loss_implementation not in LOSS_IMPLEMENTATIONS:
            raise ValueError(f"loss_implementation={loss_implementation!r} is unknown; choose one of "
                             f"{', '.join(LOSS_IMPLEMENTATIONS)}")
        self.loss_implementation = loss_implementation
        self.loss_chunk_tokens = loss_chunk_tokens
        self.config = config
        self.model = Backbone(config)
        self.head = PredictionHead(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=config.decoder_bias)
        self.decoder.weight = self.model.embeddings.tok_embeddings.weight
        self.reset_parameters()
        log.info("ModernBert: %d layers, hidden %d, %s parameters, attention backend %s",
                 config.num_hidden_layers, config.hidden_size, f"{self.num_parameters():,}",
                 config.attn_implementation)

    def reset_parameters(self) -> None:
        """Truncated-normal init as Ettin (bert24 ``full_megatron``), cut at +-cutoff * std:
        sigma = initializer_range for the embeddings, Wqkv, mlp.Wi and head.dense; sigma / sqrt(2 L)
        for attn.Wo and mlp.Wo (the projections back into the residual stream). Biases 0, norms 1."""
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
        """Unique parameters (the tied embedding / decoder weight counted once)."""
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        *,
        cu_seqlens: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
        target_index: Optional[torch.Tensor] = None,
        target_groups: Optional[Sequence[int]] = None,
        causal: Optional[bool | torch.Tensor] = None,
        prefix_lengths: Optional[torch.Tensor] = None,
        target_weight: Optional[torch.Tensor] = None,
        loss_tokens: Optional[Sequence[int]] = None,
        loss_reduction: str = "mean",
    ) -> ModelOutput:
        """Padded ([B, T] + attention_mask) or flat (input_ids [N] + cu_seqlens) input; see
        docs/design.md. With labels only labelled positions reach the head. Flat input may come
        with ``max_seqlen`` (the longest row) and ``target_index`` (the stream positions whose
        label is not -100, ascending): given both, nothing is read back from the device.

        ``causal``: one direction for all rows, or a bool tensor [rows] (each row's own);
        ``prefix_lengths``: int tensor [rows], the leading tokens of each causal row that every query
        of the row sees (PrefixLM; see the module docstring).
        ``target_groups``: the number of targets in each group (an objective of a mix), when
        ``target_index`` lists the groups' positions one group after another (each ascending); the
        output then holds each group's summed loss and correct count. ``target_weight`` [n_targets]
        (``target_index``'s order) weighs each target's cross-entropy, ``loss_tokens`` (one host
        int per group) is what a group's mean divides by (MDLM, ettin.objectives.collate)."""
        causal = self.config.causal if causal is None else causal
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', not {loss_reduction!r}")
        if target_index is not None and (labels is None or cu_seqlens is None):
            raise ValueError("target_index indexes the labels of the flat stream: pass it with "
                             "labels and cu_seqlens (flat input), or leave it out")
        if target_groups is not None and target_index is None:
            raise ValueError("target_groups counts the targets of target_index group by group: pass "
                             "it with target_index, or leave it out")
        if target_weight is not None and target_index is None:
            raise ValueError("target_weight follows target_index's order: pass it with target_index")
        keep = None
        if cu_seqlens is None:
            padded_shape = input_ids.shape
            input_ids, labels, cu_seqlens, max_seqlen, keep = unpad(input_ids, attention_mask, labels)
        else:
            if input_ids.dim() != 1:
                raise ValueError("with cu_seqlens, input_ids must be flat [N]")
            padded_shape = None
            if max_seqlen is None:  # a host sync; the collators pass it
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        layout = Layout(cu_seqlens, max_seqlen, causal, self.config.window, n_tokens=len(input_ids),
                        prefix=prefix_lengths)
        hidden = self.model(input_ids, layout)

        if labels is None:
            logits = self.decoder(self.head(hidden))
            if padded_shape is not None:
                if keep is not None:  # re-pad with zeros
                    logits = logits.new_zeros(padded_shape.numel(), logits.shape[-1]).index_copy_(
                        0, keep, logits)
                logits = logits.view(*padded_shape, -1)
            return ModelOutput(logits=logits)

        # Only labelled positions go through the head and the vocabulary projection.
        if target_index is None:  # a host sync; the collators pass target_index
            target_index = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        targets = labels.index_select(0, target_index)
        selected = self.head(hidden.index_select(0, target_index))
        groups = [len(targets)] if target_groups is None else [int(g) for g in target_groups]
        if sum(groups) != len(targets):
            raise ValueError(f"target_groups {groups} must add up to the {len(targets)} targets")
        bounds = list(zip(itertools.accumulate([0, *groups[:-1]]), itertools.accumulate(groups)))
        logits = None if self.loss_implementation == "chunked" else self.decoder(selected)
        sums = [self._loss_sum(selected, logits, targets, target_weight, start, end)
                for start, end in bounds]
        group_loss = torch.stack([loss for loss, _ in sums])
        group_correct = torch.stack([correct for _, correct in sums])
        loss, n_correct = group_loss.sum(), group_correct.sum()
        loss_tokens = groups if loss_tokens is None else [int(n) for n in loss_tokens]
        if len(loss_tokens) != len(groups):
            raise ValueError(f"loss_tokens {loss_tokens} must give one count per target group {groups}")
        if loss_reduction == "mean":  # 0 rather than NaN for a batch without targets
            loss = loss / max(sum(loss_tokens), 1)
        return ModelOutput(logits=logits, loss=loss, targets=targets, n_correct=n_correct,
                           group_loss=group_loss, group_correct=group_correct, loss_tokens=loss_tokens)

    def _loss_sum(self, selected: torch.Tensor, logits: Optional[torch.Tensor], targets: torch.Tensor,
                  weight: Optional[torch.Tensor], start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed, weighted cross-entropy, correct count) of targets ``start:end``; ``logits`` None
        under the chunked loss, ``weight`` None for weight 1."""
        weight = None if weight is None else weight[start:end]
        if logits is None:
            return linear_cross_entropy(selected[start:end], self.decoder.weight, self.decoder.bias,
                                        targets[start:end], self.loss_chunk_tokens, weight)
        logits, targets = logits[start:end], targets[start:end]
        losses = F.cross_entropy(logits.float(), targets, reduction="none")
        return ((losses if weight is None else losses * weight.float()).sum(),
                (logits.detach().argmax(-1) == targets).sum())
