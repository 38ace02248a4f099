"""Training: ``config`` (the typed config schema and recipe composition), ``cli`` (python -m
ettin.train), ``run`` (a whole run, a pair), ``start`` (resume, init, scratch), ``phase`` (one phase's
parts and trainer), ``module`` (the one LightningModule), ``step`` (one optimizer step, no
Lightning), ``callbacks`` (checkpoints and validation at token intervals, progress), ``loggers``
(metrics.csv, wandb), ``checkpoint`` (what a checkpoint holds, StartState), ``preemption`` and
``topology`` (inside a Slurm job), ``environment`` (ranks, devices, threads, log).

May import: ettin.model, ettin.objectives, ettin.data, ettin.optim, ettin.parallel, ettin.store, and
ettin.evaluation / ettin.report for a pair's report (in ``run`` only).
"""
