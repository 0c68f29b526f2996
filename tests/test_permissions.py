"""Who may see what, enforced in every stage: scoped keys, document ACLs, on behalf of, the log's owners.

One real server (tiny Qwen3 models, the embedded store) over a corpus of three teams' documents
with overlapping and absent ACLs. Each test tries to get around the one check (`visible_filter`
through `Service.visible`, `Caller.require`): every route with every kind of key, filters that
try to widen the permission filter, delegation beyond the key, another key's searches and jobs,
a revoked key. A property test draws principals, filters and queries over dense, BM25 and
hybrid recall, with and without rerank, on the store and the search component themselves.
"""

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import Served, run_cli, serve
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from twostage.api.settings import Settings
from twostage.retrieval.access.caller import OPERATOR, Caller, visible_filter
from twostage.retrieval.access.keys import KEYS_FILE, KeyRing
from twostage.retrieval.access.principals import check_principal, parse_acl
from twostage.retrieval.core.errors import InputError, Unauthorized
from twostage.retrieval.ingest.chunker import Chunker
from twostage.retrieval.ingest.pipeline import ingest_corpus
from twostage.retrieval.ingest.readers import CorpusReader
from twostage.retrieval.models.loading import load_embedder
from twostage.retrieval.models.tiny import TinyModelPaths
from twostage.retrieval.models.tokens import Qwen3Tokens
from twostage.retrieval.search.two_stage import SearchQuery, search
from twostage.retrieval.store.collections import open_store
from twostage.retrieval.store.vector_store import AnyOf, Filter, Range

ADMIN = "admin-key"
TEAMS = {"eng": ["group:eng"], "sales": ["group:sales"], "shared": ["group:eng", "group:sales"],
         "alice": ["user:alice"], "public": ["public"], "none": None}  # fmt: skip
WORDS = ["debian", "package", "install", "network", "printer", "archive", "editor", "kernel"]


def corpus() -> list[dict[str, Any]]:
    """Four documents a team: a sentence each, with words every query shares."""
    rows = []
    for team, acl in TEAMS.items():
        for i in range(4):
            text = f"The {team} handbook {i}: how to {WORDS[i]} a {WORDS[i + 4]} on debian with the package tools."
            rows.append({"_id": f"{team}-{i}", "text": text, "team": team, **({"acl": acl} if acl else {})})
    return rows


def visible_ids(principals: set[str] | None, default_public: bool = False) -> set[str]:
    """The documents `principals` may see (None: all), computed from the corpus, not the code."""
    seen = set()
    for row in corpus():
        acl = row.get("acl")
        if (
            principals is None
            or acl == ["public"]
            or (acl is None and default_public)
            or (acl is not None and set(acl) & principals)
        ):
            seen.add(row["_id"])
    return seen


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModelPaths, model_cache: Path
) -> Iterator[tuple[Served, dict[str, str]]]:
    data = tmp_path_factory.mktemp("permissions")
    (data / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus()))
    settings = Settings(
        data_dir=data / "data", cache_dir=model_cache, device="cpu",
        embedder={"model": str(tiny_models.embedder)}, reranker={"model": str(tiny_models.reranker)},
        store={"payload_indexes": {"metadata.team": "keyword"}},
        api={"api_keys": [ADMIN], "batch_wait_ms": 1, "rerank": True},
    )  # fmt: skip
    store = open_store(settings)
    embedder = load_embedder(settings)
    reader = CorpusReader(str(data / "corpus.jsonl"), settings.ingest.max_document_chars)
    ingest_corpus(reader, store=store, embedder=embedder, settings=settings, collection="docs",
                  chunker=Chunker.for_embedder(Qwen3Tokens(), settings.chunker, embedder))  # fmt: skip
    store.close()
    ring = KeyRing(settings.data_dir)
    keys = {
        "eng": ring.add("eng", ["search"], ["group:eng"]),
        "sales": ring.add("sales", ["search", "feedback"], ["group:sales", "user:bob"]),
        "eng-feedback": ring.add("eng-feedback", ["search", "feedback"], ["group:eng"]),
        "feedback-only": ring.add("feedback-only", ["feedback"], ["group:eng"]),
        "ingest": ring.add("ingest", ["ingest"], ["group:eng"]),
        "other-collection": ring.add("other-collection", ["search"], ["group:eng"], collections=["other"]),
        "delegate": ring.add(
            "delegate", ["search"], ["group:eng", "group:sales", "user:alice"], delegate=True
        ),
    }
    for one in serve(settings):
        yield one, keys


