"""API keys with scopes and principals, kept as hashes in the data directory (`DATA/keys.json`).

A key is 32 random bytes (`ts_` + URL-safe base64), shown once when it is made; the file keeps its
SHA-256 only, which is enough for keys of that entropy (no dictionary to attack) and lets a check
hash the presented key once and compare it with every stored hash in constant time. Changes go
through a lock file (`keys.lock`) and an atomic rename, so `twostage keys add/revoke` and a
server recording `last_used` never lose each other's writes; a running server re-reads the file
when its modification time changes (checked at most every `RELOAD_S`), so a revoked key stops
working within a second, without a restart.

`TWOSTAGE_API__API_KEYS` (the configured keys) keep working as admin keys named `config-1`, ...
"""

import fcntl
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from twostage.retrieval.access.caller import SCOPES, Caller, Scope, check_scopes
from twostage.retrieval.access.principals import check_principals
from twostage.retrieval.core.errors import InputError, NotFound, Unauthorized
from twostage.retrieval.store.vector_store import check_collection_name, now_iso

KEYS_FILE = "keys.json"
RELOAD_S = 0.5  # a server re-reads the file at most this often (a revoked key: < 1 s)
LAST_USED_EVERY_S = 60.0  # how often a key's last use is written back
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class StoredKey:
    """One key as the file keeps it: never the key itself."""

    name: str
    hash: str
    scopes: tuple[Scope, ...]
    principals: tuple[str, ...] = ()
    collections: tuple[str, ...] | None = None
    delegate: bool = False
    created: str = field(default_factory=now_iso)
    last_used: str | None = None

    def caller(self) -> Caller:
        return Caller(
            key=self.name, scopes=frozenset(self.scopes),
            principals=None if "admin" in self.scopes else frozenset(self.principals),
            collections=None if self.collections is None else frozenset(self.collections),
            delegate=self.delegate,
        )  # fmt: skip

    def listed(self) -> dict[str, Any]:
        """What `twostage keys list` shows: everything but the hash."""
        return {k: v for k, v in asdict(self).items() if k != "hash"}


class KeyRing:
    """The data directory's keys, plus the configured ones (admin). One owner per process; its
    cache of the file is replaced whole under `_lock`, so a check never sees half a reload."""

    def __init__(self, data_dir: Path, configured: Sequence[str] = ()) -> None:
        self.path = data_dir / KEYS_FILE
        self._configured = [
            StoredKey(f"config-{i}", key_hash(k), ("admin",), created="(configured)")
            for i, k in enumerate(configured, start=1)
        ]
        self._lock = threading.Lock()
        self._keys: list[StoredKey] = []
        self._mtime: float | None = None
        self._checked = 0.0
        self._written: dict[str, float] = {}  # key name -> when its last use was last written

    # -- the file --------------------------------------------------------------------------

    @contextmanager
    def _locked_file(self) -> Iterator[list[StoredKey]]:
        """The stored keys under the lock file, for a read-modify-write; written back atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            keys = self._read()
            before = list(keys)
            yield keys
            if keys != before:
                partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
                partial.write_text(json.dumps({"keys": [asdict(k) for k in keys]}, indent=1))
                partial.chmod(0o600)
                partial.replace(self.path)

    def _read(self) -> list[StoredKey]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise InputError(f"the key file {KEYS_FILE} in the data directory cannot be read: {exc}") from exc
        keys = []
        for entry in data.get("keys", []):
            entry["scopes"] = tuple(entry["scopes"])
            entry["principals"] = tuple(entry.get("principals") or ())
            if entry.get("collections") is not None:
                entry["collections"] = tuple(entry["collections"])
            keys.append(StoredKey(**entry))
        return keys

    def _current(self) -> list[StoredKey]:
        """The stored keys, re-read when the file changed (checked at most every RELOAD_S)."""
        now = time.monotonic()
        with self._lock:
            if now - self._checked < RELOAD_S and self._mtime is not None:
                return self._keys
            self._checked = now
            try:
                mtime: float | None = self.path.stat().st_mtime_ns / 1e9
            except FileNotFoundError:
                mtime = None
            if mtime != self._mtime or mtime is None:
                self._keys = self._read() if mtime is not None else []
                self._mtime = mtime if mtime is not None else 0.0
            return self._keys

    # -- what the CLI does -----------------------------------------------------------------

    def add(
        self,
        name: str,
        scopes: Sequence[str],
        principals: Sequence[str] = (),
        collections: Sequence[str] | None = None,
        delegate: bool = False,
    ) -> str:
        """Make a key; returns it (the only time it is seen: the file keeps its hash)."""
        if not name or len(name) > 64 or not set(name) <= _NAME_CHARS or name.startswith("config-"):
            raise InputError(f"invalid key name {name!r}: 1-64 letters, digits or ._- (not config-N)")
        checked = check_scopes(scopes)
        stored = StoredKey(
            name, "", tuple(s for s in SCOPES if s in checked), check_principals(principals),
            None if collections is None else tuple(check_collection_name(c) for c in collections), delegate,
        )  # fmt: skip
        key = "ts_" + secrets.token_urlsafe(32)
        with self._locked_file() as keys:
            if any(k.name == name for k in keys):
                raise InputError(f"a key named {name!r} exists; revoke it first or choose another name")
            keys.append(replace(stored, hash=key_hash(key)))
        return key

    def revoke(self, name: str) -> None:
        with self._locked_file() as keys:
            kept = [k for k in keys if k.name != name]
            if len(kept) == len(keys):
                raise NotFound(f"no key named {name!r} (twostage keys list shows them)")
            keys[:] = kept

    def listed(self) -> list[dict[str, Any]]:
        stored = self._read()
        return [k.listed() for k in (*self._configured, *stored)]

    # -- what a request does ---------------------------------------------------------------

    def any_keys(self) -> bool:
        return bool(self._configured) or bool(self._current())

    @property
    def restricted(self) -> bool:
        """Whether any key carries principals: then documents are filtered by their ACLs."""
        return any(k.principals for k in self._current())

    def caller(self, presented: str | None, anonymous: Caller) -> Caller:
        """The caller a request's bearer key makes: `anonymous` without one; 401 for a key that is
        unknown or revoked. Every stored hash is compared (no early exit), in constant time."""
        if presented is None:
            return anonymous
        found = self._find(key_hash(presented).encode())
        if found is None:  # a key made a moment ago: look at the file once more before refusing
            with self._lock:
                self._checked = 0.0
            found = self._find(key_hash(presented).encode())
        if found is None:
            raise Unauthorized("unknown or revoked API key")
        self._note_use(found)
        caller = found.caller()
        # until some key carries principals, no document is filtered (as before keys had any)
        return caller if self.restricted else replace(caller, principals=None)

    def _find(self, digest: bytes) -> StoredKey | None:
        found = None
        for stored in (*self._configured, *self._current()):
            if hmac.compare_digest(digest, stored.hash.encode()) and found is None:
                found = stored
        return found

    def _note_use(self, stored: StoredKey) -> None:
        """Write the key's last use to the file, at most every LAST_USED_EVERY_S per key."""
        if stored.name.startswith("config-"):
            return
        now = time.time()
        if now - self._written.get(stored.name, 0.0) < LAST_USED_EVERY_S:
            return
        self._written[stored.name] = now
        used = now_iso()
        try:
            with self._locked_file() as keys:
                keys[:] = [replace(k, last_used=used) if k.name == stored.name else k for k in keys]
        except OSError:
            pass  # a read-only data directory: last use is a convenience, not worth failing a request
