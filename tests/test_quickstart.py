"""`twostage quickstart` and `twostage search` as a new user runs them: offline (no hub), the
default models unavailable, the Debian sample shipped in the package, real MiniLM and SmolLM2.

One quickstart server runs for the module, on 600 of the sample's 3,000 documents (the 200 the
labelled queries below are about, the games, and the first others): embedding all 3,000 takes
a minute on an AVX-512 core and ten on an AVX2-only one, and would decide the suite's time.
`test_the_default_sample_is_found_and_ctrl_c_stops_its_ingest` runs the default, no-PATH
quickstart on the whole packaged sample up to its ingest. The last test stops the server and
checks what a second run and a search without a server do.
"""

import gzip
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import httpx
import pytest
from helpers import free_port, run_cli, user_env

from twostage.api.settings import Settings
from twostage.retrieval.store.collections import open_store
from twostage.training.paired import paired_test, per_query

pytestmark = pytest.mark.slow
QUERY = "play chess against the computer"
SUBSET = 600  # documents of the packaged sample the module's quickstart serves
LABELLED = 200  # labelled sample queries judged against it


def _packaged(name: str) -> list[dict[str, object]]:
    raw = gzip.decompress((files("twostage.api.cli") / "samples" / name).read_bytes())
    return [json.loads(line) for line in raw.decode().splitlines()]


def _subset(path: Path) -> Path:
    """The documents the first LABELLED queries are about, the games, then the first others."""
    docs = _packaged("debian-sample.jsonl.gz")
    wanted = {str(q["doc_id"]) for q in _packaged("debian-sample-queries.jsonl.gz")[:LABELLED]}
    chosen = [d for d in docs if d["_id"] in wanted or d.get("section") == "games"]
    chosen += [d for d in docs if d not in chosen][: SUBSET - len(chosen)]
    assert len(chosen) == SUBSET and wanted <= {d["_id"] for d in chosen}
    path.write_bytes(gzip.compress("".join(json.dumps(d) + "\n" for d in chosen).encode()))
    return path


@dataclass
class Quickstart:
    url: str
    port: int
    env: dict[str, str]
    process: subprocess.Popen[str]
    out: Path  # what it printed (stdout)
    log: Path  # its stderr: the server's announcement and request log
    sample: Path  # the corpus it was given


def _env(data_dir: Path, model_cache: Path, port: int) -> dict[str, str]:
    """A user's environment: nothing configured but where data lives (and no hub)."""
    env = user_env()
    return {
        **env,
        "HF_HUB_OFFLINE": "1",
        "TWOSTAGE_DATA_DIR": str(data_dir),
        "TWOSTAGE_CACHE_DIR": str(model_cache),
        "TWOSTAGE_DEVICE": "cpu",
        "TWOSTAGE_API__PORT": str(port),
    }


