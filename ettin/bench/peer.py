"""The peer of every model benchmark: transformers' ModernBERT on the same weights, and the loss check
that proves both sides compute the same thing before anything is timed (python -m ettin.bench model
and python -m ettin.bench gpu)."""

from __future__ import annotations

import torch
from torch import nn

from ettin.model.hub import convert_state_dict, to_hf_config
from ettin.model.modernbert import ModernBert

LOSS_TOLERANCE = 1e-4  # relative, fp32


def peer_model(ours: ModernBert, objective: str, attn: str, sparse_prediction: bool = False) -> nn.Module:
    """transformers' ModernBERT with the same architecture and weights as ``ours``: the config and
    weights our export writes (ettin.model.hub). Its attention is eager when ours is, else sdpa (its
    encoder has no flex path). ``sparse_prediction`` (encoder only): its head runs on labelled rows
    only, as ours; off by default in transformers."""
    import transformers

    causal = objective == "clm"
    raw = to_hf_config(ours.config, causal=causal)  # refuses a decoder transformers 4.x cannot run
    del raw["model_type"]
    attn_implementation = "eager" if attn == "eager" else "sdpa"
    if causal:
        config = transformers.ModernBertDecoderConfig(**raw)
        peer = transformers.ModernBertDecoderForCausalLM._from_config(
            config, attn_implementation=attn_implementation)
    else:
        config = transformers.ModernBertConfig(**{**raw, "sparse_prediction": sparse_prediction})
        peer = transformers.ModernBertForMaskedLM._from_config(config, attn_implementation=attn_implementation)
    state = convert_state_dict(ours.state_dict(), to="decoder" if causal else "encoder")
    missing, unexpected = peer.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"decoder.weight"}:  # decoder.weight: tied to the embeddings
        raise RuntimeError(f"the peer does not fit our weights: missing {missing}, unexpected {unexpected}")
    return peer.float()


def loss_of(model: nn.Module, inputs: dict) -> float:
    with torch.no_grad():
        return float(model(**inputs).loss)


def check_losses(losses: dict[str, float]) -> tuple[float, float]:
    """Largest difference from the peer's loss, and the tolerance; raises when they disagree."""
    reference = losses["transformers"]
    difference = max(abs(value - reference) for value in losses.values())
    tolerance = LOSS_TOLERANCE * max(1.0, abs(reference))
    if not difference <= tolerance:
        raise RuntimeError(f"losses disagree (max difference {difference:.3g} > {tolerance:.3g}): "
                           f"{losses}; the timings would compare different computations")
    return difference, tolerance


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads)"
