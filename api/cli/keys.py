"""`twostage keys add|list|revoke`: API keys with scopes and principals, in the data directory.

The key is printed once, by `add`; the data directory keeps its hash only (`retrieval.access.keys`).
A running server picks up a change within a second. Managing keys needs the data directory itself:
whoever can write it is its admin.
"""

import argparse
import json
from typing import Any

from twostage.retrieval.access.caller import SCOPES, WHAT_SCOPES_ALLOW


def _ring() -> Any:
    from twostage.api.settings import Settings
    from twostage.retrieval.access.keys import KeyRing

    settings = Settings()
    return KeyRing(settings.data_dir, [k.get_secret_value() for k in settings.api.api_keys])


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _add(args: argparse.Namespace) -> int:
    collections = _split(args.collections) if args.collections else None
    key = _ring().add(args.name, _split(args.scopes), _split(args.principals), collections, args.delegate)
    print(key)
    return 0


def _list(args: argparse.Namespace) -> int:
    rows = _ring().listed()
    if args.json:
        print(json.dumps(rows))
        return 0
    for row in rows:
        principals = ",".join(row["principals"]) or "-"
        collections = ",".join(row["collections"]) if row["collections"] is not None else "all"
        print(f"{row['name']}\tscopes={','.join(row['scopes'])}\tprincipals={principals}\t"
              f"collections={collections}\tdelegate={str(row['delegate']).lower()}\t"
              f"created={row['created']}\tlast_used={row['last_used'] or 'never'}")  # fmt: skip
    return 0


def _revoke(args: argparse.Namespace) -> int:
    _ring().revoke(args.name)
    print(f"revoked {args.name}")
    return 0


def add_keys_commands(commands: Any) -> None:
    keys = commands.add_parser(
        "keys", help="API keys: scopes (what a key may do), principals (whose documents)"
    )
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="make a key and print it (once: only its hash is kept)")
    add.add_argument("name", help="the key's name (1-64 letters, digits or ._-), shown in the search log")
    add.add_argument(
        "--scopes", required=True,
        help="comma-separated: " + "; ".join(f"{s} ({WHAT_SCOPES_ALLOW[s]})" for s in SCOPES),
    )  # fmt: skip
    add.add_argument(
        "--principals", help="comma-separated user:NAME, group:NAME, tenant:NAME: the documents it sees "
        "(once any key has principals, documents are filtered by their ACLs)",
    )  # fmt: skip
    add.add_argument("--collections", help="comma-separated collections it may use (default: all)")
    add.add_argument(
        "--delegate", action="store_true",
        help="it may search on_behalf_of an end user (seeing only what both may see)",
    )  # fmt: skip
    add.set_defaults(handler=_add)
    listed = actions.add_parser("list", help="names, scopes, principals, created, last used (never the keys)")
    listed.add_argument("--json", action="store_true")
    listed.set_defaults(handler=_list)
    revoke = actions.add_parser(
        "revoke", help="delete a key (a running server stops taking it within a second)"
    )
    revoke.add_argument("name")
    revoke.set_defaults(handler=_revoke)
