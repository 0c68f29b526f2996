"""Embedders and rerankers: the Protocols, one family per module, loading, numerics, tokenizers."""
