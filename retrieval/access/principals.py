"""Principals (who a key speaks for) and document ACLs (who may see a document), as plain strings.

A principal is `kind:name`: `user:alice`, `group:eng`, `tenant:acme`. Names are 1-128 characters
of letters, digits and `._@+-`: no wildcard (`*`, `?`), no space, no control character, so a
principal only ever matches itself, in the store's exact keyword match. A document's ACL lists
principals, or `public` (everyone, anonymous callers too). Every chunk stores its document's ACL
in the payload field `acl`; a document ingested without one stores `unassigned`, which
`access.default` decides at search time (public, or admins only), so changing that setting needs
no re-ingest.
"""

import re
from collections.abc import Iterable

from twostage.retrieval.core.errors import InputError

ACL_FIELD = "acl"  # the payload field: a list of principals (keyword index; tenants: is_tenant)
PUBLIC = "public"  # in an ACL: everyone may see the document
UNASSIGNED = "unassigned"  # stored for a document without an ACL; `access.default` decides
KINDS = ("user", "group", "tenant")
_PRINCIPAL = re.compile(r"(user|group|tenant):[A-Za-z0-9._@+-]{1,128}")  # fullmatch: no trailing newline
MAX_PRINCIPALS = 256


def check_principal(value: object, what: str = "principal") -> str:
    """`value` when it is a well-formed principal, else an `InputError` saying what is wrong."""
    if not isinstance(value, str) or not _PRINCIPAL.fullmatch(value):
        shown = repr(value)[:80]
        raise InputError(
            f"invalid {what} {shown}: use user:NAME, group:NAME or tenant:NAME, the name 1-128 letters, "
            "digits or ._@+- (no wildcards, spaces or control characters)"
        )
    return value


def check_principals(values: Iterable[object], what: str = "principal") -> tuple[str, ...]:
    """Well-formed, distinct principals in a fixed order."""
    checked = sorted({check_principal(v, what) for v in values})
    if len(checked) > MAX_PRINCIPALS:
        raise InputError(f"too many {what}s ({len(checked)}); at most {MAX_PRINCIPALS}")
    return tuple(checked)


def parse_acl(values: object, where: str = "acl") -> tuple[str, ...]:
    """A document's ACL: principals, or `public`. An empty list is refused (it would hide the
    document from everyone but admins; leave the ACL out to let `access.default` decide)."""
    if isinstance(values, str):
        values = [v.strip() for v in values.split(",") if v.strip()]
    if not isinstance(values, list | tuple) or not values:
        raise InputError(f"{where}: a non-empty list of principals (user:NAME, group:NAME, tenant:NAME) or "
                         f"'{PUBLIC}'")  # fmt: skip
    if PUBLIC in values:
        if len(values) > 1:
            raise InputError(f"{where}: '{PUBLIC}' stands alone (everyone may see the document)")
        return (PUBLIC,)
    return check_principals(values, f"{where} principal")


def stored_acl(acl: tuple[str, ...] | None) -> list[str]:
    """What a chunk's payload holds for its document's ACL."""
    return list(acl) if acl else [UNASSIGNED]