def call(served: Served, method: str, path: str, key: str | None, body: Any = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, served.url + path, json=body, headers=headers, timeout=60)


def found(served: Served, key: str | None, **body: Any) -> set[str]:
    response = call(served, "POST", "/v1/search", key, {"query": "debian package handbook", "top_k": 200,
                                                        "top_n": 100, "group_by_doc": True, **body})  # fmt: skip
    assert response.status_code == 200, response.text
    return {h["doc_id"] for h in response.json()["hits"]}


@pytest.mark.parametrize("recall", ["dense", "sparse", "hybrid"])
def test_each_key_sees_exactly_its_documents_in_every_recall(
    served: tuple[Served, dict[str, str]], recall: str
) -> None:
    server, keys = served
    expected = {
        ADMIN: visible_ids(None),
        keys["eng"]: visible_ids({"group:eng"}),
        keys["sales"]: visible_ids({"group:sales", "user:bob"}),
        None: visible_ids(set()),  # anonymous: the public documents only
    }
    for key, ids in expected.items():
        for rerank in (False, True):
            assert found(server, key, recall=recall, rerank=rerank) == ids, (key, recall, rerank)
    assert visible_ids(set()) == {f"public-{i}" for i in range(4)}  # unassigned ones are admins' alone


def test_on_behalf_of_narrows_a_delegating_key_and_nothing_else_may_use_it(
    served: tuple[Served, dict[str, str]],
) -> None:
    server, keys = served
    alice = {"user": "alice", "groups": ["eng"]}
    assert found(server, keys["delegate"], on_behalf_of=alice) == visible_ids({"user:alice", "group:eng"})
    # a user the key does not cover sees only public documents: never more than the key
    assert found(server, keys["delegate"], on_behalf_of={"user": "mallory", "groups": ["hr", "finance"]}) == (
        visible_ids(set())
    )
    refused = call(server, "POST", "/v1/search", keys["eng"], {"query": "debian", "on_behalf_of": alice})
    assert refused.status_code == 403 and "--delegate" in refused.json()["detail"]
    for bad in ({"user": "*"}, {"groups": ["eng*"]}, {"user": "al ice"}, {"user": "a\u0000b"}):
        response = call(
            server, "POST", "/v1/search", keys["delegate"], {"query": "debian", "on_behalf_of": bad}
        )
        assert response.status_code in (400, 422), (bad, response.text)


def test_filters_cannot_widen_the_permission_filter(served: tuple[Served, dict[str, str]]) -> None:
    server, keys = served
    eng = visible_ids({"group:eng"})
    for flt in ({"acl": "group:sales"}, {"acl": {"any": ["group:sales", "public"]}}, {"acl.x": "y"},
                {"should": {"acl": "group:sales"}}, {"must_not": {"acl": "group:eng"}},
                {"metadata.acl": "group:sales"}):  # fmt: skip
        response = call(server, "POST", "/v1/search", keys["eng"], {"query": "debian", "filter": flt})
        assert response.status_code == 400, (flt, response.text)
    # a filter of the user's own is ANDed with the permissions: it narrows, never widens
    assert found(server, keys["eng"], filter={"metadata.team": {"any": ["eng", "sales"]}}) == {
        d for d in eng if d.startswith("eng")
    }