def _one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("twostage: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Quickstart]:
    home = tmp_path_factory.mktemp("quickstart")
    port = free_port()
    # the packaged sample's section filter, made by hand as a user with their own corpus would
    env = {
        **_env(home / "data", model_cache, port),
        "TWOSTAGE_STORE__PAYLOAD_INDEXES": '{"metadata.section": "keyword"}',
    }
    out, log = home / "stdout.log", home / "stderr.log"
    sample = _subset(home / "debian-sample-600.jsonl.gz")
    with out.open("w") as stdout, log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "twostage.api.cli", "quickstart", str(sample)],
            env=env, stdout=stdout, stderr=stderr, text=True, cwd=home,
        )  # fmt: skip
    run = Quickstart(f"http://127.0.0.1:{port}", port, env, process, out, log, sample)
    try:
        deadline = time.monotonic() + 900
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "quickstart did not become ready"
            try:
                if httpx.get(run.url + "/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield run
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def test_quickstart_says_which_models_it_uses_and_why(quickstart: Quickstart) -> None:
    lines = quickstart.out.read_text().splitlines()
    assert lines[0] == (
        "embedder: pypi:all-MiniLM-L6-v2 (Qwen/Qwen3-Embedding-0.6B: hub disabled (HF_HUB_OFFLINE), nothing cached)"
    )
    assert lines[1].startswith(
        "reranker: pypi:SmolLM2-135M-Instruct (Qwen/Qwen3-Reranker-0.6B: hub disabled (HF_HUB_OFFLINE), "
        "nothing cached); a chat model used zero-shot, not trained to rank"
    )
    saved = (Path(quickstart.env["TWOSTAGE_DATA_DIR"]) / "settings.env").read_text()
    assert (
        "TWOSTAGE_EMBEDDER__MODEL=pypi:all-MiniLM-L6-v2" in saved and "TWOSTAGE_SEARCH__RERANK" not in saved
    )
    # an admin key of its own (`twostage keys`), printed plainly, kept hashed, and saved for the CLI
    # here readable by its owner only: feedback and retrains reach the server
    data = Path(quickstart.env["TWOSTAGE_DATA_DIR"])
    assert "API_KEYS" not in saved and (data / "settings.env").stat().st_mode & 0o077 == 0
    key = (data / "cli.key").read_text().strip()
    assert (data / "cli.key").stat().st_mode & 0o077 == 0 and key.startswith("ts_")
    stored = json.loads((data / "keys.json").read_text())["keys"]
    assert [(k["name"], k["scopes"]) for k in stored] == [("quickstart", ["admin"])] and key not in str(
        stored
    )
    assert "rerank=auto skips it" in lines[1]
    assert any(f"{SUBSET} documents read" in ln and f"{SUBSET} new" in ln for ln in lines), lines
    log = quickstart.log.read_text()
    assert f"search page:  {quickstart.url}/" in log and f"curl -s {quickstart.url}/v1/search" in log
    assert "twostage search 'play chess against the computer'" in log
    assert "learn:        twostage retrain --pairs-from sample" in log
    assert f"admin key:    {key}   (saved for the CLI" in log  # plainly, not as a JSON list


def test_quickstart_default_search_is_at_least_as_good_as_dense(quickstart: Quickstart) -> None:
    """The sample's labelled queries (Debian synopses -> their package), judged by document id:
    the default search (hybrid recall; the zero-shot reranker skipped) against dense recall on
    the same 200 queries, per query."""
    labelled = _packaged("debian-sample-queries.jsonl.gz")[:LABELLED]
    qrels = {f"q{i}": {row["doc_id"]: 1} for i, row in enumerate(labelled)}
    runs: dict[str, dict[str, dict[str, float]]] = {"default": {}, "dense": {}}
    with httpx.Client(base_url=quickstart.url, timeout=60) as client:
        for i, row in enumerate(labelled):
            for system, extra in (("default", {}), ("dense", {"recall": "dense", "rerank": False})):
                response = client.post(
                    "/v1/search", json={"query": row["query"], "group_by_doc": True, **extra}
                )
                assert response.status_code == 200, response.text
                body = response.json()
                assert body["stages"] == ["embed", "recall"] and body["reranker"] is None
                assert body["recall"] == ("hybrid" if system == "default" else "dense")
                runs[system][f"q{i}"] = {h["doc_id"]: -float(h["rank"]) for h in body["hits"]}
    compared = paired_test(per_query(qrels, runs["dense"]), per_query(qrels, runs["default"]))
    assert compared.baseline > 0.8 and compared.gain >= 0, compared.summary()

    chess = httpx.post(quickstart.url + "/v1/search", json={"query": QUERY, "top_n": 3}).json()
    assert chess["recall"] == "hybrid" and len(chess["notes"]) == 1, chess["notes"]
    # cited by each record's own `source` (its Debian source package): the server's install path
    # (site-packages/.../debian-sample.jsonl.gz) never reaches a client
    assert all(h["source"] == h["metadata"]["source"] and "/" not in h["source"] for h in chess["hits"])
    assert "site-packages" not in json.dumps(chess)
    assert "not reranked (rerank=auto)" in chess["notes"][0] and "rerank=true" in chess["notes"][0]
    assert "twostage retrain" in chess["notes"][0] and "not trained to rank" in chess["notes"][0]
    forced = httpx.post(
        quickstart.url + "/v1/search",
        json={"query": QUERY, "top_k": 4, "top_n": 4, "rerank": True},
        timeout=120,
    ).json()
    assert forced["stages"] == ["embed", "recall", "rerank"] and forced["reranker"].startswith("pypi:SmolLM2")
    assert all(hit["rerank_score"] is not None for hit in forced["hits"]) and not forced["notes"]
    assert forced["rerank_fusion"] == "rrf"  # the reranker's rank fused with the recall rank, by default


def test_search_cli_goes_through_the_running_server(quickstart: Quickstart) -> None:
    result = run_cli(["search", QUERY, "--top-n", "3"], quickstart.env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["rank", "doc", "id", "recall", "rerank", "relev.", "text"] and len(lines) >= 5
    assert lines[1].split()[0] == "1" and "docs__v1 · embed → recall" in result.stdout
    assert '"path": "/v1/search"' in quickstart.log.read_text()  # the server answered it
    # a retrain goes through the server holding the store too, with the data directory's own key
    plan = run_cli(["retrain", "--pairs-from", "sample", "--dry-run"], quickstart.env)
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "retraining through the server that holds this data directory's store" in plan.stderr
    assert '"path": "/v1/retrain"' in quickstart.log.read_text() and "(from sample)" in plan.stderr

    games = run_cli(["search", QUERY, "--json", "--filter", '{"metadata.section": "games"}'], quickstart.env)
    assert games.returncode == 0, games.stderr
    hits = json.loads(games.stdout)["hits"]
    assert hits and all(hit["metadata"]["section"] == "games" for hit in hits)
    alone = run_cli(
        ["search", QUERY, "--json", "--rerank", "--rerank-fusion", "none", "--top-k", "3", "--top-n", "3"],
        quickstart.env,
    )
    assert alone.returncode == 0, alone.stderr
    ordered = json.loads(alone.stdout)
    assert ordered["rerank_fusion"] == "none"
    assert [h["rerank_score"] for h in ordered["hits"]] == sorted(
        (h["rerank_score"] for h in ordered["hits"]), reverse=True
    )

    _one_line_error(
        run_cli(["search", QUERY, "--filter", '{"section": "games"}'], quickstart.env),
        "400", "cannot filter on 'section'",
    )  # fmt: skip
    _one_line_error(run_cli(["search", QUERY, "--filter", "{nope"], quickstart.env), "--filter is not JSON")
    _one_line_error(
        run_cli(["search", QUERY, "--server", f"http://127.0.0.1:{free_port()}"], quickstart.env),
        "cannot reach",
    )


def test_quickstart_refuses_a_port_in_use_and_a_data_dir_another_process_holds(
    quickstart: Quickstart,
) -> None:
    _one_line_error(run_cli(["quickstart"], quickstart.env), f"port {quickstart.port} on 127.0.0.1 is in use")
    other = {**quickstart.env, "TWOSTAGE_API__PORT": str(free_port())}
    _one_line_error(run_cli(["quickstart"], other), f"is in use by pid {quickstart.process.pid}")


def test_the_default_sample_is_found_and_ctrl_c_stops_its_ingest(tmp_path: Path, model_cache: Path) -> None:
    """No PATH: the sample packaged with twostage (3,000 documents, their Debian section made
    filterable); Ctrl-C in the middle of its ingest ends the process at once, and what was
    written stays consistent for the next run (ingestion is idempotent)."""
    env = _env(tmp_path / "data", model_cache, free_port())
    process = subprocess.Popen(
        [sys.executable, "-m", "twostage.api.cli", "quickstart"],
        env={**env, "TWOSTAGE_INGEST__PROGRESS_INTERVAL_S": "0.2"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    try:
        printed = [process.stdout.readline() for _ in range(4)]
        assert printed[3].startswith("ingesting the Debian sample (3,000 package descriptions) into docs"), (
            printed
        )
        for line in process.stderr:  # the first chunks are written: interrupt mid-ingest
            if re.search(r"[1-9]\d* chunks written", line):
                break
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130
    finally:
        if process.poll() is None:
            process.kill()
    assert "twostage: interrupted" in process.stderr.read()
    store = open_store(Settings(data_dir=tmp_path / "data"))
    try:
        manifest = store.read_manifest(store.resolve_alias("docs") or "docs__v1")
        assert manifest.payload_indexes.get("metadata.section") == "keyword"  # the sample's filter
        assert 0 < store.count(manifest.collection) < 3144  # stopped part way
    finally:
        store.close()


def test_quickstart_bad_paths_and_models(tmp_path: Path, model_cache: Path) -> None:
    env = _env(tmp_path / "data", model_cache, free_port())
    _one_line_error(run_cli(["quickstart", str(tmp_path / "missing.jsonl")], env), "does not exist")
    (tmp_path / "empty.jsonl").write_text("")
    _one_line_error(run_cli(["quickstart", str(tmp_path / "empty.jsonl")], env), "is empty")
    (tmp_path / "junk.jsonl").write_text("not json\n")
    _one_line_error(run_cli(["quickstart", str(tmp_path / "junk.jsonl")], env), "no documents to ingest")
    named = {**env, "TWOSTAGE_EMBEDDER__MODEL": "/models/Qwen3-Embedding-4B"}
    _one_line_error(run_cli(["quickstart"], named), "'/models/Qwen3-Embedding-4B' not found")
    hub = {**env, "TWOSTAGE_RERANKER__MODEL": "acme/no-such-reranker"}
    _one_line_error(run_cli(["quickstart"], hub), "acme/no-such-reranker", "--local-dir DIR")
    _one_line_error(run_cli(["search", QUERY], env), "does not exist")  # nothing ingested: no index


def test_second_run_skips_unchanged_documents_and_search_works_without_a_server(
    quickstart: Quickstart,
) -> None:
    quickstart.process.send_signal(signal.SIGINT)
    quickstart.process.wait(timeout=60)
    alone = run_cli(["search", QUERY, "--top-n", "3", "--json"], quickstart.env)
    assert alone.returncode == 0, alone.stderr[-2000:]
    through_store = json.loads(alone.stdout)
    assert through_store["embedder"].startswith("pypi:all-MiniLM-L6-v2@") and len(through_store["hits"]) == 3
    assert len(through_store["search_id"]) == 32  # logged here as the server logs it: feedback may name it

    # the sample's labelled queries name their package by doc_id: retrain reads them against the index
    plan = run_cli(["retrain", "--pairs-from", "sample", "--dry-run"], quickstart.env)
    assert plan.returncode == 0, plan.stderr[-2000:]
    indexed = {
        json.loads(line)["_id"] for line in gzip.decompress(quickstart.sample.read_bytes()).splitlines()
    }
    answerable = [q for q in _packaged("debian-sample-queries.jsonl.gz") if q["doc_id"] in indexed]
    counts = re.search(r"pairs: (\d+) train / (\d+) dev \(from sample\)", plan.stderr)
    assert counts is not None and int(counts[1]) + int(counts[2]) == len(answerable), plan.stderr[-2000:]
    assert f"{500 - len(answerable)} of 500 pairs have a positive that is not in docs__v1" in plan.stderr

    # a cold start: queries SmolLM2 writes here for sampled chunks; a round trip as deep as the index
    # keeps every one (the filter itself: tests/test_feedback.py), then retrain reads them
    out = Path(quickstart.env["TWOSTAGE_DATA_DIR"]).parent / "synthetic.jsonl"
    deep = {**quickstart.env, "TWOSTAGE_SYNTHESIS__TOP_K": "1000"}
    synth = run_cli(["pairs", "synthesize", "--out", str(out), "--chunks", "4", "--per-chunk", "2"], deep)
    assert synth.returncode == 0, synth.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    writer = "pypi:SmolLM2-135M-Instruct (local)"
    kept = re.search(
        rf"kept (\d+) of (\d+) queries written by {re.escape(writer)} for 4 chunks", synth.stderr
    )
    assert kept is not None and int(kept[1]) == int(kept[2]) == len(rows) >= 4, synth.stderr[-2000:]
    assert all(
        r["source"] == f"synthetic: {writer}" and r["id"] and r["split"] in {"train", "dev"} for r in rows
    )
    both = run_cli(
        ["retrain", "--pairs-from", "synthetic", "--pairs-from", "sample", "--dry-run"], quickstart.env
    )
    assert both.returncode == 0 and "(from synthetic+sample)" in both.stderr, both.stderr[-2000:]

    stderr = Path(quickstart.env["TWOSTAGE_DATA_DIR"]).parent / "second-run.log"
    with stderr.open("w") as log:  # a file, not a pipe nobody reads; SIGABRT dumps every thread there
        again = subprocess.Popen(
            [sys.executable, "-m", "twostage.api.cli", "quickstart", str(quickstart.sample), "--quiet"],
            env={**quickstart.env, "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE, stderr=log, text=True,
        )  # fmt: skip
    try:
        assert again.stdout is not None
        printed = []
        for line in again.stdout:
            printed.append(line)
            if "documents read" in line:
                break
        assert f"0 new, 0 updated, {SUBSET} unchanged" in printed[-1] and "0 chunks embedded" in printed[-1]
        assert printed[1].startswith("reranker: pypi:SmolLM2-135M-Instruct") and "rerank=true" in printed[1]
    finally:
        started = time.monotonic()
        again.send_signal(signal.SIGINT)  # Ctrl-C stops it whatever it is doing (loading, serving)
        try:
            again.wait(timeout=60)
        except subprocess.TimeoutExpired:
            again.send_signal(signal.SIGABRT)
            again.wait(timeout=60)
            pytest.fail(f"Ctrl-C did not stop quickstart in 60 s; its threads:\n{stderr.read_text()[-6000:]}")
    assert again.returncode == 130 and time.monotonic() - started < 60, again.returncode
