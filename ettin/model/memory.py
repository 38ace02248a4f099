"""How much memory one training micro-batch of ``ModernBert`` needs: a model counted from the tensors
autograd keeps for the backward pass (derived from ettin/model/modernbert.py, not fitted), checked
against measured peaks by the preflight (``python -m ettin.train ... preflight=true``) and
docs/benchmarks.md.

Per layer and token, the tensors saved for backward are: the layer's input (kept by the attention
norm), the norm's output (kept by Wqkv), the roped q/k/v (3H, kept by the attention), the attention
output and its [tokens, H] copy (kept by Wo), the output dropout's mask (1 byte per value), the
residual after attention (kept by the MLP norm), its output (kept by Wi), Wi's output (2I, kept by
GELU and the gate), GELU's output and the gated product (I each): ``10 H + 4 I`` values and ``H`` mask
bytes. On top of that, what the attention kernel keeps:

* a memory-efficient kernel (flash / flex / sdpa without a mask on CPU, sdpa on GPU): nothing that
  grows with the keys;
* torch's math path (sdpa with a mask on CPU, the band of sliding layers included; eager): the
  softmax [heads, keys] of every query and the scaled q and k (2H) - quadratic in the row's length
  for a global layer, ``4 w + 2`` keys for a sliding layer's band.

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


def attention_path(backend: str, device: str, sliding: bool, needs_mask: bool, longest: int) -> str:
    """``efficient`` or ``math``: which kind of kernel a layer's attention runs on (see the module
    docstring). ``needs_mask``: the rows of the micro-batch differ in length or direction;
    ``longest``: the longest row."""
    from ettin.model.modernbert import ROWWISE_MIN_LENGTH

    if backend in ("flash", "flex"):
        return "efficient"
    if backend == "eager":
        return "math"
    if sliding:  # the band always carries a mask; only CPU has no efficient kernel for one
        return "math" if device == "cpu" else "efficient"
    # Global layers: long rows that differ run one at a time without a mask on CPU
    # (modernbert.rowwise_attention); a GPU's kernels take the mask.
    short = longest < ROWWISE_MIN_LENGTH
    return "math" if needs_mask and device == "cpu" and short else "efficient"


def training_memory(config: ModelConfig, row_lengths: Sequence[int], targets: int, *,
                    device: str, autocast_bf16: bool, activation_checkpointing: bool,
                    loss_implementation: str, loss_chunk_tokens: int = 4096,
                    num_parameters: int, optimizer_moments: int = 2) -> TrainingMemory:
    """The model of one micro-batch's training memory (bytes), for rows of ``row_lengths`` tokens
    with ``targets`` labelled positions, on ``device`` (``cpu`` or ``cuda``)."""
    h, i, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    tokens = sum(row_lengths)
    longest = max(row_lengths)
    needs_mask = len(set(row_lengths)) > 1
    value = 2 if autocast_bf16 else 4
    # Under bf16 autocast the residual stream and the norms stay fp32 (norms cast their outputs to
    # bf16 once more for the next matmul): 2H fp32 and 2H bf16 more than the list above.
    per_token = (10 * h + 4 * i) * value + h + (4 * h * 2 + 2 * h * 2 if autocast_bf16 else 0)
    attention = quadratic = 0
    for layer in range(config.num_hidden_layers):
        sliding = not config.is_global_layer(layer)
        if attention_path(config.attn_implementation, device, sliding, needs_mask, longest) != "math":
            continue
        if sliding and config.attn_implementation == "sdpa":
            keys_per_query = 4 * config.window + 2  # the band: block + 2 w keys, block = 2 (w + 1)
            attention += tokens * (heads * keys_per_query * 4 + 2 * h * value)
        else:  # the [rows, heads, T, T] grid
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