def test_scopes_keys_and_collections_on_every_route(served: tuple[Served, dict[str, str]]) -> None:
    server, keys = served
    routes = [("POST", "/v1/search", {"query": "debian"}), ("POST", "/v2/rerank", {"query": "q", "documents": ["a"]}),
              ("POST", "/v1/rerank", {"query": "q", "documents": ["a"]}), ("POST", "/v1/embeddings", {"input": "a"}),
              ("POST", "/rerank", {"query": "q", "texts": ["a"]}), ("POST", "/embed", {"inputs": "a"}),
              ("GET", "/info", None)]  # fmt: skip
    for method, path, body in routes:
        assert call(server, method, path, keys["eng"], body).status_code == 200, path
        denied = call(server, method, path, keys["feedback-only"], body)
        assert denied.status_code == 403 and "'search' scope" in denied.json()["detail"], path
        assert call(server, method, path, "ts_not-a-key", body).status_code == 401, path
    writes = [("POST", "/v1/feedback", {"events": []}, "feedback"), ("GET", "/v1/documents", None, "ingest"),
              ("DELETE", "/v1/documents/eng-0", None, "ingest"), ("GET", "/v1/jobs/x", None, "ingest"),
              ("POST", "/v1/retrain", {"pairs": [{"query": "q", "positive": "p"}]}, "admin"),
              ("POST", "/v1/calibrate", {"judgements": [{"query": "q", "doc_id": "d"}]}, "admin")]  # fmt: skip
    for method, path, body, scope in writes:
        anonymous = call(server, method, path, None, body)
        assert anonymous.status_code == 401, (path, anonymous.text)
        denied = call(server, method, path, keys["eng"], body)
        assert denied.status_code == 403 and f"'{scope}' scope" in denied.json()["detail"], path
    # the search log is read by its owners: anonymous none, a key its own searches, an admin all
    for path in ("/v1/feedback/stats", "/v1/quality"):
        assert call(server, "GET", path, None).status_code == 401
    other = call(server, "POST", "/v1/search", keys["other-collection"], {"query": "debian"})
    assert other.status_code == 403 and "collection 'docs'" in other.json()["detail"]


def test_the_search_log_has_owners(served: tuple[Served, dict[str, str]]) -> None:
    server, keys = served
    mine = call(
        server, "POST", "/v1/search", keys["eng-feedback"], {"query": "eng log owner question"}
    ).json()
    theirs = call(server, "POST", "/v1/search", keys["sales"], {"query": "sales private question"}).json()
    click = {"search_id": theirs["search_id"], "id": theirs["hits"][0]["id"], "event": "click"}
    stolen = call(server, "POST", "/v1/feedback", keys["eng-feedback"], {"events": [click]})
    assert stolen.status_code == 404  # another key's search: answered as unknown, its id not confirmed
    assert call(server, "POST", "/v1/feedback", keys["sales"], {"events": [click]}).json()["accepted"] == 1
    own = {"search_id": mine["search_id"], "id": mine["hits"][0]["id"], "event": "click"}
    assert (
        call(server, "POST", "/v1/feedback", keys["eng-feedback"], {"events": [own]}).json()["accepted"] == 1
    )
    assert call(server, "POST", "/v1/feedback", ADMIN, {"events": [own]}).json() == {
        "accepted": 0,
        "duplicates": 1,
    }
    stats = call(server, "GET", "/v1/feedback/stats", keys["eng-feedback"]).json()
    everything = call(server, "GET", "/v1/feedback/stats", ADMIN).json()
    assert stats["searches"] == 1 and everything["searches"] > stats["searches"]
    quality = call(server, "GET", "/v1/quality", keys["sales"]).json()
    logged = {s.search_id: s for s in server.service.traffic.searches()}  # type: ignore[union-attr]
    sales = sum(1 for s in logged.values() if s.key == "sales")
    assert quality["feedback"]["searches"] == sales < len(logged)  # the sales key's own searches
    assert quality["deployments"] == [] or all(d["comparison"] is None for d in quality["deployments"])
    assert logged[mine["search_id"]].key == "eng-feedback"
    assert logged[mine["search_id"]].principals == ("group:eng",)
    delegated = call(server, "POST", "/v1/search", keys["delegate"],
                     {"query": "debian", "on_behalf_of": {"user": "alice", "groups": ["eng"]}}).json()  # fmt: skip
    assert logged_search(server, delegated["search_id"]).on_behalf_of == "alice"
    assert logged_search(server, delegated["search_id"]).principals == ("group:eng", "user:alice")


