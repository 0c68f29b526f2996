"""The HTTP service on a real port: /v1/search, the Cohere/Jina/OpenAI-compatible endpoints
(driven by the real `cohere` and `openai` SDKs), operations routes, auth, limits, batching.

Corpus: debian-ir documents ingested with the real MiniLM embedder into Qdrant Edge; the
reranker is the tiny random Qwen3 reranker, so rerank scores are checked for exactness
against the reranker itself, not for relevance.
"""

import base64
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cohere
import httpx
import huggingface_hub
import numpy as np
import openai
import pytest
from helpers import CHROMIUM, DEBIAN_IR, Served, free_port, page_dom, sample_settings, serve
from huggingface_hub import InferenceClient

from twostage.api.http.filters import parse_filter
from twostage.api.runtime.service import Service
from twostage.api.settings import Settings
from twostage.retrieval.ingest.chunker import Chunker
from twostage.retrieval.ingest.documents import Document
from twostage.retrieval.ingest.pipeline import ingest_corpus
from twostage.retrieval.models.source import shown_model
from twostage.retrieval.models.tiny import TinyModelPaths
from twostage.retrieval.models.tokens import Qwen3Tokens
from twostage.retrieval.store.settings import StoreSettings
from twostage.retrieval.store.sparse import Bm25Encoder, Rrf
from twostage.retrieval.store.vector_store import AnyOf, Filter

DATA = DEBIAN_IR / "corpus.jsonl"
INSTRUCTION = "Given a question about Debian, retrieve the package description that answers it"


@pytest.fixture(scope="module")
def api_settings(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModelPaths, model_cache: Path
) -> Settings:
    return sample_settings(tmp_path_factory.mktemp("api-data"), tiny_models, model_cache, 150)


@pytest.fixture(scope="module")
def served(api_settings: Settings) -> Iterator[Served]:
    yield from serve(api_settings)


def post(served: Served, path: str, body: object, **kwargs: object) -> httpx.Response:
    return httpx.post(served.url + path, json=body, timeout=60, **kwargs)  # type: ignore[arg-type]


