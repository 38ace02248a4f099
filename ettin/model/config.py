"""Model configuration and the one table of Ettin sizes.

Every size is a row of ``SIZES``; everything else (encoder or decoder, phase, dropout used in
training) is composed on top by the recipes. Field names follow transformers' ModernBertConfig where
one exists, so the Hugging Face mapping in ``ettin.model.hub`` reads at a glance.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

ATTENTION_BACKENDS = ("sdpa", "flex", "flash", "eager")


@dataclass
class ModelConfig:
    vocab_size: int = 50368
    hidden_size: int = 768
    intermediate_size: int = 1152
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    # Layer i uses global attention iff i % global_attn_every_n_layers == 0, else the sliding window.
    global_attn_every_n_layers: int = 3
    # Sliding-window layers: how many tokens before a query it sees (and, run bidirectionally, how many
    # after it), the query itself not counted. Ettin trained both objectives with 64.
    window: int = 64
    global_rope_theta: float = 10000.0
    local_rope_theta: float = 10000.0
    # Direction used when forward() is not told: False runs as an encoder, True as a decoder.
    causal: bool = False
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    head_bias: bool = False  # bias of the prediction head's dense layer (HF: classifier_bias)
    decoder_bias: bool = True  # bias of the tied vocabulary projection
    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0  # on attention probabilities
    attention_output_dropout: float = 0.0  # after attn.Wo; Ettin pretraining used 0.1
    mlp_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_cutoff_factor: float = 2.0
    attn_implementation: str = "sdpa"
    max_position_embeddings: int = 8192  # metadata for export; RoPE has no length limit
    # Special ids are written into exported configs; training takes them from the tokenizer.
    pad_token_id: int = 50283
    bos_token_id: int = 50281  # [CLS]
    eos_token_id: int = 50282  # [SEP]
    mask_token_id: int = 50284

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}"
            )
        if self.attn_implementation not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attn_implementation={self.attn_implementation!r} is unknown; choose one of "
                f"{', '.join(ATTENTION_BACKENDS)}"
            )
        if self.window < 0:
            raise ValueError(f"window={self.window} must be >= 0")
        if self.global_attn_every_n_layers < 1:
            raise ValueError("global_attn_every_n_layers must be >= 1")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_global_layer(self, layer_index: int) -> bool:
        return layer_index % self.global_attn_every_n_layers == 0


@dataclass(frozen=True)
class MicroBatches:
    """Sequences per device per forward/backward in each phase (Ettin's 4-GPU runs)."""

    pretrain: int
    extension: int
    decay: int
    cross: int


@dataclass(frozen=True)
class Size:
    """One size: the model's shape and Ettin's per-size training values (docs/recipes.md).

    Recipes read the training values with ``${size:FIELD}`` (ettin/train/config.py), so a misspelt field
    fails at start instead of falling back to another value."""

    # shape (head dim is 64 for every Ettin size)
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    # Unique parameters (the tied embedding counted once) at Ettin's vocabulary of 50,368, as
    # published (docs/recipes.md, the size table); the suite's parameter axis. None: none published.
    parameters: Optional[int]
    # The suite ladder the size is a rung of (LADDERS), or None: on no ladder (an experimental size is
    # trained by naming it, and joins a ladder only by saying so here).
    ladder: Optional[str]
    # phase-1 peak LR and weight decay
    lr: float
    weight_decay: float
    pretrain_warmup_tokens: int
    batch_warmup_tokens: int
    # Ettin ran 4 GPUs: the batch ramp starts at (and grows by) one micro-batch per GPU.
    batch_warmup_min: int
    cross_batch_warmup_min: int
    micro_batch: MicroBatches
    # Later phases; the 1B's are shorter (Ettin configs).
    extension_tokens: int = 250_000_000_000
    decay_tokens: int = 50_000_000_000
    cross_tokens: int = 50_000_000_000
    cross_warmup_tokens: int = 3_000_000_000
    cross_decay_tokens: int = 10_000_000_000
    cross_checkpoint_every_tokens: int = 10_000_000_000

    def shape(self) -> dict[str, int]:
        """The ModelConfig fields of this size."""
        return dict(num_hidden_layers=self.num_hidden_layers, hidden_size=self.hidden_size,
                    intermediate_size=self.intermediate_size,
                    num_attention_heads=self.num_attention_heads)


# The suite ladders: Ettin's six published sizes, and the smoke sizes of the offline suite.
LADDERS = ("ettin", "smoke")

# The one table of sizes. "tiny" and "micro" are the smoke sizes (no published parameter count): tests,
# the offline default run (tiny) and the offline suite's two rungs. They keep every architectural
# feature (global and sliding layers, a window shorter than the sequences it sees).
SIZES: dict[str, Size] = {
    "tiny": Size(num_hidden_layers=4, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                 parameters=None, ladder="smoke", lr=0.0015, weight_decay=0.0001, pretrain_warmup_tokens=20_000,
                 batch_warmup_tokens=0, batch_warmup_min=8, cross_batch_warmup_min=8,
                 micro_batch=MicroBatches(8, 8, 8, 8)),
    "micro": Size(num_hidden_layers=3, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  parameters=None, ladder="smoke", lr=0.003, weight_decay=0.0001, pretrain_warmup_tokens=20_000,
                  batch_warmup_tokens=0, batch_warmup_min=8, cross_batch_warmup_min=8,
                  micro_batch=MicroBatches(8, 8, 8, 8)),
    "17m": Size(num_hidden_layers=7, hidden_size=256, intermediate_size=384, num_attention_heads=4,
                parameters=16_913_600, ladder="ettin", lr=0.003, weight_decay=0.0003,
                pretrain_warmup_tokens=4_000_000_000, batch_warmup_tokens=125_000_000_000,
                batch_warmup_min=576, cross_batch_warmup_min=48,
                micro_batch=MicroBatches(144, 24, 12, 12)),
    "32m": Size(num_hidden_layers=10, hidden_size=384, intermediate_size=576, num_attention_heads=6,
                parameters=32_081_344, ladder="ettin", lr=0.003, weight_decay=0.0003,
                pretrain_warmup_tokens=4_000_000_000, batch_warmup_tokens=100_000_000_000,
                batch_warmup_min=512, cross_batch_warmup_min=48,
                micro_batch=MicroBatches(128, 24, 12, 12)),
    "68m": Size(num_hidden_layers=19, hidden_size=512, intermediate_size=768, num_attention_heads=8,
                parameters=68_457_664, ladder="ettin", lr=0.003, weight_decay=0.0003,
                pretrain_warmup_tokens=3_000_000_000, batch_warmup_tokens=75_000_000_000,
                batch_warmup_min=384, cross_batch_warmup_min=32,
                micro_batch=MicroBatches(96, 18, 8, 8)),
    "150m": Size(num_hidden_layers=22, hidden_size=768, intermediate_size=1152,
                 num_attention_heads=12, parameters=149_655_232, ladder="ettin", lr=0.0008, weight_decay=1e-05,
                 pretrain_warmup_tokens=3_000_000_000, batch_warmup_tokens=50_000_000_000,
                 batch_warmup_min=288, cross_batch_warmup_min=48,
                 micro_batch=MicroBatches(72, 16, 12, 12)),
    "400m": Size(num_hidden_layers=28, hidden_size=1024, intermediate_size=2624,
                 num_attention_heads=16, parameters=395_881_664, ladder="ettin", lr=0.0005, weight_decay=1e-05,
                 pretrain_warmup_tokens=2_000_000_000, batch_warmup_tokens=10_000_000_000,
                 batch_warmup_min=192, cross_batch_warmup_min=16,
                 micro_batch=MicroBatches(48, 6, 2, 4)),
    "1b": Size(num_hidden_layers=28, hidden_size=1792, intermediate_size=3840,
               num_attention_heads=28, parameters=1_031_314_112, ladder="ettin", lr=0.0005, weight_decay=5e-05,
               pretrain_warmup_tokens=2_000_000_000, batch_warmup_tokens=3_000_000_000,
               batch_warmup_min=96, cross_batch_warmup_min=8, micro_batch=MicroBatches(24, 2, 2, 2),
               extension_tokens=83_333_000_000, decay_tokens=16_667_000_000,
               cross_tokens=16_667_000_000, cross_warmup_tokens=1_000_000_000,
               cross_decay_tokens=3_333_000_000, cross_checkpoint_every_tokens=3_333_000_000),
}


def size_row(size: str) -> Size:
    if size not in SIZES:
        raise KeyError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    return SIZES[size]


def size_value(size: str, field: str):
    """A training value of the size table, e.g. ``size_value("1b", "micro_batch.extension")``."""
    value = size_row(size)
    for part in field.split("."):
        if not hasattr(value, part) or callable(getattr(value, part)):
            names = ", ".join(f.name for f in fields(value))
            raise KeyError(f"the size table has no value {field!r} (ettin/model/config.py SIZES; "
                           f"fields: {names})")
        value = getattr(value, part)
    return value


def model_config(size: str, **overrides) -> ModelConfig:
    """The ModelConfig of a named size, with any field overridden."""
    row = size_row(size)
    unknown = set(overrides) - {f.name for f in fields(ModelConfig)}
    if unknown:
        raise TypeError(f"unknown ModelConfig field(s): {', '.join(sorted(unknown))}")
    return replace(ModelConfig(**row.shape()), **overrides)
