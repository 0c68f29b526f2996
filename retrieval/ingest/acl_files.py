"""Per-folder permissions: `.twostage-acl.toml` files in a corpus folder.

Each file maps globs, relative to its own folder, to an ACL; the first glob that matches a
document's path wins, and the nearest file (the document's folder, else its parent's, up to the
corpus root) that has a matching glob applies:

    # handbooks/.twostage-acl.toml
    "eng/*" = ["group:eng"]
    "hr/*" = ["group:hr", "user:carol"]
    "*" = ["public"]

A file that cannot be read, or names an invalid principal, stops the ingest before anything is
written, with one line naming it (a typo must not publish a folder).
"""

import fnmatch
import tomllib
from pathlib import Path, PurePosixPath

from twostage.retrieval.access.principals import parse_acl
from twostage.retrieval.core.errors import InputError

ACL_FILE = ".twostage-acl.toml"


class FolderAcls:
    """The ACL files under a corpus root, read once."""

    def __init__(self, root: Path) -> None:
        self.rules: dict[PurePosixPath, list[tuple[str, tuple[str, ...]]]] = {}
        for path in sorted(root.rglob(ACL_FILE)):
            rel = path.relative_to(root)
            try:
                table = tomllib.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                raise InputError(f"{rel}: not a readable TOML file of glob = [principals]: {exc}") from exc
            self.rules[PurePosixPath(rel.parent.as_posix())] = [
                (glob, parse_acl(acl, f"{rel}: {glob!r}")) for glob, acl in table.items()
            ]

    def acl_for(self, rel: str) -> tuple[str, ...] | None:
        """The ACL of the document at `rel` (relative to the root), or None where no file says."""
        path = PurePosixPath(rel)
        for folder in path.parents:  # nearest first
            for glob, acl in self.rules.get(folder, []):
                if fnmatch.fnmatchcase(path.relative_to(folder).as_posix(), glob):
                    return acl
        return None
