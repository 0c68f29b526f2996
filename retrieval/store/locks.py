"""Crash-safe files shared by the embedded store and the model registry.

`write_json_atomic` gives readers the old file or the new one, never a torn one (temp file,
fsync, rename, fsync of the directory). `PidLock` is an exclusive, non-blocking `flock` with
the owner's pid inside: the kernel drops it when the owner dies, even by `kill -9`, so there
are no stale locks, and a second process is told who holds it.
"""

import fcntl
import json
import os
from pathlib import Path
from typing import Any, Protocol

from twostage.retrieval.store.vector_store import StoreLockedError


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class PidLock:
    """An exclusive, non-blocking flock on `path`; `busy` formats the refusal (gets the pid)."""

    def __init__(self, path: Path, busy: str) -> None:
        self.path = path
        self.busy = busy
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreLockedError(self.busy.format(pid=owner)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "PidLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Lock(Protocol):
    """An exclusive lock taken without waiting: `acquire` raises `StoreLockedError` naming the holder."""

    def acquire(self) -> None: ...

    def release(self) -> None: ...

    def __enter__(self) -> "Lock": ...

    def __exit__(self, *exc: object) -> None: ...


class Locks(Protocol):
    """Where coordination locks live: files in the data directory (`FileLocks`), or the shared
    database (`retrieval.traffic.coordination.DatabaseLocks`) for replicas without one."""

    def lock(self, name: str, busy: str) -> Lock:
        """The lock called `name` (a relative path: `NAME/retrain`); `busy` formats a refusal."""
        ...


class FileLocks:
    """`PidLock`s under `root`: `name` is the lock file's path below it, less `.lock`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def lock(self, name: str, busy: str) -> PidLock:
        path = self.root / f"{name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return PidLock(path, busy)
