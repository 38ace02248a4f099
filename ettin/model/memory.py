"""How much memory one training micro-batch of ``ModernBert`` needs: a model counted from the tensors
autograd keeps for the backward pass (derived from ettin/model/modernbert.py, not fitted), checked
against measured peaks by the preflight (``python -m ettin.train ... preflight=true``) and
docs/benchmarks.md.

Per layer and token, the tensors saved for backward are: the layer's input (kept by the attention
norm), the norm's output (kept by Wqkv), the roped q/k/v (3H, kept by the attention), the attention
output and its [tokens, H] copy (kept by Wo), the output dropout's mask (1 byte per value), the
residual after attention (kept by the MLP norm), its output (kept by Wi), Wi's output (2I, kept by
GELU and the gate), GELU's output and the gated product (I each): ``10 H + 4 I`` values and ``H`` mask
bytes. On top of that, what the attention kernel keeps: nothing that grows with the keys for
sdpa (with or without a mask, CPU included: measured, see ``attention_path``; sliding layers attend
to a band of ``4 w + 2`` keys), flash and flex; for eager, the softmax [heads, T] of every query and
the scaled q and k (2H): quadratic in the row's length. The model does not count the kernels' own
workspace; on CPU the process's fixed cost (0.4-0.8 GiB: allocator, kernel buffers) is not in it
either, so it under-predicts small micro-batches.

The loss keeps the [targets, vocab] logits and their log-softmax and builds two more of that size in
backward (plain loss), or ``loss_chunk_tokens`` rows at a time (chunked). At the start of the
backward pass all of it is alive at once; that is the peak this model predicts:
weights + optimizer moments + activations + loss + the tied embedding's gradient (the first
gradient written). The optimizer step's own peak (weights, gradients, moments and the update's
temporaries) is taken when larger; in the first step the moments do not exist yet during backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ettin.model.config import ModelConfig
from ettin.optim.stable_adamw import CHUNK_ELEMENTS as STABLE_ADAMW_CHUNK

GIB = 2**30


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes of one device's training state and its micro-batch's peak (see the module docstring).
    ``quadratic_attention``: the part of ``activations`` that grows with the square of a row's
    length (global layers on a math path), 0 when every layer has a memory-efficient kernel."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    loss: int
    tied_embedding_gradient: int
    optimizer_temporaries: int
    quadratic_attention: int

    @property
    def peak(self) -> int:
        """From the second optimizer step on (the moments exist during the backward pass)."""
        return self._peak(moments_in_backward=True)

    @property
    def first_step_peak(self) -> int:
        """Of the first optimizer step: the moments are created by the step itself."""
        return self._peak(moments_in_backward=False)

    def _peak(self, moments_in_backward: bool) -> int:
        backward_start = self.weights + self.activations + self.loss + self.tied_embedding_gradient \
            + (self.optimizer if moments_in_backward else 0)
        optimizer_step = self.weights + self.gradients + self.optimizer + self.optimizer_temporaries
        return max(backward_start, optimizer_step)


def attention_path(backend: str) -> str:
    """``efficient`` or ``math``: whether a layer's attention keeps score matrices for backward.
    sdpa keeps none, with or without a mask, on CPU too (measured: one [12, 4096, 4096] attention
    with a boolean mask raised the peak by 76 MiB, not by its 805 MiB of fp32 scores; torch's CPU
    flash kernel takes the mask); flash and flex keep none; eager is the explicit softmax."""
    return "math" if backend == "eager" else "efficient"


def training_memory(config: ModelConfig, row_lengths: Sequence[int], targets: int, *,
                    autocast_bf16: bool, activation_checkpointing: bool,
                    loss_implementation: str, loss_chunk_tokens: int = 4096,
                    num_parameters: int, optimizer_moments: int = 2) -> TrainingMemory:
    """The model of one micro-batch's training memory (bytes), for rows of ``row_lengths`` tokens
    with ``targets`` labelled positions."""
    h, i, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    tokens = sum(row_lengths)
    longest = max(row_lengths)
    value = 2 if autocast_bf16 else 4
    # Under bf16 autocast the residual stream and the norms stay fp32 (norms cast their outputs to
    # bf16 once more for the next matmul): 2H fp32 and 2H bf16 more than the list above.
    per_token = (10 * h + 4 * i) * value + h + (4 * h * 2 + 2 * h * 2 if autocast_bf16 else 0)
    attention = quadratic = 0
    for _ in range(config.num_hidden_layers):
        if attention_path(config.attn_implementation) != "math":
            continue
        # eager: the [rows, heads, T, T] grid's softmax, and the scaled q and k
        grid = len(row_lengths) * longest
        scores = grid * heads * longest * 4 + grid * 2 * h * value
        attention += scores
        quadratic += scores
    layers = config.num_hidden_layers
    if activation_checkpointing:  # each layer keeps its input; one layer is recomputed at a time
        activations = tokens * h * 4 * layers + tokens * per_token + attention // layers
    else:
        activations = tokens * per_token * layers + attention
    activations += 2 * tokens * h * 4  # the embeddings' output and the final norm's input
    vocab = config.vocab_size
    rows = targets if loss_implementation == "plain" else min(targets, loss_chunk_tokens)
    loss = 4 * rows * vocab * 4 + targets * 4 * h * 4  # 4 x [rows, vocab] fp32; the head's [targets, H]
    param_bytes = num_parameters * 4  # fp32 weights (bf16-mixed keeps fp32 master weights)
    # StableAdamW's foreach update holds two temporaries the size of the chunk it updates.
    temporaries = 2 * min(num_parameters, STABLE_ADAMW_CHUNK) * 4
    return TrainingMemory(weights=param_bytes, gradients=param_bytes,
                          optimizer=optimizer_moments * param_bytes, activations=activations,
                          loss=loss, tied_embedding_gradient=vocab * h * 4,
                          optimizer_temporaries=temporaries, quadratic_attention=quadratic)