def logged_search(server: Served, search_id: str) -> Any:
    assert server.service.traffic is not None
    return server.service.traffic.search(search_id)


def test_documents_jobs_and_deletion_are_bounded_by_the_key(served: tuple[Served, dict[str, str]]) -> None:
    server, keys = served
    listed = call(server, "GET", "/v1/documents?limit=1000", keys["ingest"]).json()
    assert {d["id"] for d in listed["documents"]} == visible_ids({"group:eng"})
    assert call(server, "DELETE", "/v1/documents/sales-0", keys["ingest"]).status_code == 404
    assert "sales-0" in found(server, ADMIN)  # still there
    sent = {"documents": [
        {"id": "sales-1", "text": "overwritten by eng"},  # another team's document: not replaced
        {"id": "eng-new", "text": "a new eng page about the debian package archive"},  # the key's own ACL
        {"id": "eng-public", "text": "an eng page for everyone", "acl": ["public"]},
        {"id": "eng-grab", "text": "granting another team", "acl": ["group:sales"]},  # not the key's to grant
    ]}  # fmt: skip
    response = call(server, "POST", "/v1/documents", keys["ingest"], sent).json()
    assert response["documents"] == 2 and len(response["rejected"]) == 2
    assert all("not permitted" in r for r in response["rejected"])
    job = wait_for_job(server, keys["ingest"], response["job_id"])
    assert job["status"] == "succeeded" and job["owner"] == "ingest"
    assert (
        call(server, "GET", f"/v1/jobs/{response['job_id']}", keys["eng"]).status_code == 403
    )  # no ingest scope
    assert call(server, "GET", f"/v1/jobs/{response['job_id']}", ADMIN).status_code == 200
    assert {"eng-new", "eng-public"} <= found(server, keys["eng"]) and "eng-new" not in found(
        server, keys["sales"]
    )
    assert "eng-public" in found(server, None)
    assert "overwritten" not in json.dumps(
        call(server, "POST", "/v1/search", ADMIN, {"query": "overwritten"}).json()
    )
    assert call(server, "DELETE", "/v1/documents/eng-new", keys["ingest"]).status_code == 200


