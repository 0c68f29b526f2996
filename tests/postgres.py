"""A real PostgreSQL server for the tests, started from Debian's `postgresql` package.

PostgreSQL refuses to run as root, so as root the cluster is initialised and run as the
`postgres` user (the package's) in a temporary directory it owns; otherwise as the current user.
Unix sockets stay in that directory and TCP listens on a free loopback port. `fsync=off`: these
tests kill clients, never the server, so the server's own crash safety is not what they test,
and a commit then costs no disk flush (the benches turn it on). One server per test process (per xdist worker), a fresh
database per test.
"""

import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from helpers import free_port


def _bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise RuntimeError("PostgreSQL's server is not installed (Debian: apt-get install postgresql); "
                       "the log's tests run on it as well as on SQLite")  # fmt: skip


def _as_server_user(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@dataclass
class PostgresServer:
    root: Path
    port: int
    bin: Path
    fsync: bool = False

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://twostage@127.0.0.1:{self.port}/postgres"

    def new_database(self) -> str:
        """A fresh, empty database on this server; its URL."""
        from sqlalchemy import create_engine, text

        name = f"t_{uuid.uuid4().hex[:12]}"
        engine = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as db:
            db.execute(text(f"CREATE DATABASE {name}"))
        engine.dispose()
        return f"postgresql+psycopg://twostage@127.0.0.1:{self.port}/{name}"

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(_as_server_user([str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-m", mode,
                                        "-w", "stop"]), capture_output=True, timeout=60)  # fmt: skip

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync={'on' if self.fsync else 'off'}"
        started = subprocess.run(
            _as_server_user([str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-o", options,
                             "-l", str(self.root / "server.log"), "-w", "-t", "60", "start"]),
            capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        if started.returncode != 0:
            log = (self.root / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"PostgreSQL did not start: {started.stderr.strip()}\n{log}")


def start_postgres(fsync: bool = False) -> PostgresServer:
    """Initialise a cluster in a new temporary directory and start it (trust auth, loopback only;
    `fsync`: flush commits to disk, as a production server does: the benches' setting)."""
    bin_dir = _bin_dir()
    root = Path(tempfile.mkdtemp(prefix="twostage-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    os.chmod(root, 0o700)
    subprocess.run(_as_server_user([str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", "twostage",
                                    "-A", "trust", "--no-sync", "-E", "UTF8"]),
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    server = PostgresServer(root, free_port(), bin_dir, fsync)
    server.start()
    deadline = time.monotonic() + 30
    while subprocess.run([str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(server.port)],
                         capture_output=True).returncode != 0:  # fmt: skip
        if time.monotonic() > deadline:
            raise RuntimeError("PostgreSQL did not accept connections within 30 s")
        time.sleep(0.1)
    return server


def remove(server: PostgresServer) -> None:
    server.stop("immediate")
    shutil.rmtree(server.root, ignore_errors=True)
