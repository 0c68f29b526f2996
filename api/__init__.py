"""The ways into twostage: `runtime` (the running service), `http` (the FastAPI app), `cli` (the
command line)."""