def wait_for_job(server: Served, key: str, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job: dict[str, Any] = call(server, "GET", f"/v1/jobs/{job_id}", key).json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


def test_a_revoked_key_stops_working_within_a_second(served: tuple[Served, dict[str, str]]) -> None:
    server, _ = served
    ring = KeyRing(server.settings.data_dir)
    key = ring.add("short-lived", ["search"], ["group:eng"])
    assert call(server, "POST", "/v1/search", key, {"query": "debian"}).status_code == 200
    ring.revoke("short-lived")
    revoked = time.monotonic()
    while call(server, "POST", "/v1/search", key, {"query": "debian"}).status_code != 401:
        assert time.monotonic() - revoked < 1.0, "a revoked key still works after a second"
        time.sleep(0.05)
    stored = (server.settings.data_dir / KEYS_FILE).read_text()
    assert key not in stored and "ts_" not in stored  # hashes only


def test_no_server_path_in_responses(served: tuple[Served, dict[str, str]]) -> None:
    server, keys = served
    answer = call(server, "POST", "/v1/search", keys["eng"], {"query": "debian", "rerank": True}).json()
    models = [answer["embedder"], answer["reranker"],
              call(server, "POST", "/v1/rerank", keys["eng"], {"query": "q", "documents": ["a"]}).json()["model"],
              call(server, "POST", "/v1/embeddings", keys["eng"], {"input": "a"}).json()["model"],
              call(server, "GET", "/info", keys["eng"]).json()["model_id"]]  # fmt: skip
    for shown in models:
        assert not shown.startswith("/") and "/tmp" not in shown and "@" in shown, shown


def test_principals_and_acls_are_checked() -> None:
    assert check_principal("user:alice@example.com") == "user:alice@example.com"
    for bad in (
        "alice",
        "group:*",
        "group:eng*",
        "user:",
        "user:a b",
        "role:x",
        "user:a\nb",
        "user:\u0000",
        "user:alice\n",
    ):
        with pytest.raises(InputError):
            check_principal(bad)
    assert parse_acl("group:eng, user:bob") == ("group:eng", "user:bob")
    for bad_acl in ([], ["public", "group:eng"], ["*"], "", [1]):
        with pytest.raises(InputError):
            parse_acl(bad_acl)


def test_acl_only_changes_rewrite_payloads_without_re_embedding(
    tmp_path: Path, tiny_models: TinyModelPaths, model_cache: Path
) -> None:
    settings = Settings(data_dir=tmp_path / "data", cache_dir=model_cache, device="cpu",
                        embedder={"model": str(tiny_models.embedder)})  # fmt: skip
    folder = tmp_path / "handbooks"
    (folder / "eng").mkdir(parents=True)
    (folder / "eng" / "build.md").write_text("# Build\n\nHow the eng team builds debian packages.\n")
    (folder / "hr.md").write_text("# Holidays\n\nHow many days off everyone has.\n")
    (folder / ".twostage-acl.toml").write_text('"eng/*" = ["group:eng"]\n"*" = ["group:hr"]\n')
    embedder = load_embedder(settings)
    calls = []
    original = embedder.embed_documents

    def counted(texts: list[str]) -> Any:
        calls.append(len(texts))
        return original(texts)

    embedder.embed_documents = counted  # type: ignore[method-assign]
    store = open_store(settings)
    try:

        def ingest(acl: str | None = None) -> Any:
            reader = CorpusReader(str(folder), 10**6, acl=parse_acl(acl) if acl else None)
            return ingest_corpus(reader, store=store, embedder=embedder, settings=settings, collection="docs",
                                 chunker=Chunker.for_embedder(Qwen3Tokens(), settings.chunker, embedder))  # fmt: skip

        def acls() -> dict[str, list[str]]:
            return {
                r.payload["doc_id"]: r.payload["acl"]
                for r in store.scroll("docs__v1", None, ["doc_id", "acl"])
            }

        first = ingest()
        assert first.new == 2 and sum(calls) >= 2
        assert acls() == {"eng/build.md": ["group:eng"], "hr.md": ["group:hr"]}
        calls.clear()
        (folder / ".twostage-acl.toml").write_text('"eng/*" = ["group:eng", "group:sales"]\n')
        again = ingest("public")  # hr.md: no glob matches now, so --acl applies
        assert calls == [] and again.unchanged == 2 and again.acl_updated == 2 and again.chunks_embedded == 0
        assert acls() == {"eng/build.md": ["group:eng", "group:sales"], "hr.md": ["public"]}
        (folder / ".twostage-acl.toml").write_text('"*" = ["group:*"]\n')
        with pytest.raises(InputError, match="group:"):
            CorpusReader(str(folder), 10**6)
    finally:
        store.close()


PRINCIPALS = ["group:eng", "group:sales", "user:alice", "user:bob", "tenant:acme"]


def permitted_chunks(
    server: Served, principals: set[str], default_public: bool, teams: set[str] | None, max_chunk: int | None,
    words: set[str] | None,
) -> set[str]:  # fmt: skip
    """The oracle: chunk ids the principals may see, by the ACL rules evaluated here in Python on the
    stored payloads (not by the engine's filter), among those matching the user's filter (and, for
    BM25, sharing a word with the query)."""
    assert server.service.store is not None
    target = server.service.deployment("docs").collection
    chunks = set()
    for record in server.service.store.scroll(target, None, ["acl", "metadata", "chunk_index", "text"]):
        acl, p = set(record.payload.get("acl") or []), record.payload
        allowed = "public" in acl or (default_public and "unassigned" in acl) or bool(acl & principals)
        team = (p.get("metadata") or {}).get("team")
        if (allowed and (teams is None or team in teams) and (max_chunk is None or p["chunk_index"] <= max_chunk)
                and (words is None or words & set(str(p["text"]).lower().replace(".", " ").split()))):  # fmt: skip
            chunks.add(record.id)
    return chunks


@hypothesis_settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    principals=st.sets(st.sampled_from(PRINCIPALS), max_size=4),
    default_public=st.booleans(),
    teams=st.none() | st.sets(st.sampled_from(list(TEAMS)), min_size=1),
    max_chunk=st.none() | st.integers(0, 2),
    query=st.sampled_from(["debian package", "printer network", "archive editor kernel", "handbook"]),
    recall=st.sampled_from(["dense", "sparse", "hybrid"]),
    rerank=st.booleans(),
    top_n=st.integers(1, 12),
)
def test_no_hit_outside_the_permitted_set_and_top_n_when_there_are_enough(
    served: tuple[Served, dict[str, str]], principals: set[str], default_public: bool, teams: set[str] | None,
    max_chunk: int | None, query: str, recall: str, rerank: bool, top_n: int,
) -> None:  # fmt: skip
    server, _ = served
    assert server.service.store is not None
    must: list[Any] = [] if teams is None else [AnyOf("metadata.team", tuple(sorted(teams)))]
    if max_chunk is not None:
        must.append(Range("chunk_index", lte=max_chunk))
    user = Filter(must=tuple(must)) if must else None
    caller = Caller("property", frozenset({"search"}), frozenset(principals))
    request = SearchQuery(query, top_k=40, top_n=top_n, filter=visible_filter(caller, user, default_public),
                          recall=recall, rerank=rerank)  # type: ignore[arg-type]  # fmt: skip
    result = search(server.service.deployment("docs"), server.service.store, request, server.settings)
    words = set(query.split()) if recall == "sparse" else None
    permitted = permitted_chunks(server, principals, default_public, teams, max_chunk, words)
    assert {h.id for h in result.hits} <= permitted_chunks(
        server, principals, default_public, teams, max_chunk, None
    )
    if len(permitted) >= top_n:  # enough permitted matches: exactly top_n, however few the caller may see
        assert len(result.hits) == top_n, (len(permitted), recall)
    # the operator (a CLI on the store itself) sees everything: the same function adds no condition
    assert visible_filter(OPERATOR, user, default_public) == user


