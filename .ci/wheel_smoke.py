"""Smoke test of the installed wheel, run by `.ci/run` with the python of a clean virtual environment
outside the checkout (the wheel and the lock installed there, nothing editable): what a user who
installs twostage gets must start, ingest, serve, search, take feedback and show the search page.

Standard library only; every step prints one line, and the first failure exits non-zero with
the server's log.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
KEY = "smoke-key"


def run(*args: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [str(BIN / "twostage"), *args], env=env, capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        sys.exit(f"twostage {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def call(url: str, body: dict | None = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data, {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, response.read()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    import twostage.api.cli.main as cli  # from the wheel, not a checkout

    assert "site-packages" in cli.__file__, f"twostage imported from {cli.__file__}, not the installed wheel"
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        os.chdir(base)  # nothing of a checkout on the path
        env = {k: v for k, v in os.environ.items() if not k.startswith("TWOSTAGE_")}
        print(run("--help", env=env).splitlines()[0])
        written = run("models", "tiny", "--out", str(base / "models"), env=env)
        models = dict(line.split(": ", 1) for line in written.splitlines())  # embedder: PATH, reranker: PATH
        port = free_port()
        env |= {
            "TWOSTAGE_DATA_DIR": str(base / "data"), "TWOSTAGE_CACHE_DIR": str(base / "cache"),
            "TWOSTAGE_DEVICE": "cpu", "TWOSTAGE_EMBEDDER__MODEL": models["embedder"],
            "TWOSTAGE_RERANKER__MODEL": models["reranker"],
            "TWOSTAGE_API__API_KEYS": json.dumps([KEY]), "TWOSTAGE_API__PORT": str(port),
        }  # fmt: skip
        corpus = base / "corpus.jsonl"
        docs = [("chess", "GNU Chess plays chess against you in a terminal."),
                ("tar", "GNU tar saves many files together into a single archive."),
                ("curl", "curl transfers data with URLs over HTTP and FTP.")]  # fmt: skip
        corpus.write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in docs))
        print(run("ingest", str(corpus), "--quiet", env=env).strip())
        log = (base / "server.log").open("w")
        server = subprocess.Popen(
            [str(BIN / "twostage"), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if call(url + "/readyz")[0] == 200:
                        break
                except OSError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit("the server did not get ready:\n" + (base / "server.log").read_text())
                time.sleep(1)
            status, body = call(url + "/v1/search", {"query": "play chess", "top_n": 2})
            result = json.loads(body)
            assert status == 200 and result["hits"] and len(result["search_id"]) == 32, result
            print(f"search: {len(result['hits'])} hits, search_id {result['search_id']}")
            event = {"search_id": result["search_id"], "id": result["hits"][0]["id"], "event": "click"}
            status, body = call(url + "/v1/feedback", {"events": [event]})
            assert status == 200 and json.loads(body)["accepted"] == 1, body
            print(f"feedback: {json.loads(body)}")
            status, page = call(url + "/")
            assert status == 200 and b"<html" in page.lower(), page[:200]
            print(f"search page: {len(page)} bytes")
        finally:
            server.terminate()
            server.wait(timeout=60)
    print("wheel smoke test: passed")


if __name__ == "__main__":
    main()
