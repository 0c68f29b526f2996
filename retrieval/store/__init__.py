"""Vector stores: the `VectorStore` Protocol, Qdrant Edge (embedded) and Qdrant (server), collections."""
