"""Who is asking: one `Caller` per request, resolved once at the edge (an HTTP dependency, the CLI,
an MCP session) and passed down; nothing below it reads headers.

`visible_filter` is the one place a caller becomes a store filter: the caller's principals (plus
`public`, and `unassigned` where `access.default` is public) as an `AnyOf` on the `acl` field,
ANDed with the caller's own filter, which the store applies inside recall (dense ANN, BM25 and
both fused), before top-k. Every later stage (rerank, calibration, `min_relevance`, `top_n`)
only sees what recall returned, so it never sees what the caller may not.
"""

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

from twostage.retrieval.access.principals import ACL_FIELD, PUBLIC, UNASSIGNED, check_principals
from twostage.retrieval.core.errors import Forbidden, InputError, Unauthorized
from twostage.retrieval.store.vector_store import AnyOf, Filter

Scope = Literal["search", "feedback", "ingest", "admin"]
SCOPES: tuple[Scope, ...] = ("search", "feedback", "ingest", "admin")
WHAT_SCOPES_ALLOW = {
    "search": "search, rerank and embeddings routes",
    "feedback": "feedback on the key's own searches, their stats",
    "ingest": "documents, their jobs, deletion",
    "admin": "everything: retrain, calibrate, quality, the whole search log, keys",
}


def check_scopes(values: Iterable[str]) -> frozenset[Scope]:
    scopes = frozenset(values)
    unknown = sorted(scopes - set(SCOPES))
    if unknown or not scopes:
        raise InputError(f"unknown scope {', '.join(unknown) or '(none)'}: use {', '.join(SCOPES)}")
    return scopes  # type: ignore[return-value]


@dataclass(frozen=True)
class Caller:
    """A request's identity: its key (None: anonymous), what the key may do (`scopes`), and whose
    documents it sees (`principals`; None: every document, as an admin, or anywhere no key
    carries principals). `collections`: the collections the key may use (None: all)."""

    key: str | None
    scopes: frozenset[Scope]
    principals: frozenset[str] | None
    collections: frozenset[str] | None = None
    delegate: bool = False
    on_behalf_of: str | None = None  # the end user a delegating key searched for (logged)
    open: bool = False  # no key exists at all: a local service, open to reads and feedback as before keys

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    def require(self, scope: Scope) -> None:
        """Refuse a route the caller's scopes do not allow: 401 anonymous, 403 naming the scope."""
        if self.admin or scope in self.scopes:
            return
        if self.open:
            raise Forbidden(f"{scope} routes are disabled: no API key is configured (twostage keys add NAME "
                            f"--scopes {scope}, or TWOSTAGE_API__API_KEYS)")  # fmt: skip
        if self.key is None:
            raise Unauthorized(f"this route needs an API key with the {scope!r} scope")
        raise Forbidden(f"key {self.key!r} lacks the {scope!r} scope ({WHAT_SCOPES_ALLOW[scope]})")

    def require_collection(self, collection: str) -> None:
        if self.collections is not None and not self.admin and collection not in self.collections:
            raise Forbidden(f"key {self.key!r} may not use collection {collection!r}")

    def owns(self, key: str | None) -> bool:
        """Whether a logged search (made with `key`) is this caller's to read or give feedback on."""
        return self.reads_whole_log or (self.key is not None and key == self.key)

    @property
    def reads_whole_log(self) -> bool:
        return self.admin or self.open

    def log_owner(self) -> str | None:
        """Whose searches of the log this caller reads: None for all of them (an admin, an open
        service); a key's own otherwise. Anonymous callers of a service with keys read none (401)."""
        if self.reads_whole_log:
            return None
        if self.key is None:
            raise Unauthorized("the search log is read with an API key: its own searches, or all with admin")
        return self.key

    def acting_for(self, user: str | None, groups: Iterable[str]) -> "Caller":
        """A delegating key's search for an end user: the key's principals narrowed to the user's
        (`user:NAME` and each `group:NAME`), never widened."""
        if not self.delegate:
            raise Forbidden(f"key {self.key!r} may not search on behalf of a user (it was not added with "
                            "--delegate)")  # fmt: skip
        if user is None and not groups:
            raise InputError("on_behalf_of needs a user, groups, or both")
        asked = [f"user:{user}"] if user is not None else []
        asked += [f"group:{g}" for g in groups]
        theirs = frozenset(check_principals(asked, "on_behalf_of principal"))
        mine = self.principals if self.principals is not None else theirs  # an admin key: the user's own
        return replace(self, scopes=self.scopes - {"admin"}, principals=mine & theirs,
                       on_behalf_of=user or ",".join(sorted(groups)))  # fmt: skip


# the data directory's own user: a CLI command on the store itself (no server), who holds every key
OPERATOR = Caller(key=None, scopes=frozenset({"admin"}), principals=None)


def visible_filter(caller: Caller, user_filter: Filter | None, default_public: bool) -> Filter | None:
    """The caller's filter with the permission condition ANDed in (the caller's own is unchanged
    for a caller who sees everything). The one function every search path calls."""
    if caller.principals is None:
        return user_filter
    allowed = set(caller.principals) | {PUBLIC} | ({UNASSIGNED} if default_public else set())
    condition = AnyOf(ACL_FIELD, tuple(sorted(allowed)))
    if user_filter is None:
        return Filter(must=(condition,))
    return Filter(must=(*user_filter.must, condition), must_not=user_filter.must_not)
