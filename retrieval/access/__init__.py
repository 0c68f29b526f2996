"""Who may see what: principals and document ACLs (`principals.py`), the caller of a request and
the one function that turns it into a store filter (`caller.py`), hashed API keys with scopes
(`keys.py`). Above the store (filters are its types), below ingest and search (which use both)."""