def test_anonymous_callers_follow_the_access_settings(tmp_path: Path) -> None:
    """No key at all: open as before keys. Keys with principals: anonymous sees public documents,
    or nothing with access.anonymous=deny; keys_for_reads refuses anonymous searches either way."""
    from twostage.api.runtime.service import Service

    def anonymous(**access: Any) -> Caller:
        settings = Settings(data_dir=tmp_path / "data", access=access)
        return Service(settings).caller(None)

    assert anonymous().open and anonymous().principals is None  # nothing configured: a local service
    KeyRing(tmp_path / "data").add("team", ["search"], ["group:eng"])
    public = anonymous()
    assert public.principals == frozenset() and not public.open
    public.require("search")
    with pytest.raises(Unauthorized):
        anonymous(anonymous="deny").require("search")
    with pytest.raises(Unauthorized):
        public.require("feedback")


def test_pairs_and_calibration_from_feedback_read_one_collection(tmp_path: Path) -> None:
    from twostage.retrieval.traffic.log import Event, LoggedSearch, TrafficLog, new_search_id
    from twostage.retrieval.traffic.settings import FeedbackSettings
    from twostage.training.feedback_pairs import collection_traffic

    log = TrafficLog(tmp_path, FeedbackSettings())
    now = time.time()
    ids = {}
    for collection in ("docs__v1", "docs__v2", "hr__v1", "docs2__v1"):
        ids[collection] = new_search_id(now)
        log.log_search(LoggedSearch(ids[collection], now, "q", "h", None, None, collection, None, ()))
        log.record([Event(f"e-{collection}", ids[collection], None, None, "thumbs_up", None, now)], now)
    searches, events = collection_traffic(log, "docs")
    assert {s.collection for s in searches} == {"docs__v1", "docs__v2"}
    assert {e.search_id for e in events} == {ids["docs__v1"], ids["docs__v2"]}
    log.close()


