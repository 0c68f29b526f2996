"""Small helpers several test files share (imported as `helpers`: pytest puts tests/ on the path)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from twostage.api.http.app import create_app
from twostage.api.runtime.service import Service
from twostage.api.settings import Settings
from twostage.retrieval.ingest.chunker import Chunker
from twostage.retrieval.ingest.documents import Document
from twostage.retrieval.ingest.pipeline import ingest_corpus
from twostage.retrieval.models.loading import load_embedder
from twostage.retrieval.models.numerics.cpu import FEATURES_ENV
from twostage.retrieval.models.tiny import TinyModelPaths
from twostage.retrieval.models.tokens import Qwen3Tokens
from twostage.retrieval.store.collections import open_store

DEBIAN_IR = Path(__file__).resolve().parents[2] / "shared" / "data" / "debian-ir"  # the shared data set


def debian_rows(name: str, n: int) -> list[dict[str, Any]]:
    """The first `n` records of a debian-ir file (`train.jsonl`, `dev.jsonl`, `corpus.jsonl`)."""
    with (DEBIAN_IR / name).open() as handle:
        return [json.loads(next(handle)) for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def user_env() -> dict[str, str]:
    """This process's environment as a user's shell would hand it to `twostage`: none of the
    tests' own `TWOSTAGE_*` settings (dtype float32 and the like), but the machine the suite acts
    as (`TWOSTAGE_CPU_FEATURES`), so a run that emulates an AVX2-only CPU emulates it in its
    subprocesses too."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TWOSTAGE_") or k == FEATURES_ENV}


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


@contextmanager
def running(app: Any, port: int | None = None) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a loopback port in a thread; yields its base URL."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@dataclass
class Served:
    url: str
    service: Service
    settings: Settings


def serve(settings: Settings, service: Service | None = None, port: int | None = None) -> Iterator[Served]:
    """The app for `settings` served on a loopback port (a generator, for fixtures)."""
    app = create_app(settings, service)
    with running(app, port) as url:
        yield Served(url, app.state.service, settings)


def model_server_settings(data_dir: Path, models: Any, cache: Path) -> Settings:
    """A twostage serving the tiny Qwen3 pair `models` (a `TinyModelPaths`) as a model server."""
    return Settings(
        data_dir=data_dir, cache_dir=cache, device="cpu", embedder={"model": str(models.embedder)},
        reranker={"model": str(models.reranker)}, api={"batch_wait_ms": 1},
    )  # fmt: skip


def sample_settings(data_dir: Path, tiny_models: TinyModelPaths, model_cache: Path, docs: int) -> Settings:
    """Settings for MiniLM + tiny Qwen3 reranker, with `docs` debian-ir documents ingested."""
    settings = Settings(
        data_dir=data_dir,
        cache_dir=model_cache,
        device="cpu",
        embedder={"model": "pypi:all-MiniLM-L6-v2"},
        reranker={"model": str(tiny_models.reranker), "batch_tokens": 4096},
        chunker={"tokens": 128, "overlap": 16},
        store={"payload_indexes": {"metadata.section": "keyword"}},
        api={"api_keys": ["secret-key"], "batch_wait_ms": 20, "max_body_bytes": 200_000},
    )
    with (DEBIAN_IR / "corpus.jsonl").open() as handle:
        rows = [json.loads(next(handle)) for _ in range(docs)]
    documents = [
        Document(r["_id"], r["text"], r["title"], "corpus.jsonl", {"section": r["section"]}) for r in rows
    ]
    store = open_store(settings)
    embedder = load_embedder(settings)
    ingest_corpus(
        documents,
        store=store,
        embedder=embedder,
        chunker=Chunker.for_embedder(Qwen3Tokens(), settings.chunker, embedder),
        settings=settings,
        collection="docs",
    )
    store.close()
    return settings


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def page_dom(url: str, profile: Path) -> str:
    """The DOM a page of ours leaves once its own JavaScript has run (it sets `data-state="done"`
    on the body), in Debian's headless chromium."""
    assert CHROMIUM is not None
    result = subprocess.run(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--virtual-time-budget=30000", "--dump-dom", url,
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert 'data-state="done"' in result.stdout, (result.stdout[-2000:], result.stderr[-2000:])
    return result.stdout
