"""Small helpers several test files share (imported as `helpers`: pytest puts tests/ on the path)."""

import socket
import subprocess
import sys


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cli(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`twostage ARGS` as a user runs it, in a subprocess, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "twostage.api.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
