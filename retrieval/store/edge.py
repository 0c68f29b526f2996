"""`EdgeStore`: the embedded default, Qdrant Edge shards on disk under the data directory.

Layout (one directory per collection version, an atomically replaced pointer per alias):

    DATA/collections/NAME__vN/shard/          the EdgeShard
    DATA/collections/NAME__vN/manifest.json   what built it
    DATA/collections/NAME__vN/lock            flock + pid of the process that has it open
    DATA/collections/NAME.alias.json          {"collection": "NAME__vN", ...}

Only one process may open a shard (a second open even breaks the first one's flush), so a
shard is opened behind an exclusive `flock` on its lock file: the kernel drops it when the
owner dies, even by `kill -9`, so there are no stale locks to clean up, and a second process
gets a clear error naming the owner's pid instead of a damaged index.
"""

import json
import shutil
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import qdrant_edge as qe

from twostage.retrieval.store.locks import PidLock, write_json_atomic
from twostage.retrieval.store.settings import StoreSettings
from twostage.retrieval.store.sparse import SPARSE_VECTOR, Rrf, SparseVec
from twostage.retrieval.store.vector_store import (
    AnyOf,
    CollectionManifest,
    CollectionNotFound,
    Condition,
    Equals,
    FieldType,
    Filter,
    Hit,
    Point,
    Record,
    StoreError,
    check_collection_name,
    fixed_order,
    now_iso,
    parse_versioned_name,
    recall_mode,
)

_SCHEMA: dict[FieldType, qe.PayloadSchemaType] = {
    "keyword": qe.PayloadSchemaType.Keyword,
    "integer": qe.PayloadSchemaType.Integer,
    "float": qe.PayloadSchemaType.Float,
    "bool": qe.PayloadSchemaType.Bool,
}
_SCROLL_PAGE = 1024


def _shard_lock(path: Path) -> PidLock:
    return PidLock(
        path,
        f"index {path.parent} is in use by pid {{pid}}; stop the server or work through it "
        "(twostage ingest|retrain --server URL)",
    )


