"""Data: the tokenizer, the built-in corpus, preparation into MDS shards (``prepare``: the command;
``shards``: tokenize, chunk, write; ``executor``: the same at scale on datatrove), MDS datasets we did
not prepare (``mds``, ``index``), Ettin's released data order, and the loader (the global sample
order, one optimizer step at a time, validation batches).

May import: ettin.store; nothing of the model or of training.
"""
