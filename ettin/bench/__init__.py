"""Benchmarks, each against a peer measured in the same run and reported as a ratio (never a timed
test): ``model`` (a training step vs transformers), ``data`` (preparation vs ``datasets.map``), ``gpu``
(every fast path at Ettin's shapes, one bounded run: benchmarks/gpu.sh), and ``peer`` (the transformers
model on the same weights, and the loss check both benches run first).

May import: everything below it (model, objectives, data, optim, train.step, parallel); nothing imports
bench except tests.
"""