def test_search_returns_reranked_hits_with_both_scores_and_timings(served: Served) -> None:
    response = post(
        served, "/v1/search", {"query": "real-time strategy game of ancient warfare", "top_k": 20}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["collection"] == "docs__v1" and body["embedder"] == served.service.embedder.model_id
    hits = body["hits"]
    assert len(hits) == 10 and [h["rank"] for h in hits] == list(range(1, 11))
    # by default the first search.rerank_k (5) are reranked, then recall order
    assert body["rerank_fusion"] == "rrf"
    assert [h["rerank_score"] is not None for h in hits] == [True] * 5 + [False] * 5
    assert set(body["timings_ms"]) == {"embed", "recall", "rerank", "total"}
    assert "recall;dur=" in response.headers["server-timing"] and response.headers["x-request-id"]

    plain = post(
        served, "/v1/search", {"query": "real-time strategy game of ancient warfare", "rerank": False}
    )
    dense = plain.json()["hits"]
    assert plain.json()["rerank_fusion"] is None
    assert dense[0]["doc_id"] == "0ad" and dense[0]["rerank_score"] is None
    assert all(a["recall_score"] >= b["recall_score"] for a, b in itertools.pairwise(dense))


def test_rerank_k_bounds_what_the_reranker_sees(served: Served) -> None:
    body = {"query": "real-time strategy game of ancient warfare", "top_k": 20, "top_n": 12, "rerank": True,
            "rerank_fusion": "none"}  # fmt: skip
    full = post(served, "/v1/search", {**body, "rerank_k": 20}).json()["hits"]
    recalled = post(served, "/v1/search", {**body, "rerank": False}).json()["hits"]
    hits = post(served, "/v1/search", {**body, "rerank_k": 5}).json()["hits"]
    head, tail = hits[:5], hits[5:]
    assert {h["id"] for h in head} == {h["id"] for h in recalled[:5]}  # the recall top 5, reranked
    assert [h["rerank_score"] for h in head] == sorted((h["rerank_score"] for h in head), reverse=True)
    assert [h["id"] for h in tail] == [h["id"] for h in recalled[5:12]]  # then recall order, not reranked
    assert all(h["rerank_score"] is None for h in tail) and all(h["rerank_score"] is not None for h in full)
    too_deep = post(served, "/v1/search", {**body, "rerank_k": 21})
    assert too_deep.status_code == 422 and "rerank_k (21) cannot exceed top_k (20)" in too_deep.text


def test_reranked_hits_are_ordered_by_the_fused_ranks_or_the_reranker_alone(served: Served) -> None:
    """Default (rrf): 1/(60 + reranker rank) + 1/(60 + recall rank), ties in recall order, computed
    here from the recall order and the returned scores; `rerank_fusion: none` orders by the
    reranker's score alone; an unknown fusion is a 422."""
    body = {
        "query": "play chess against the computer",
        "top_k": 20,
        "top_n": 20,
        "rerank": True,
        "rerank_k": 20,
    }
    recalled = [h["id"] for h in post(served, "/v1/search", {**body, "rerank": False}).json()["hits"]]
    fused = post(served, "/v1/search", body).json()
    score = {h["id"]: h["rerank_score"] for h in fused["hits"]}
    by_reranker = sorted(recalled, key=lambda i: (-score[i], recalled.index(i)))

    def rrf(i: str) -> float:
        return 1 / (60 + by_reranker.index(i) + 1) + 1 / (60 + recalled.index(i) + 1)

    assert fused["rerank_fusion"] == "rrf"
    assert [h["id"] for h in fused["hits"]] == sorted(recalled, key=lambda i: (-rrf(i), recalled.index(i)))
    alone = post(served, "/v1/search", {**body, "rerank_fusion": "none"}).json()
    assert alone["rerank_fusion"] == "none" and [h["id"] for h in alone["hits"]] == by_reranker
    assert [h["id"] for h in alone["hits"]] != [h["id"] for h in fused["hits"]]  # the two orders differ here
    bad = post(served, "/v1/search", {**body, "rerank_fusion": "linear"})
    assert bad.status_code == 422 and "rerank_fusion" in bad.text


def test_instruction_reaches_query_prompt_and_reranker_prompt(served: Served) -> None:
    query = "which package plays chess"
    body = post(
        served,
        "/v1/search",
        {
            "query": query,
            "instruction": INSTRUCTION,
            "top_k": 15,
            "top_n": 15,
            "recall": "dense",
            "rerank_k": 15,
        },
    ).json()
    assert body["recall"] == "dense"
    service = served.service
    vector = service.embedder.embed_queries([query], INSTRUCTION)[0]
    expected = service.store.search("docs__v1", vector, 15)
    by_id = {h["id"]: h for h in body["hits"]}
    assert set(by_id) == {h.id for h in expected}
    for hit in expected:
        assert by_id[hit.id]["recall_score"] == pytest.approx(hit.score, abs=1e-5)
    texts = [by_id[h.id]["text"] for h in expected]
    direct = service.reranker.score(query, texts, INSTRUCTION)
    default = service.reranker.score(query, texts)
    assert [by_id[h.id]["rerank_score"] for h in expected] == pytest.approx(direct, abs=1e-6)
    assert not np.allclose(direct, default, atol=1e-6)  # the instruction changed the reranker prompt


def test_filters_and_grouping(served: Served) -> None:
    body = post(
        served,
        "/v1/search",
        {"query": "game", "top_k": 100, "top_n": 100, "filter": {"metadata.section": "games"}},
    ).json()
    assert body["hits"] and all(h["metadata"]["section"] == "games" for h in body["hits"])
    ranged = post(
        served,
        "/v1/search",
        {"query": "game", "top_k": 100, "top_n": 100, "filter": {"chunk_index": {"gte": 1}}},
    ).json()
    assert all(h["chunk_index"] >= 1 for h in ranged["hits"])
    grouped = post(
        served, "/v1/search", {"query": "game", "top_k": 100, "top_n": 100, "group_by_doc": True}
    ).json()
    doc_ids = [h["doc_id"] for h in grouped["hits"]]
    assert len(doc_ids) == len(set(doc_ids))
    bad = post(served, "/v1/search", {"query": "game", "filter": {"metadata.tags": "x"}})
    assert bad.status_code == 400 and "not an indexed field" in bad.json()["detail"]


@pytest.mark.parametrize(
    "body,status,message",
    [
        ({"query": ""}, 422, "at least 1 character"),
        ({"query": "x", "top_k": 5000}, 422, "less than or equal to 1000"),
        ({"query": "x", "top_k": 5, "top_n": 10}, 422, "cannot exceed top_k"),
        ({"query": "x", "collection": "nope"}, 404, "does not exist"),
        ({"query": "x", "collection": "a/b"}, 400, "invalid collection name"),
        ({"query": "x", "filter": {"chunk_index": {"gte": "high"}}}, 400, "range bounds must be numbers"),
        ({"query": "x", "unknown": 1}, 422, "Extra inputs"),
    ],
)
def test_search_bad_input_is_4xx_with_a_message(
    served: Served, body: dict, status: int, message: str
) -> None:
    response = post(served, "/v1/search", body)
    assert response.status_code == status and message in response.text


def test_body_limit_invalid_json_and_unknown_routes(served: Served) -> None:
    huge = post(served, "/v2/rerank", {"query": "q", "documents": ["x" * 300_000]})
    assert huge.status_code == 413 and "larger than 200000 bytes" in huge.text
    broken = httpx.post(
        served.url + "/v1/search", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert broken.status_code == 422
    assert httpx.get(served.url + "/v1/nothing").status_code == 404


def test_cohere_sdk_rerank_matches_the_reranker(served: Served) -> None:
    client = cohere.ClientV2(api_key="secret-key", base_url=served.url)  # a key sent must be valid
    documents = ["a chess engine", "a strategy game", "an image viewer", "chess database and board"]
    result = client.rerank(model="twostage", query="chess", documents=documents, top_n=3)
    expected = served.service.reranker.rerank("chess", documents, top_n=3)
    assert [r.index for r in result.results] == [e.index for e in expected]
    assert [r.relevance_score for r in result.results] == pytest.approx([e.score for e in expected], abs=1e-6)
    with_instruction = post(
        served, "/v2/rerank", {"query": "chess", "documents": documents, "instruction": INSTRUCTION}
    )
    direct = served.service.reranker.score("chess", documents, INSTRUCTION)
    by_index = {r["index"]: r["relevance_score"] for r in with_instruction.json()["results"]}
    assert [by_index[i] for i in range(4)] == pytest.approx(direct, abs=1e-6)


def test_jina_rerank_returns_documents_and_usage(served: Served) -> None:
    body = post(
        served,
        "/v1/rerank",
        {"model": "m", "query": "chess", "documents": ["chess", "image viewer"], "top_n": 1},
    ).json()
    assert len(body["results"]) == 1 and body["results"][0]["document"]["text"] in {"chess", "image viewer"}
    assert body["usage"]["total_tokens"] > 0
    clipped = post(
        served, "/v1/rerank", {"query": "chess", "documents": ["chess " * 50], "max_tokens_per_doc": 3}
    ).json()
    expected = served.service.reranker.score("chess", ["chess chess"])[
        0
    ]  # "ch","ess"," chess": 3 Qwen3 tokens
    assert clipped["results"][0]["relevance_score"] == pytest.approx(expected, abs=1e-6)
    empty = post(served, "/v1/rerank", {"query": "chess", "documents": []})
    assert empty.status_code == 422


def test_openai_sdk_embeddings_float_base64_dimensions(served: Served) -> None:
    client = openai.OpenAI(api_key="secret-key", base_url=served.url + "/v1")
    texts = ["first document", "second document about chess"]
    default = client.embeddings.create(input=texts, model="twostage")  # the SDK asks for base64
    expected = served.service.embedder.embed_documents(texts)
    np.testing.assert_allclose([d.embedding for d in default.data], expected, atol=1e-6)
    as_float = client.embeddings.create(input="chess", model="twostage", encoding_format="float")
    np.testing.assert_allclose(
        as_float.data[0].embedding, served.service.embedder.embed_documents(["chess"])[0], atol=1e-6
    )
    short = client.embeddings.create(input="chess", model="twostage", dimensions=64, encoding_format="float")
    vector = np.array(short.data[0].embedding)
    assert vector.shape == (64,) and np.linalg.norm(vector) == pytest.approx(1, abs=1e-5)
    query = post(
        served, "/v1/embeddings", {"input": "chess", "instruction": INSTRUCTION, "encoding_format": "base64"}
    ).json()
    decoded = np.frombuffer(base64.b64decode(query["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(
        decoded, served.service.embedder.embed_queries(["chess"], INSTRUCTION)[0], atol=1e-6
    )
    too_wide = post(served, "/v1/embeddings", {"input": "chess", "dimensions": 4096})
    assert too_wide.status_code == 400 and "at most 384" in too_wide.text
    assert post(served, "/v1/embeddings", {"input": ["ok", " "]}).status_code == 400


def test_tei_routes_with_tei_clients(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """`/embed` through huggingface_hub's TEI client; `/rerank` and `/info` as RAGFlow and Haystack post them."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # a local server, not the hub
    embedder, reranker = served.service.embedder, served.service.reranker
    assert embedder is not None and reranker is not None
    client = InferenceClient(model=served.url + "/embed")
    texts = ["first document", "second document about chess"]
    np.testing.assert_allclose(client.feature_extraction(texts), embedder.embed_documents(texts), atol=1e-6)
    raw = client.feature_extraction("chess", normalize=False)[0]  # MiniLM ends in its own Normalize module
    np.testing.assert_allclose(raw, embedder.embed_documents(["chess"])[0], atol=1e-6)
    short = client.feature_extraction("chess", dimensions=64, prompt_name="query")[0]
    assert short.shape == (64,) and np.linalg.norm(short) == pytest.approx(1, abs=1e-5)
    np.testing.assert_allclose(
        post(served, "/embed", {"inputs": "chess", "instruction": INSTRUCTION}).json()[0],
        embedder.embed_queries(["chess"], INSTRUCTION)[0], atol=1e-6,
    )  # fmt: skip

    # MiniLM reads 256 word pieces: `left` keeps a text's end, `right` its beginning, `false` refuses
    ending = " and finally the part that matters: a chess engine"
    one, two = "x " * 400 + ending, "y " * 50 + "x " * 400 + ending
    left = client.feature_extraction([one, two], truncate=True, truncation_direction="Left")
    np.testing.assert_allclose(left[0], left[1], atol=1e-6)
    right = client.feature_extraction([one, two], truncate=True, truncation_direction="right")
    assert not np.allclose(right[0], right[1], atol=1e-3)
    np.testing.assert_allclose(right, embedder.embed_documents([one, two]), atol=1e-6)
    refused = post(served, "/embed", {"inputs": ["fits", one], "truncate": False})
    assert refused.status_code == 413 and "inputs[1]" in refused.text and "256" in refused.text
    assert post(served, "/embed", {"inputs": ["fits"], "truncate": False}).status_code == 200

    documents = ["a chess engine", "a strategy game", "an image viewer", "chess database and board"]
    ragflow = post(
        served, "/rerank", {"query": "chess", "texts": documents, "raw_scores": False, "truncate": True}
    )
    direct = reranker.score("chess", documents)
    assert [r["index"] for r in ragflow.json()] == sorted(range(4), key=lambda i: -direct[i])
    assert [r["score"] for r in ragflow.json()] == pytest.approx(sorted(direct, reverse=True), abs=1e-6)
    assert all("text" not in r for r in ragflow.json())
    haystack = post(served, "/rerank", {
        "query": "chess", "texts": documents, "raw_scores": True, "return_text": True,
        "truncate": True, "truncation_direction": "Right", "instruction": INSTRUCTION,
    }).json()  # fmt: skip
    probabilities = reranker.score("chess", documents, INSTRUCTION)
    for r in haystack:
        assert r["text"] == documents[r["index"]]
        assert 1 / (1 + np.exp(-r["score"])) == pytest.approx(probabilities[r["index"]], abs=1e-6)
    assert [r["score"] for r in haystack] == sorted((r["score"] for r in haystack), reverse=True)
    too_long = "chess " * (reranker.max_length + 10)  # not cut unless asked: its best window is scored
    windowed = post(served, "/rerank", {"query": "chess", "texts": ["ok", too_long], "truncate": False})
    assert windowed.status_code == 200 and sorted(r["index"] for r in windowed.json()) == [0, 1]
    assert post(served, "/rerank", {"query": "chess", "texts": []}).status_code == 422
    many = post(served, "/embed", {"inputs": ["x"] * 10_000})
    assert many.status_code == 413 and "at most 2048 inputs" in many.text
    assert post(served, "/rerank", {"query": "q", "texts": ["x"] * 10_000}).status_code == 413

    info = httpx.get(served.url + "/info").json()
    assert info["model_id"] == shown_model(embedder.model_id) and info["max_input_length"] == 256
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_client_batch_size"] == served.settings.api.max_client_batch
    assert (
        info["reranker"]["model_id"]
        == shown_model(reranker.model_id)
        == "qwen3-reranker-tiny@" + (reranker.model_id.rsplit("@", 1)[1])
    )  # the folder's name, never the server's path
    assert info["model_dtype"] == embedder.numerics == "float32"  # conftest pins float32


def test_health_ready_metrics(served: Served) -> None:
    assert httpx.get(served.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(served.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["collection"] == "docs__v1"
    post(served, "/v1/search", {"query": "metrics please"})
    metrics = httpx.get(served.url + "/metrics").text
    assert 'twostage_requests_total{method="POST",route="/v1/search",status="200"}' in metrics
    assert 'twostage_stage_seconds_count{stage="rerank"}' in metrics
    assert 'twostage_queue_depth{model="reranker"}' in metrics and "twostage_batch_items_bucket" in metrics
    for role in ("embedder", "reranker"):  # the serving pair, one copy each
        assert f'twostage_models_resident{{role="{role}"}} 1.0' in metrics
    assert httpx.get(served.url + "/docs").status_code == 200
    page = httpx.get(served.url + "/")
    assert page.status_code == 200 and '<form id="search">' in page.text


def test_concurrent_requests_share_batches(served: Served) -> None:
    def one(i: int) -> int:
        return post(
            served, "/v1/embeddings", {"input": f"concurrent query number {i}", "input_type": "query"}
        ).status_code

    histogram = served.service.metrics.batch_items.labels("embedder")
    before = (histogram._sum.get(), sum(b.get() for b in histogram._buckets[:1]))
    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(one, range(32))) == {200}
    items = histogram._sum.get() - before[0]
    singles = sum(b.get() for b in histogram._buckets[:1]) - before[1]
    assert items >= 32 and singles < 32  # some batches carried more than one request

    reranks = served.service.metrics.batch_items.labels("reranker")
    before_items = reranks._sum.get()
    before_batches = sum(b.get() for b in reranks._buckets)
    documents = ["a chess engine", "an image viewer", "a text editor"]
    expected = served.service.reranker.score("query 3", documents)

    def rerank(i: int) -> list[float]:
        results = post(served, "/v2/rerank", {"query": f"query {i}", "documents": documents}).json()[
            "results"
        ]
        return [r["relevance_score"] for r in sorted(results, key=lambda r: r["index"])]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(rerank, range(32)))
    assert answers[3] == pytest.approx(expected, abs=1e-6)  # batched with other queries, same scores
    batches = sum(b.get() for b in reranks._buckets) - before_batches
    assert reranks._sum.get() - before_items == 32 and batches < 32


def test_keys_for_reads_and_overload(tmp_path: Path, tiny_models: TinyModelPaths, model_cache: Path) -> None:
    strict = sample_settings(tmp_path, tiny_models, model_cache, 20)
    strict.api.keys_for_reads = True
    strict.api.max_pending = 1
    strict.api.batch_wait_ms = 200
    strict.api.cors_origins = ["https://chat.example.com"]
    for served in serve(strict):
        assert post(served, "/v1/search", {"query": "x"}).status_code == 401
        wrong = post(served, "/v1/search", {"query": "x"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        ok = post(served, "/v1/search", {"query": "x"}, headers={"Authorization": "Bearer secret-key"})
        assert ok.status_code == 200
        preflight = {"Origin": "https://chat.example.com", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
        allowed = httpx.options(served.url + "/v1/search", headers=preflight)
        assert allowed.headers["access-control-allow-origin"] == "https://chat.example.com"
        other = httpx.options(
            served.url + "/v1/search", headers={**preflight, "Origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in other.headers

        def one(i: int, served: Served = served) -> httpx.Response:
            return post(
                served, "/v1/embeddings", {"input": f"q{i}"}, headers={"Authorization": "Bearer secret-key"}
            )

        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(one, range(24)))
        refused = [r for r in responses if r.status_code == 503]
        assert refused and all(r.headers["retry-after"] == "1" for r in refused)
        assert {r.status_code for r in responses} <= {200, 503}


def wait_for_job(served: Served, job_id: str, headers: dict[str, str]) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = httpx.get(f"{served.url}/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in {"succeeded", "failed"}:
            return job
        time.sleep(0.1)
    raise AssertionError("job did not finish")


def test_documents_api_jobs_delete_and_cli_through_the_server(served: Served, tmp_path: Path) -> None:
    key = {"Authorization": "Bearer secret-key"}
    docs = [
        {"id": "new-1", "text": "A terminal chess board with an engine.", "metadata": {"section": "games"}},
        {"id": "blank", "text": "   "},
    ]
    assert post(served, "/v1/documents", {"documents": docs}).status_code == 401
    accepted = post(served, "/v1/documents", {"documents": docs}, headers=key)
    assert accepted.status_code == 202, accepted.text
    body = accepted.json()
    assert body["documents"] == 1 and "document 'blank' has no text" in body["rejected"][0]
    job = wait_for_job(served, body["job_id"], key)
    assert job["status"] == "succeeded" and job["report"]["new"] == 1
    hits = post(served, "/v1/search", {"query": "terminal chess board", "rerank": False, "top_n": 3}).json()[
        "hits"
    ]
    assert "new-1" in [h["doc_id"] for h in hits]

    removed = httpx.delete(f"{served.url}/v1/documents/new-1", headers=key)
    assert removed.status_code == 200 and removed.json()["deleted_chunks"] >= 1
    assert httpx.delete(f"{served.url}/v1/documents/new-1", headers=key).status_code == 404
    assert httpx.get(f"{served.url}/v1/jobs/nope", headers=key).status_code == 404
    none_valid = post(served, "/v1/documents", {"documents": [{"id": "x", "text": ""}]}, headers=key)
    assert none_valid.status_code == 400 and "no valid documents" in none_valid.text

    corpus = tmp_path / "more.jsonl"
    corpus.write_text(
        "\n".join(
            json.dumps({"_id": f"cli-{i}", "text": f"Package number {i} for the command line."})
            for i in range(5)
        )
        + "\n{broken\n"
    )
    env = {**os.environ, "TWOSTAGE_API_KEY": "secret-key"}
    result = subprocess.run(
        [sys.executable, "-m", "twostage.api.cli", "ingest", str(corpus), "--server", served.url, "--json"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    totals = json.loads(result.stdout)
    assert (totals["new"], totals["collection"], totals["bad_records"]) == (5, "docs__v1", 1)
    assert f"{corpus}:6: invalid JSON" in result.stderr
    sent = Filter(must=(AnyOf("doc_id", tuple(f"cli-{i}" for i in range(5))),))
    assert served.service.store.count("docs__v1", sent) == 5
    # cited by the file's name, as a local ingest cites it: the client's paths stay with the client
    assert {r.payload["source"] for r in served.service.store.scroll("docs__v1", sent, ["source"])} == {
        "more.jsonl"
    }


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (.ci/run installs it)")
def test_search_page_in_headless_chromium(served: Served, tmp_path: Path) -> None:
    """The page's own JavaScript runs in a real browser: it calls /v1/search and renders hits."""
    query = "real-time strategy game of ancient warfare"
    url = f"{served.url}/?{urllib.parse.urlencode({'q': query, 'top_n': 5, 'instruction': INSTRUCTION})}"
    dom = page_dom(url, tmp_path / "profile")
    expected = post(served, "/v1/search", {"query": query, "top_n": 5, "instruction": INSTRUCTION}).json()
    assert dom.count('<li class="hit">') == 5
    assert f"5 results from {expected['collection']}" in dom
    for hit in expected["hits"]:
        assert f"rerank {hit['rerank_score']:.4f} · recall {hit['recall_score']:.4f}" in dom
        assert f'<div class="meta cite">{hit["source"]}</div>' in dom  # each hit says where it is from
    for stage in ("embed", "recall", "rerank", "total"):
        assert f'<span class="timing">{stage} ' in dom


def test_serve_starts_empty_becomes_ready_and_drains_on_sigterm(
    tmp_path: Path, tiny_models: TinyModelPaths, model_cache: Path
) -> None:
    """`twostage serve` as users run it: not ready without a collection, ready after ingesting
    through the API, and on SIGTERM an in-flight request still gets its answer."""
    port = free_port()
    env = {
        **os.environ,
        "TWOSTAGE_DATA_DIR": str(tmp_path / "data"),
        "TWOSTAGE_CACHE_DIR": str(model_cache),
        "TWOSTAGE_DEVICE": "cpu",
        "TWOSTAGE_EMBEDDER__MODEL": "pypi:all-MiniLM-L6-v2",
        "TWOSTAGE_RERANKER__MODEL": str(tiny_models.reranker),
        "TWOSTAGE_API__API_KEYS": '["k"]',
        "TWOSTAGE_API__PORT": str(port),
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "twostage.api.cli", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None and time.monotonic() < deadline, "serve did not come up"
            try:
                if httpx.get(url + "/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        not_ready = httpx.get(url + "/readyz")
        assert not_ready.status_code == 503 and "does not exist yet" in not_ready.json()["detail"]
        assert httpx.post(url + "/v1/search", json={"query": "x"}).status_code == 404

        key = {"Authorization": "Bearer k"}
        docs = [{"id": f"d{i}", "text": f"Document {i} about a terminal program."} for i in range(3)]
        job = httpx.post(url + "/v1/documents", json={"documents": docs}, headers=key).json()
        served = Served(url, None, None)  # type: ignore[arg-type]
        assert wait_for_job(served, job["job_id"], key)["status"] == "succeeded"
        assert httpx.get(url + "/readyz").status_code == 200

        long_docs = ["word " * 400] * 64  # enough reranking to still be running when SIGTERM lands
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(
                httpx.post, url + "/v2/rerank", json={"query": "q", "documents": long_docs}, timeout=120
            )
            time.sleep(0.5)
            server.send_signal(signal.SIGTERM)
            answer = in_flight.result()
        assert answer.status_code == 200 and len(answer.json()["results"]) == 64
        # uvicorn finishes in-flight work, shuts the app down, then re-raises the signal it caught
        assert server.wait(timeout=60) in {0, -signal.SIGTERM}
    finally:
        if server.poll() is None:
            server.kill()


def test_an_unreachable_qdrant_server_answers_503_not_500(tiny_settings: Settings) -> None:
    """The server starts (models load), and a search while Qdrant is down is a 503 naming it."""
    settings = tiny_settings.model_copy(deep=True)
    port = free_port()  # nothing listens there
    settings.store = StoreSettings(kind="qdrant", url=f"http://127.0.0.1:{port}", grpc_port=port, timeout_s=2)
    for served in serve(settings):
        response = post(served, "/v1/search", {"query": "a real-time strategy game"})
        assert response.status_code == 503, response.text
        assert f"Qdrant at http://127.0.0.1:{port}" in response.json()["detail"]


def test_a_request_is_admitted_whole_and_one_over_the_client_batch_is_413(served: Served) -> None:
    """1,000 inputs through the openai SDK on an idle server are one admitted request, not 1,000
    queue entries; 2,049 inputs or documents are refused with the limit named."""
    client = openai.OpenAI(api_key="secret-key", base_url=served.url + "/v1", timeout=300)
    inputs = [f"package description number {i}" for i in range(1000)]
    done = client.embeddings.create(model="any", input=inputs)
    assert [d.index for d in done.data] == list(range(1000))
    assert served.service.embed_batcher is not None and served.service.embed_batcher.admitted == 0
    too_many = post(served, "/v1/embeddings", {"input": [f"t{i}" for i in range(2049)]})
    assert too_many.status_code == 413, too_many.text
    assert too_many.json()["detail"] == (
        "at most 2048 inputs per request (api.max_client_batch), got 2049: split the request"
    )
    documents = post(served, "/v2/rerank", {"query": "q", "documents": ["d"] * 2049})
    assert documents.status_code == 413 and "2048 documents per request" in documents.json()["detail"]


def test_admission_takes_or_refuses_a_request_whole() -> None:
    """The real batcher with a slow batch function: a request that does not fit is refused at once
    with nothing queued; one that fits is admitted; the count returns to zero when answered."""
    import asyncio

    from twostage.api.runtime.micro_batcher import MicroBatcher, Overloaded

    def slow(items: object) -> list[int]:
        time.sleep(0.3)
        return [1] * len(items)  # type: ignore[arg-type]

    batcher: MicroBatcher[int, int] = MicroBatcher(
        "embedder", slow, lambda _: 1, budget=100, max_wait_s=0.01, max_pending=10
    )

    async def scenario() -> None:
        first = asyncio.ensure_future(batcher.submit_many(list(range(8))))
        await asyncio.sleep(0.05)
        assert batcher.admitted == 8
        with pytest.raises(Overloaded, match="8 items queued, at most 10"):
            await batcher.submit_many(list(range(3)))
        assert batcher.admitted == 8 and batcher.depth == 0  # nothing of the refused request queued
        assert await batcher.submit_many([1, 2]) == [1, 1]
        assert await first == [1] * 8
        assert batcher.admitted == 0
        assert await batcher.submit_many(list(range(50))) == [1] * 50  # an idle batcher takes any size

    try:
        asyncio.run(scenario())
    finally:
        batcher.close()


def test_batcher_runs_a_batched_request_at_once_and_overlaps_batches_with_workers() -> None:
    """A request that brings several items does not wait for company (the wait here is 30 s);
    lone requests still share a batch; with two workers two batches are in flight at once
    (what a model server's round trip needs); closing stops every worker."""
    import asyncio

    from twostage.api.runtime.micro_batcher import MicroBatcher

    sizes: list[int] = []
    running, most = 0, 0
    guard = threading.Lock()

    def slow(items: object) -> list[int]:
        nonlocal running, most
        with guard:
            running += 1
            most = max(most, running)
            sizes.append(len(items))  # type: ignore[arg-type]
        time.sleep(0.3)
        with guard:
            running -= 1
        return [2 * i for i in items]  # type: ignore[attr-defined]

    async def scenario(batcher: MicroBatcher[int, int]) -> None:
        started = time.monotonic()
        assert await batcher.submit_many([1, 2, 3, 4, 5]) == [2, 4, 6, 8, 10]
        assert time.monotonic() - started < 15, "a batched request waited out max_wait_s"
        assert sizes == [5]

    waiting: MicroBatcher[int, int] = MicroBatcher(
        "embedder", slow, lambda _: 1, budget=100, max_wait_s=30, max_pending=100
    )
    try:
        asyncio.run(scenario(waiting))
    finally:
        waiting.close()

    sizes.clear()
    two: MicroBatcher[int, int] = MicroBatcher(
        "embedder", slow, lambda _: 1, budget=3, max_wait_s=0.05, max_pending=100, workers=2
    )

    async def overlapping() -> None:
        answers = await asyncio.gather(*(two.submit(i) for i in range(9)))
        assert answers == [2 * i for i in range(9)]

    try:
        asyncio.run(overlapping())
    finally:
        two.close()
    assert sorted(sizes) == [3, 3, 3] and most == 2
    assert not any(worker.is_alive() for worker in two._workers)


def test_model_faults_are_json_errors_with_a_metric(
    tmp_path: Path, tiny_models: TinyModelPaths, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NaN scores from a real model with broken weights are a 500 naming the model; device
    out-of-memory (injected: there is no GPU here) is a 503 with Retry-After; both are counted."""
    import torch

    settings = sample_settings(tmp_path, tiny_models, model_cache, 10)
    for served in serve(settings):
        reranker = served.service.reranker
        assert reranker is not None
        norm = reranker.model.get_decoder().norm.weight  # type: ignore[attr-defined]
        saved = norm.detach().clone()
        with torch.no_grad():
            norm.fill_(float("nan"))
        broken = post(served, "/v2/rerank", {"query": "q", "documents": ["a", "b"]})
        assert broken.status_code == 500, broken.text
        assert (
            "returned NaN or infinite values" in broken.json()["detail"]
            and shown_model(reranker.model_id) in broken.text
            and "/tmp" not in broken.text
        )
        with torch.no_grad():
            norm.copy_(saved)
        assert post(served, "/v2/rerank", {"query": "q", "documents": ["a", "b"]}).status_code == 200

        def out_of_memory(*_: object, **__: object) -> None:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        monkeypatch.setattr(reranker, "score_many", out_of_memory)
        full = post(served, "/v1/search", {"query": "a terminal program", "rerank": True})
        assert full.status_code == 503 and full.headers["retry-after"] == "5"
        assert "ran out of device memory" in full.json()["detail"]
        metrics = httpx.get(served.url + "/metrics").text
        assert 'twostage_model_errors_total{kind="non_finite",model="reranker"} 1.0' in metrics
        assert 'twostage_model_errors_total{kind="out_of_memory",model="reranker"}' in metrics


class SlowStore:
    """The real store, with every call held for `delay_s` (a Qdrant server under load)."""

    def __init__(self, store: object, delay_s: float) -> None:
        self.store, self.delay_s = store, delay_s

    def __getattr__(self, name: str) -> object:
        attribute = getattr(self.store, name)
        if not callable(attribute):
            return attribute

        def slow(*args: object, **kwargs: object) -> object:
            time.sleep(self.delay_s)
            return attribute(*args, **kwargs)

        return slow


def test_the_event_loop_never_waits_on_a_slow_store(
    tmp_path: Path, tiny_models: TinyModelPaths, model_cache: Path
) -> None:
    """While searches and readiness checks wait on a store that takes 2 s a call (in worker
    threads), /healthz keeps answering. A loop that waited on the store would answer after the
    1.7 s the calls still have left; each answer must come within 0.5 s (typically ~10 ms; a
    50 ms bound failed once at 57 ms on an idle 2-core CI runner, a scheduling hiccup)."""
    settings = sample_settings(tmp_path, tiny_models, model_cache, 10)
    service = Service(settings)
    service.start()
    service.store = SlowStore(service.store, 2.0)  # type: ignore[assignment]
    for served in serve(settings, service):
        with ThreadPoolExecutor(4) as pool:
            slow = [
                pool.submit(post, served, "/v1/search", {"query": "a terminal program"}),
                pool.submit(httpx.get, served.url + "/readyz", timeout=60),
                pool.submit(post, served, "/v1/search", {"query": "x", "collection": "other"}),
            ]
            time.sleep(0.3)  # all three are inside the store now
            for _ in range(5):
                started = time.perf_counter()
                assert httpx.get(served.url + "/healthz").status_code == 200
                assert time.perf_counter() - started < 0.5
            answers = [f.result() for f in slow]
        assert [a.status_code for a in answers] == [200, 200, 404], [a.text for a in answers]


def test_hybrid_recall_is_the_default_and_is_the_engines_fusion(served: Served) -> None:
    query, flt = "chess engine for playing against the computer", {"metadata.section": "games"}
    body = post(served, "/v1/search", {"query": query, "top_k": 20, "top_n": 20, "rerank": False}).json()
    assert body["recall"] == "hybrid" and body["stages"] == ["embed", "recall"], body
    service = served.service
    manifest = service.store.read_manifest("docs__v1")
    assert manifest.sparse is not None and manifest.sparse.params.avg_len == 256.0
    sparse = Bm25Encoder(manifest.sparse).embed_query(query)
    vector = service.embedder.embed_queries([query])[0]
    expected = service.store.search("docs__v1", vector, 20, sparse=sparse, fusion=Rrf(60, (1.0, 1.0)))
    assert [h["id"] for h in body["hits"]] == [h.id for h in expected]
    assert [h["recall_score"] for h in body["hits"]] == pytest.approx([h.score for h in expected], rel=1e-6)
    only_bm25 = post(
        served, "/v1/search", {"query": query, "recall": "sparse", "rerank": False, "filter": flt}
    )
    assert only_bm25.json()["recall"] == "sparse"
    hits = only_bm25.json()["hits"]
    assert hits and all(h["metadata"]["section"] == "games" for h in hits)
    assert hits[0]["id"] == service.store.search("docs__v1", None, 1, parse_filter(flt, manifest.payload_indexes),
                                                 sparse=sparse)[0].id  # fmt: skip
    filtered = post(served, "/v1/search", {"query": query, "top_k": 30, "top_n": 30, "filter": flt}).json()
    assert filtered["hits"] and all(h["metadata"]["section"] == "games" for h in filtered["hits"])
    bad = post(served, "/v1/search", {"query": query, "recall": "bm25"})
    assert bad.status_code == 422 and "recall" in bad.text


def test_a_dense_only_collection_keeps_working_and_says_so(served: Served) -> None:
    service = served.service
    legacy = served.settings.model_copy(deep=True)
    legacy.recall.sparse = False
    with DATA.open() as handle:
        rows = [json.loads(next(handle)) for _ in range(20)]
    ingest_corpus(
        [Document(r["_id"], r["text"], r["title"], "corpus.jsonl", {"section": r["section"]}) for r in rows],
        store=service.store, embedder=service.embedder,
        chunker=Chunker.for_embedder(Qwen3Tokens(), legacy.chunker, service.embedder),
        settings=legacy, collection="legacy",
    )  # fmt: skip
    body = post(served, "/v1/search", {"query": "chess", "collection": "legacy", "rerank": False}).json()
    assert body["recall"] == "dense" and body["hits"]
    assert any("--new-version" in n and "built without BM25" in n for n in body["notes"]), body["notes"]
    for mode in ("sparse", "hybrid"):
        refused = post(served, "/v1/search", {"query": "chess", "collection": "legacy", "recall": mode})
        assert refused.status_code == 400, refused.text
        assert (
            "no BM25 sparse vectors" in refused.json()["detail"]
            and "recall=dense" in refused.json()["detail"]
        )
    rebuilt = ingest_corpus(  # what the note says to do: a new version, with BM25 vectors this time
        [Document(r["_id"], r["text"], r["title"], "corpus.jsonl", {"section": r["section"]}) for r in rows],
        store=service.store, embedder=service.embedder,
        chunker=Chunker.for_embedder(Qwen3Tokens(), served.settings.chunker, service.embedder),
        settings=served.settings, collection="legacy", new_version=True,
    )  # fmt: skip
    assert rebuilt.collection == "legacy__v2" and service.store.read_manifest("legacy__v2").sparse is not None
    deadline = time.monotonic() + 10  # the service follows the alias within api.alias_refresh_s
    while True:
        body = post(served, "/v1/search", {"query": "chess", "collection": "legacy"}).json()
        if body["collection"] == "legacy__v2" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert body["collection"] == "legacy__v2" and body["recall"] == "hybrid", body
    assert not any("built without BM25" in n for n in body["notes"])


def test_batcher_takes_items_from_worker_threads_directly() -> None:
    """`run` (what a search's worker thread calls): items from several threads share batches, each
    thread gets its own answer, failures reach only their caller, and admission is per call."""
    from twostage.api.runtime.micro_batcher import MicroBatcher, Overloaded

    sizes: list[int] = []

    def double(items: object) -> list[int]:
        sizes.append(len(items))  # type: ignore[arg-type]
        if -1 in items:  # type: ignore[operator]
            raise ValueError("bad item")
        time.sleep(0.05)
        return [2 * i for i in items]  # type: ignore[attr-defined]

    batcher: MicroBatcher[int, int] = MicroBatcher(
        "embedder", double, lambda _: 1, budget=100, max_wait_s=0.2, max_pending=8
    )
    try:
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(batcher.run, range(8))) == [2 * i for i in range(8)]
        assert max(sizes) > 1 and batcher.admitted == 0  # threads' items were batched together
        with pytest.raises(ValueError, match="bad item"):
            batcher.run(-1)
        assert batcher.run(5) == 10 and batcher.admitted == 0
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(batcher.run, 1, 6)  # weighs 6 of the 8 admitted items
            time.sleep(0.05)
            with pytest.raises(Overloaded, match="6 items queued, at most 8"):
                batcher.run(2, 3)
            assert first.result() == 2
    finally:
        batcher.close()


def test_every_error_kind_has_one_status() -> None:
    """The error table (`api/http/errors.py`): the most specific class decides, whatever the table's
    order; every 503 says when to retry."""
    from twostage.api.http.errors import ERRORS, Forbidden, Unauthorized, answer
    from twostage.retrieval.core.errors import (
        InputError,
        ModelLoading,
        NotFound,
        Overloaded,
        RemoteUnavailable,
        TooLarge,
    )
    from twostage.retrieval.store.vector_store import CollectionNotFound, InvalidCollectionName, StoreError

    assert answer(InputError("x")) == (400, {})
    assert answer(TooLarge("x")) == (413, {})  # an InputError, answered by its own entry
    assert answer(InvalidCollectionName("x")) == (400, {})  # a StoreError (409) and an InputError
    assert answer(StoreError("x")) == (409, {}) and answer(CollectionNotFound("x")) == (404, {})
    assert answer(NotFound("x")) == (404, {}) and answer(Forbidden("x")) == (403, {})
    assert answer(Unauthorized("x")) == (401, {"WWW-Authenticate": "Bearer"})
    assert answer(Overloaded("embedder", 1, 9, 8)) == (503, {"Retry-After": "1"})
    assert answer(RemoteUnavailable("down", retry_after_s=12)) == (503, {"Retry-After": "12"})
    assert answer(ModelLoading("x")) == (503, {"Retry-After": "5"})
    assert all(kind.__module__.startswith("twostage.") for kind in ERRORS)
