"""Running the HTTP service in this process: bind first, load, then serve until a signal.

Used by `twostage serve` and `twostage quickstart`. The port is bound before any model
loads, so a port in use is reported at once, in one line, instead of after a minute of
loading (and the socket handed to uvicorn leaves no window for another process to take
it). While serving, `DATA/server.json` says where this store's server listens, so
`twostage search` goes through it instead of opening the store a second time.
"""

import contextlib
import errno
import json
import logging
import os
import socket
import sys
from typing import Any

from twostage.api.settings import Settings
from twostage.retrieval.access.caller import OPERATOR
from twostage.retrieval.access.keys import KeyRing
from twostage.retrieval.core.errors import InputError, Unauthorized

SERVER_FILE = "server.json"


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, or a one-line error naming the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise InputError(
                f"port {port} on {host} is in use (another twostage serve?): "
                "stop it, or pick another port with --port or TWOSTAGE_API__PORT"
            ) from None
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def public_url(host: str, port: int) -> str:
    """The URL a client on this machine uses (a wildcard bind is reached through loopback)."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)
    return f"http://{shown}:{port}"


CLI_KEY_FILE = "cli.key"  # the data directory's own admin key, for the CLI on it (owner-only)


def api_key(given: str | None, settings: Settings) -> str | None:
    """The key the CLI sends: `--api-key`, else $TWOSTAGE_API_KEY, else this data directory's own
    admin key (`DATA/cli.key`, the one quickstart made), else the first of `api.api_keys`."""
    if given or os.environ.get("TWOSTAGE_API_KEY"):
        return given or os.environ.get("TWOSTAGE_API_KEY")
    try:
        return (settings.data_dir / CLI_KEY_FILE).read_text().strip() or None
    except OSError:
        keys = settings.api.api_keys
        return keys[0].get_secret_value() if keys else None


def data_dir_key(settings: Settings) -> str:
    """This data directory's own admin key: the saved one while the server still takes it, else a
    new one made with `KeyRing.add` (as `twostage keys add quickstart --scopes admin` would) and
    saved for the CLI (owner-only). Printed by quickstart; clients send it as a bearer token."""
    ring = KeyRing(settings.data_dir)
    path = settings.data_dir / CLI_KEY_FILE
    try:
        saved = path.read_text().strip()
        if saved and ring.caller(saved, OPERATOR).admin:
            return saved
    except (OSError, Unauthorized):
        pass
    name = next(n for n in (f"quickstart{'' if i == 0 else f'-{i}'}" for i in range(1000))
                if all(row["name"] != n for row in ring.listed()))  # fmt: skip
    key: str = ring.add(name, ["admin"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(key + "\n")
    return key


def running_server(settings: Settings) -> str | None:
    """The URL of a live server that holds this data directory's store, if one does."""
    try:
        info = json.loads((settings.data_dir / SERVER_FILE).read_text())
        pid, url = int(info["pid"]), str(info["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # left by a server that died
    except PermissionError:
        pass  # alive, another user's
    return url


def serve(settings: Settings, sock: socket.socket, *, announce: list[str] | None = None) -> None:
    """Load the models and the store, then serve on `sock` until SIGINT/SIGTERM."""
    import uvicorn

    from twostage.api.http.app import create_app
    from twostage.api.runtime.service import Service

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    url = public_url(settings.api.host, sock.getsockname()[1])
    service = Service(settings)
    service.start()  # model and store errors surface here as one line, before serving
    if service.load_error:
        print(f"twostage: warning: {service.load_error}", file=sys.stderr)
    marker = settings.data_dir / SERVER_FILE
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"pid": os.getpid(), "url": url}))
    for line in announce or [f"twostage: serving {settings.collection} on {url} (docs at {url}/docs)"]:
        print(line, file=sys.stderr, flush=True)
    config: Any = uvicorn.Config(
        create_app(settings, service),
        access_log=False,
        timeout_graceful_shutdown=settings.api.shutdown_timeout_s,
    )
    try:  # Ctrl-C ends the process at once until the app's lifespan hands it to uvicorn (a drain)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        with contextlib.suppress(OSError):
            if json.loads(marker.read_text()).get("pid") == os.getpid():
                marker.unlink()
