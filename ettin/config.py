"""Model configuration and the one table of Ettin sizes.

Every size is a row of ``SIZES``; everything else (encoder or decoder, phase, dropout used in
training) is composed on top by the recipes. Field names follow transformers' ModernBertConfig where
one exists, so the Hugging Face mapping in ``ettin.hub`` reads at a glance.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

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


# One row per size: (layers, hidden, GLU intermediate, heads). Head dim is 64 for every Ettin size.
# "tiny" is for tests and the offline default run; it keeps every architectural feature (global and
# sliding layers, a window shorter than the sequences it sees).
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(num_hidden_layers=4, hidden_size=64, intermediate_size=96, num_attention_heads=4),
    "17m": dict(num_hidden_layers=7, hidden_size=256, intermediate_size=384, num_attention_heads=4),
    "32m": dict(num_hidden_layers=10, hidden_size=384, intermediate_size=576, num_attention_heads=6),
    "68m": dict(num_hidden_layers=19, hidden_size=512, intermediate_size=768, num_attention_heads=8),
    "150m": dict(num_hidden_layers=22, hidden_size=768, intermediate_size=1152, num_attention_heads=12),
    "400m": dict(num_hidden_layers=28, hidden_size=1024, intermediate_size=2624, num_attention_heads=16),
    "1b": dict(num_hidden_layers=28, hidden_size=1792, intermediate_size=3840, num_attention_heads=28),
}


def model_config(size: str, **overrides) -> ModelConfig:
    """The ModelConfig of a named size, with any field overridden."""
    if size not in SIZES:
        raise KeyError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    unknown = set(overrides) - {f.name for f in fields(ModelConfig)}
    if unknown:
        raise TypeError(f"unknown ModelConfig field(s): {', '.join(sorted(unknown))}")
    return replace(ModelConfig(**SIZES[size]), **overrides)
