"""Speed switches applied from outside the model: per-layer (regional) compilation and activation
checkpointing. No Lightning or config system here: training and the GPU bench use the same code."""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


def apply_speedups(model: torch.nn.Module, *, compile: bool, activation_checkpointing: bool,
                   backend: str = "inductor") -> None:
    """Per-layer activation checkpointing and ``torch.compile`` (``backend``), keeping the state-dict
    keys unchanged (no wrapper modules)."""
    if compile:
        import torch._dynamo

        # Layers share one code object: layer kinds x layouts x static/dynamic shapes are separate
        # graphs, and past Dynamo's default limit of 8 the rest would silently run uncompiled.
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))
    for layer in model.model.layers:
        if activation_checkpointing:
            layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
        if compile:
            layer.compile(backend=backend)
