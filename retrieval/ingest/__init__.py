"""The ingest path: documents read, cut into token windows, embedded and written, idempotently."""
