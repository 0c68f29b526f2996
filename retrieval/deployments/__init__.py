"""Deployments: which (collection version, embedder, reranker) serves, its history and how it changes.

`registry.py` keeps the records, `lifecycle.py` changes what is served (switch, rollback, canary
start and settlement), `canary.py` is the canary's logic, `follower.py` serves what the registry says.
"""
