"""The ways into twostage: the command line and (later) HTTP."""