def test_uploads_carry_the_acl_form_field_and_keys_are_managed_from_the_cli(
    served: tuple[Served, dict[str, str]], tmp_path: Path
) -> None:
    server, keys = served
    files = [("file", ("roadmap.md", b"# Roadmap\n\nThe eng roadmap for the debian package archive.\n"))]
    response = httpx.post(server.url + "/v1/documents", files=files, data={"acl": "group:eng"},
                          headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)  # fmt: skip
    assert response.status_code == 202, response.text
    assert wait_for_job(server, ADMIN, response.json()["job_id"])["status"] == "succeeded"
    assert "roadmap.md" in found(server, keys["eng"]) and "roadmap.md" not in found(server, keys["sales"])
    bad = httpx.post(server.url + "/v1/documents", files=files, data={"acl": "group:*"},
                     headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)  # fmt: skip
    assert bad.status_code == 400 and "group:*" in bad.json()["detail"]

    env = {**os.environ, "TWOSTAGE_DATA_DIR": str(server.settings.data_dir)}
    made = run_cli(["keys", "add", "cli-made", "--scopes", "search", "--principals", "group:sales"], env)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert found(server, key) == found(server, keys["sales"]) - {"roadmap.md"}
    listed = json.loads(run_cli(["keys", "list", "--json"], env).stdout)
    row = next(r for r in listed if r["name"] == "cli-made")
    assert row["scopes"] == ["search"] and row["principals"] == ["group:sales"] and "hash" not in row
    assert key not in json.dumps(listed)
    wildcard = run_cli(["keys", "add", "x", "--scopes", "search", "--principals", "group:*"], env)
    assert wildcard.returncode == 2 and "invalid principal 'group:*'" in wildcard.stderr
    assert run_cli(["keys", "revoke", "cli-made"], env).returncode == 0
    deadline = time.monotonic() + 1.0
    while call(server, "POST", "/v1/search", key, {"query": "debian"}).status_code != 401:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_server_paths_are_shown_by_name_routes_and_urls_stay(tmp_path: Path) -> None:
    from twostage.retrieval.models.source import shown_model, shown_paths, shown_text

    data = tmp_path / "data"
    assert (
        shown_model(f"{data}/registry/docs/models/d2/embedder@ab12", data)
        == "registry/docs/models/d2/embedder@ab12"
    )
    assert shown_model("/tmp/elsewhere/qwen3-reranker-tiny@ab12", data) == "qwen3-reranker-tiny@ab12"
    assert shown_model("Qwen/Qwen3-Reranker-0.6B@ab12") == "Qwen/Qwen3-Reranker-0.6B@ab12"  # a hub id
    message = f"model '{tmp_path}/m/x' failed (GET /v1/jobs/7, http://host:8000/v1/search)"
    assert shown_text(message, data) == "model 'x' failed (GET /v1/jobs/7, http://host:8000/v1/search)"
    assert shown_paths({"run": [f"{data}/registry/docs/runs/r1"], "n": 3}, data) == {
        "run": ["registry/docs/runs/r1"],
        "n": 3,
    }
