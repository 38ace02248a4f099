"""What two runs show side by side: ``runs`` (a run directory as data: config, metrics, checkpoints),
``identity`` (the proof that two runs saw the same data in the same order), ``scores`` (evaluation
results as tables), ``plots`` and ``cli`` (python -m ettin.compare: report.md/.html).
The notebooks use these same functions.

May import: ettin.model, ettin.objectives, ettin.data, ettin.optim, ettin.store, ettin.train.config.
"""
