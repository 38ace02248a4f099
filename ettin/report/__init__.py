"""What two runs show side by side: ``runs`` (a run directory as data: config, metrics, checkpoints),
``identity`` (the proof that two runs saw the same data in the same order), ``scores`` (evaluation
results as tables), ``plots``, ``pair_report`` (report.md/.html of two runs) and
``suite_report`` (a suite's ladder); the command is ``python -m ettin.compare`` (ettin/compare.py).
The notebooks use these same functions.

May import: ettin.model, ettin.objectives, ettin.data, ettin.optim, ettin.store, ettin.train.config.
"""
