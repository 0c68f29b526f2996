"""An API ingest job killed with the server (`kill -9`), then the server restarted: the job is
reported failed with what to do, and submitting it again ends with exactly the right points."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from helpers import DEBIAN_IR, free_port, user_env

from twostage.retrieval.ingest.chunker import Chunker
from twostage.retrieval.models.embedder import Embedder
from twostage.retrieval.models.tiny import TinyModelPaths
from twostage.retrieval.models.tokens import Qwen3Tokens
from twostage.retrieval.store.edge import EdgeStore
from twostage.retrieval.store.settings import ChunkerSettings

DATA = DEBIAN_IR / "corpus.jsonl"
KEY = {"Authorization": "Bearer k"}


def _start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        server = subprocess.Popen([sys.executable, "-m", "twostage.api.cli", "serve"], env=env, stdout=out,
                                  stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{env['TWOSTAGE_API__PORT']}"
    deadline = time.monotonic() + 180
    while True:
        assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        try:
            if httpx.get(url + "/healthz").status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)


def _wait(url: str, job_id: str, until: set[str]) -> dict:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", headers=KEY).json()
        if job["status"] in until:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {until}")


def test_a_job_killed_with_the_server_is_reported_and_resubmitting_it_loses_and_duplicates_nothing(
    tmp_path: Path, tiny_models: TinyModelPaths, model_cache: Path, minilm_embedder: Embedder
) -> None:
    chunker = ChunkerSettings(tokens=128, overlap=16)
    port = free_port()
    env = {
        **user_env(),
        "TWOSTAGE_DATA_DIR": str(tmp_path / "data"), "TWOSTAGE_CACHE_DIR": str(model_cache),
        "TWOSTAGE_DEVICE": "cpu", "TWOSTAGE_EMBEDDER__MODEL": "pypi:all-MiniLM-L6-v2",
        "TWOSTAGE_RERANKER__MODEL": str(tiny_models.reranker), "TWOSTAGE_API__API_KEYS": '["k"]',
        "TWOSTAGE_API__PORT": str(port), "TWOSTAGE_CHUNKER__TOKENS": str(chunker.tokens),
        "TWOSTAGE_CHUNKER__OVERLAP": str(chunker.overlap),
    }  # fmt: skip
    with DATA.open() as handle:
        rows = [json.loads(next(handle)) for _ in range(600)]
    documents = [{"id": r["_id"], "text": r["text"]} for r in rows]
    cut = Chunker.for_embedder(Qwen3Tokens(), chunker, minilm_embedder)
    expected_chunks = sum(len(cut.chunk(d["id"], d["text"])) for d in documents)
    url, log = f"http://127.0.0.1:{port}", tmp_path / "server.log"

    server = _start(env, log)
    try:
        first = httpx.post(url + "/v1/documents", json={"documents": documents}, headers=KEY).json()
        deadline = time.monotonic() + 300
        while True:  # until part of it is written
            job = httpx.get(f"{url}/v1/jobs/{first['job_id']}", headers=KEY).json()
            assert job["status"] in {"queued", "running"} and time.monotonic() < deadline, job
            if job["progress"].get("chunks_written", 0) > 0:
                break
            time.sleep(0.05)
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
        store = EdgeStore(tmp_path / "data")  # the kernel dropped the dead server's lock
        try:
            written = store.count("docs__v1")
        finally:
            store.close()
        assert 0 < written < expected_chunks  # killed in the middle

        server = _start(env, log)
        interrupted = httpx.get(f"{url}/v1/jobs/{first['job_id']}", headers=KEY).json()
        assert "status" in interrupted, interrupted  # what the restarted server answered instead
        assert interrupted["status"] == "failed" and interrupted["error"].startswith(
            "interrupted: the server stopped while this job was running; submit it again"
        )
        again = httpx.post(url + "/v1/documents", json={"documents": documents}, headers=KEY).json()
        report = _wait(url, again["job_id"], {"succeeded", "failed"})
        assert report["status"] == "succeeded", report
        done = report["report"]
        assert done["total_documents"] == 600 and done["total_chunks"] == expected_chunks
        assert done["unchanged"] > 0 and done["unchanged"] + done["new"] + done["updated"] == 600
        search = httpx.post(url + "/v1/search", json={"query": rows[0]["text"][:200], "top_k": 5, "top_n": 5})
        assert search.status_code == 200 and search.json()["hits"][0]["doc_id"] == rows[0]["_id"]
    finally:
        if server.poll() is None:
            server.kill()
