"""Data: tokenizers, the built-in corpus, preparation into MDS shards, collators and the loader."""
