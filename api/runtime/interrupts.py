"""Ctrl-C that ends a command at once, even while its main thread is inside one long native call.

Python runs a signal's handler in the main thread, between bytecodes. A command whose main
thread is inside one forward pass (a batch of 16,000 tokens takes half a minute on one slow
AVX2 core, longer when the machine is busy) or blocked on a lock another thread holds only
sees the KeyboardInterrupt when that call returns. So while a command works (ingest, loading,
training), a watcher thread waits on the interpreter's signal wakeup fd (`signal.set_wakeup_fd`:
the C-level handler writes the signal number there at once, whichever thread it interrupted)
and ends the process on SIGINT, as the main thread would (message, exit status 130).

Work needs no cleanup to be safe to stop: ingestion and retrain are idempotent and survive
`kill -9` (their tests), the embedded store's lock is an flock the kernel drops.

A server is different: there Ctrl-C means a graceful drain, which uvicorn does, so the app's
lifespan hands SIGINT back (`graceful`) once uvicorn's handlers are in place; until then (the
models loading, uvicorn and asyncio starting) the watcher ends the process, so there is no
moment at which a Ctrl-C is nobody's to handle. Signals belong to the process, so the watcher
is one per process, kept here.
"""

import os
import signal
import sys
import threading
from typing import NoReturn

_lock = threading.Lock()
_watcher: "_Watcher | None" = None
_exiting = threading.Lock()


def interrupted() -> NoReturn:
    """Say so and end the process now (exit status 130, as a shell reports Ctrl-C); once."""
    _exiting.acquire()  # a second caller (the main thread's KeyboardInterrupt) waits for the exit
    print("twostage: interrupted", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


class _Watcher:
    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)  # the C handler must never block on a full pipe
        self._stopped = threading.Event()
        self._previous = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="ctrl-c", daemon=True).start()

    def _watch(self) -> None:
        while True:
            signals = os.read(self._read, 64)
            if self._stopped.is_set():
                return
            if signal.SIGINT in signals:
                interrupted()

    def stop(self) -> None:
        self._stopped.set()
        signal.set_wakeup_fd(self._previous)
        os.write(self._write, b"\0")  # wakes the watcher, which sees it is stopped


def exit_at_once() -> None:
    """From now on SIGINT ends the process at once (main thread only: where the interpreter
    allows setting the wakeup fd)."""
    global _watcher
    if threading.current_thread() is not threading.main_thread():
        return
    with _lock:
        if _watcher is None:
            _watcher = _Watcher()


def graceful() -> None:
    """Hand SIGINT back to the main thread's handlers (a server's graceful shutdown)."""
    global _watcher
    with _lock:
        if _watcher is not None:
            _watcher.stop()
            _watcher = None