class EdgeStore:
    """`VectorStore` over Qdrant Edge. Shards open lazily and stay open until `close()`."""

    def __init__(self, data_dir: Path, settings: StoreSettings | None = None) -> None:
        self.root = Path(data_dir) / "collections"
        self.settings = settings or StoreSettings()
        self._shards: dict[str, tuple[qe.EdgeShard, PidLock]] = {}
        # Writers (upsert, delete, optimize, open, close) take this lock one at a time; reads
        # (search, scroll, count) do not: the engine runs queries alongside upserts, measured by
        # bench/edge_concurrency.py (10,657 queries, max 29.7 ms, during 20 upserts of 1,000
        # points). `optimize()` still stalls them (it holds the GIL): see `ingest.optimize_after`.
        self._mutex = threading.RLock()

    # -- collections and aliases ---------------------------------------------------------

    def _dir(self, collection: str) -> Path:
        if parse_versioned_name(collection) is None:
            raise StoreError(f"{collection!r} is not a collection version (NAME__vN)")
        return self.root / collection

    def create_collection(self, manifest: CollectionManifest) -> None:
        path = self._dir(manifest.collection)
        if (path / "manifest.json").exists():
            raise StoreError(f"collection {manifest.collection} already exists")
        path.mkdir(parents=True, exist_ok=True)
        lock = _shard_lock(path / "lock")
        lock.acquire()
        try:
            if (path / "shard").exists():  # a create that died before writing its manifest
                shutil.rmtree(path / "shard")
            hnsw = qe.HnswIndexConfig(
                m=self.settings.hnsw_m,
                ef_construct=self.settings.hnsw_ef_construct,
                full_scan_threshold=10000,
            )
            sparse = (
                {manifest.sparse.vector: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)}
                if manifest.sparse
                else None
            )
            config = qe.EdgeConfig(
                vectors=qe.EdgeVectorParams(size=manifest.dim, distance=qe.Distance.Cosine),
                sparse_vectors=sparse,
                hnsw_config=hnsw,
            )
            shard = qe.EdgeShard.create(str(path / "shard"), config)
            for key, kind in manifest.payload_indexes.items():
                shard.update(qe.UpdateOperation.create_field_index(key, _SCHEMA[kind]))
            shard.flush()
        except Exception:
            lock.release()
            raise
        with self._mutex:
            self._shards[manifest.collection] = (shard, lock)
        write_json_atomic(path / "manifest.json", manifest.model_dump(mode="json"))

    def delete_collection(self, collection: str) -> None:
        path = self._dir(collection)
        with self._mutex:
            self._close_one(collection)
            if not path.exists():
                return
            lock = _shard_lock(path / "lock")
            lock.acquire()  # refuse to delete what another process has open
            try:
                shutil.rmtree(path)
            finally:
                lock.release()

    def list_collections(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "manifest.json").exists())

    def read_manifest(self, collection: str) -> CollectionManifest:
        path = self._dir(collection) / "manifest.json"
        if not path.exists():
            raise CollectionNotFound(f"collection {collection} does not exist")
        return CollectionManifest.model_validate_json(path.read_text(encoding="utf-8"))

    def write_manifest(self, manifest: CollectionManifest) -> None:
        manifest.updated_at = now_iso()
        write_json_atomic(self._dir(manifest.collection) / "manifest.json", manifest.model_dump(mode="json"))

    def set_alias(self, alias: str, collection: str) -> None:
        check_collection_name(alias)
        if collection not in self.list_collections():
            raise StoreError(f"cannot point alias {alias!r} at missing collection {collection}")
        previous = self.resolve_alias(alias)
        record = {"collection": collection, "previous": previous, "switched_at": now_iso()}
        write_json_atomic(self.root / f"{alias}.alias.json", record)

    def resolve_alias(self, alias: str) -> str | None:
        path = self.root / f"{check_collection_name(alias)}.alias.json"
        if not path.exists():
            return None
        collection: str = json.loads(path.read_text(encoding="utf-8"))["collection"]
        return collection

    # -- points --------------------------------------------------------------------------

    def _shard(self, collection: str) -> qe.EdgeShard:
        with self._mutex:
            if collection not in self._shards:
                path = self._dir(collection)
                if not (path / "manifest.json").exists():
                    raise CollectionNotFound(f"collection {collection} does not exist")
                lock = _shard_lock(path / "lock")
                lock.acquire()
                try:
                    shard = qe.EdgeShard.load(str(path / "shard"))
                except Exception as exc:
                    lock.release()
                    raise StoreError(f"cannot open {path / 'shard'}: {exc}") from exc
                self._shards[collection] = (shard, lock)
            return self._shards[collection][0]

    def upsert(self, collection: str, points: Sequence[Point]) -> None:
        if not points:
            return
        batch = [qe.Point(p.id, _edge_vector(p), p.payload) for p in points]
        with self._mutex:
            self._shard(collection).update(qe.UpdateOperation.upsert_points(batch))

    def delete(self, collection: str, flt: Filter) -> None:
        with self._mutex:
            self._shard(collection).update(qe.UpdateOperation.delete_points_by_filter(_edge_filter(flt)))

    def set_payload(self, collection: str, flt: Filter, payload: dict[str, Any]) -> None:
        with self._mutex:
            self._shard(collection).update(
                qe.UpdateOperation.set_payload_by_filter(_edge_filter(flt), payload)
            )

    def search(
        self,
        collection: str,
        vector: np.ndarray | None,
        limit: int,
        flt: Filter | None = None,
        hnsw_ef: int | None = None,
        exact: bool = False,
        sparse: SparseVec | None = None,
        fusion: Rrf | None = None,
    ) -> list[Hit]:
        mode = recall_mode(vector, sparse, fusion)
        edge_filter = _edge_filter(flt) if flt else None
        params = qe.SearchParams(hnsw_ef=hnsw_ef or self.settings.hnsw_ef, exact=exact)
        dense_query = sparse_query = None
        if vector is not None:
            dense_query = qe.Query.Nearest(np.asarray(vector, dtype=np.float32).tolist())
        if sparse is not None:
            vec = qe.SparseVector(list(sparse.indices), list(sparse.values))
            sparse_query = qe.Query.Nearest(vec, using=SPARSE_VECTOR)
        if mode == "hybrid":
            assert dense_query is not None and sparse_query is not None and fusion is not None
            request = qe.QueryRequest(
                limit=2 * limit,  # all the fused candidates, so ties at `limit` are cut in a fixed order
                prefetches=[
                    qe.Prefetch(limit=limit, query=dense_query, filter=edge_filter, params=params),
                    qe.Prefetch(limit=limit, query=sparse_query, filter=edge_filter),
                ],
                query=qe.Fusion.Rrf(k=fusion.k, weights=list(fusion.weights)),  # type: ignore[arg-type]
                filter=edge_filter,
                with_payload=True,
            )
        else:
            request = qe.QueryRequest(
                limit=limit,
                query=dense_query or sparse_query,
                filter=edge_filter,
                with_payload=True,
                params=params,
            )
        found = self._shard(collection).query(request)  # reads skip the writers' lock: see below
        return fixed_order([Hit(str(p.id), float(p.score), dict(p.payload or {})) for p in found], limit)

    def scroll(
        self, collection: str, flt: Filter | None = None, fields: Sequence[str] | None = None
    ) -> Iterator[Record]:
        offset: Any = None
        while True:
            request = qe.ScrollRequest(
                offset=offset,
                limit=_SCROLL_PAGE,
                filter=_edge_filter(flt) if flt else None,
                with_payload=list(fields) if fields is not None else True,
            )
            records, offset = self._shard(collection).scroll(request)
            for r in records:
                yield Record(str(r.id), dict(r.payload or {}))
            if offset is None:
                return

    def count(self, collection: str, flt: Filter | None = None) -> int:
        request = qe.CountRequest(exact=True, filter=_edge_filter(flt) if flt else None)
        return int(self._shard(collection).count(request))

    def optimize(self, collection: str) -> None:
        with self._mutex:
            shard = self._shard(collection)
            shard.optimize()
            shard.flush()

    def _close_one(self, collection: str) -> None:
        entry = self._shards.pop(collection, None)
        if entry is not None:
            shard, lock = entry
            try:
                shard.flush()
                shard.close()
            finally:
                lock.release()

    def close(self) -> None:
        with self._mutex:
            for collection in list(self._shards):
                self._close_one(collection)


def _edge_vector(point: Point) -> Any:
    dense = np.asarray(point.vector, dtype=np.float32).tolist()
    if point.sparse is None:
        return dense
    return {"": dense, SPARSE_VECTOR: qe.SparseVector(list(point.sparse.indices), list(point.sparse.values))}


def _edge_condition(c: Condition) -> qe.FieldCondition:
    if isinstance(c, Equals):
        return qe.FieldCondition(c.key, match=qe.MatchValue(c.value))
    if isinstance(c, AnyOf):
        return qe.FieldCondition(c.key, match=qe.MatchAny(list(c.values)))  # type: ignore[arg-type]
    return qe.FieldCondition(c.key, range=qe.RangeFloat(gte=c.gte, gt=c.gt, lte=c.lte, lt=c.lt))


def _edge_filter(flt: Filter) -> qe.Filter:
    return qe.Filter(
        must=[_edge_condition(c) for c in flt.must] or None,
        must_not=[_edge_condition(c) for c in flt.must_not] or None,
    )
