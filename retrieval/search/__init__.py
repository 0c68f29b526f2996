"""The search path: a query planned, recalled (dense, BM25 or both), reranked where trusted."""
