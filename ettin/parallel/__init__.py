"""Applied to the plain model from outside (torchtitan style): ``distributed`` (DDP or FSDP2, the
strategy Lightning uses) and ``speedups`` (per-layer compile, activation checkpointing).

May import: nothing else of ettin.
"""
