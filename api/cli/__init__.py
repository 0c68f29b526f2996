"""The `twostage` command line: one module per group of commands, plus the client for a running server."""
