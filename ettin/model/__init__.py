"""The model and its formats: ``config`` (ModelConfig and the size table, one row per Ettin size),
``modernbert`` (the plain nn.Module, transformers' weight names, every attention backend), ``flops``,
``hub`` (Hugging Face folders both ways), ``composer`` (orionw/bert24 checkpoints) and ``export``
(a run or checkpoint as a Hugging Face folder, checked by reloading it).

May import: ettin.store; ``export`` also ettin.objectives and ettin.data.tokenizer. Knows nothing of
training.
"""
