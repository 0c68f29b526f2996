"""Progress of long steps: a tqdm bar on a terminal, a plain line every few seconds in a log.

tqdm redraws its bar in place with carriage returns, which in a log file (or a CI pipe)
becomes one endless line. `lines_when_not_a_tty` wraps stderr so that every bar in the
process (ours, sentence-transformers' encode during mining, the trainers') is written as
ordinary lines instead: the latest state at most once per interval, and the final state
when the bar closes. On a terminal nothing changes.
"""

import re
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

T = TypeVar("T")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class LineProgressStream:
    """A text stream that turns tqdm's carriage-return redraws into rate-limited lines."""

    def __init__(self, inner: TextIO, interval_s: float) -> None:
        self.inner = inner
        self.interval_s = interval_s
        self._last_emit = 0.0
        self._pending: str | None = None
        self._in_bar = False  # the last write was a redraw: its closing newline is ours to drop

    def write(self, text: str) -> int:
        if "\r" not in text:
            if self._in_bar and text.startswith("\n"):  # a bar closing: its final state, as a line
                if self._pending is not None:
                    self._emit(self._pending)
                text = text[1:]
            self._in_bar = False
            return self.inner.write(text) if text else 0
        head, *redraws = text.split("\r")
        if head:
            self.inner.write(head)
        self._in_bar = not text.endswith("\n")
        states = [_ANSI.sub("", r).strip() for r in redraws]
        latest = next((s for s in reversed(states) if s), None)
        if latest is not None:
            now = time.monotonic()
            if now - self._last_emit >= self.interval_s:
                self._emit(latest)
                self._last_emit = now
            else:
                self._pending = latest
        if text.endswith("\n") and self._pending is not None:  # closed with its final state
            self._emit(self._pending)
        return len(text)

    def _emit(self, line: str) -> None:
        self.inner.write(line + "\n")
        self.inner.flush()
        self._pending = None

    def flush(self) -> None:
        self.inner.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:  # fileno, encoding, errors...: the real stream's
        return getattr(self.inner, name)


def lines_when_not_a_tty(interval_s: float) -> None:
    """Make every progress bar of this process log lines when stderr is not a terminal."""
    if not sys.stderr.isatty() and not isinstance(sys.stderr, LineProgressStream):
        sys.stderr = LineProgressStream(sys.stderr, interval_s)


def progress(items: Iterable[T], *, total: int | None = None, desc: str, unit: str = "it") -> Iterator[T]:
    """`items` with a bar on stderr (see the module docstring for logs)."""
    from tqdm import tqdm

    yield from tqdm(items, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
