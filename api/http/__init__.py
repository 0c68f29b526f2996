"""The HTTP service: the FastAPI app, its routes, wire schemas and error table, and running it in-process."""
