"""The optimizer and the token clock: ``stable_adamw`` (StableAdamW, parameter groups, gradient norm)
and ``schedule`` (LR schedules and batch-size warmup as functions of the phase's tokens).

May import: nothing else of ettin.
"""
