"""Training: ``config`` (the typed config schema and recipe composition), ``plan`` (a phase
resolved once into its ``PhasePlan``), ``run`` (a whole run, a pair), ``start`` (resume, init,
scratch), ``phase`` (one phase's parts and trainer, from its plan), ``module`` (the one
LightningModule), ``step`` (one optimizer step, no Lightning), ``callbacks`` (checkpoints and
validation at token intervals, progress), ``loggers`` (metrics.csv, wandb), ``checkpoint`` (what a
checkpoint holds, StartState), ``preemption`` and ``topology`` (inside a Slurm job), ``environment``
(ranks, devices, threads, log).

The command ``python -m ettin.train`` is ettin/train_command.py (it also drives ettin.cluster for
sweeps and ettin.evaluation / ettin.report for a pair's report, so it sits above them all).

May import: ettin.model, ettin.objectives, ettin.data, ettin.optim, ettin.parallel, ettin.store.
"""
