"""Progress bars become rate-limited log lines when stderr is not a terminal."""

import io
import time

from tqdm import tqdm

from twostage.retrieval.core.progress import LineProgressStream


def test_tqdm_redraws_become_lines_at_most_once_per_interval() -> None:
    log = io.StringIO()
    stream = LineProgressStream(log, interval_s=0.2)
    stream.write("a plain line\n")
    for _ in tqdm(range(50), desc="embed 50 documents", file=stream, mininterval=0):
        time.sleep(0.01)  # 0.5 s in all: about three lines, not fifty redraws
    lines = log.getvalue().splitlines()
    assert lines[0] == "a plain line" and "\r" not in log.getvalue()
    bars = [ln for ln in lines[1:] if ln.startswith("embed 50 documents")]
    assert len(bars) == len(lines) - 1 and 2 <= len(bars) <= 6, lines
    assert "50/50" in bars[-1] and "100%" in bars[-1]  # the final state is always written
    assert stream.isatty() is False
