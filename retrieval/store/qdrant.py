"""`QdrantStore`: a Qdrant server or cluster through qdrant-client (or its local mode).

Collections are created with the configured `shard_number` / `replication_factor`; the
manifest lives in the collection's own metadata (so it moves with snapshots and needs no
side store), and aliases are Qdrant's native aliases, switched in one `update_collection_aliases`
call (delete + create applied atomically by the server).
"""

import functools
import json
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import grpc
import httpx
import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

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
    StoreUnavailable,
    check_collection_name,
    fixed_order,
    now_iso,
    recall_mode,
)

_SCHEMA: dict[FieldType, models.PayloadSchemaType] = {
    "keyword": models.PayloadSchemaType.KEYWORD,
    "integer": models.PayloadSchemaType.INTEGER,
    "float": models.PayloadSchemaType.FLOAT,
    "bool": models.PayloadSchemaType.BOOL,
}
_MANIFEST_KEY = "twostage_manifest"
_SCROLL_PAGE = 1024


_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def _translated(where: str, name: str, error: Exception) -> StoreError:
    """A qdrant-client, gRPC or HTTP failure as one line for the user: unreachable or refused."""
    if isinstance(error, grpc.RpcError):
        code, details = error.code(), error.details()
        kind = StoreUnavailable if code in _UNREACHABLE else StoreError
        return kind(f"Qdrant at {where} failed ({name}): {code.name}: {details}")
    if isinstance(error, UnexpectedResponse):
        body = error.content.decode(errors="replace")[:300]
        return StoreError(f"Qdrant at {where} refused {name}: HTTP {error.status_code} {body}")
    return StoreUnavailable(f"Qdrant at {where} is unreachable ({name}): {error}")


class _Guarded:
    """qdrant-client whose transport and server errors come out as `StoreError`s.

    Without this a server that is down or restarting surfaces as a gRPC/httpx traceback (a
    stack trace in the CLI, a 500 in the API); `StoreUnavailable` is a one-line exit in the
    CLI and a 503 in the API. A retrain that meets it fails with the deployed pair untouched
    (switching is its last step) and the next run removes the version it half-built.
    """

    def __init__(self, client: QdrantClient, where: str) -> None:
        self._client, self._where = client, where

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except (grpc.RpcError, ResponseHandlingException, UnexpectedResponse, httpx.TransportError,
                    ConnectionError, TimeoutError) as error:  # fmt: skip
                raise _translated(self._where, name, error) from error

        return cast(Callable[..., Any], call)


class QdrantStore:
    """`VectorStore` over qdrant-client: `url` for a server/cluster, `location` for local mode."""

    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        if settings.url:
            self.client = QdrantClient(
                url=settings.url,
                api_key=settings.api_key.get_secret_value() if settings.api_key else None,
                prefer_grpc=settings.prefer_grpc,
                grpc_port=settings.grpc_port,
                timeout=settings.timeout_s,
                # the client's version check runs in a thread and prints a warning that races the
                # one-line error of an unreachable server; compose pins a server one minor behind
                check_compatibility=False,
            )
            self.client = cast(QdrantClient, _Guarded(self.client, settings.url))
        elif settings.location == ":memory:":
            self.client = QdrantClient(location=":memory:")
        elif settings.location:
            self.client = QdrantClient(path=settings.location)
        else:
            raise StoreError(
                "store kind 'qdrant' needs TWOSTAGE_STORE__URL (or STORE__LOCATION for local mode)"
            )

    def create_collection(self, manifest: CollectionManifest) -> None:
        if self.client.collection_exists(manifest.collection):
            raise StoreError(f"collection {manifest.collection} already exists")
        self.client.create_collection(
            manifest.collection,
            vectors_config=models.VectorParams(size=manifest.dim, distance=models.Distance.COSINE),
            sparse_vectors_config=(
                {manifest.sparse.vector: models.SparseVectorParams(modifier=models.Modifier.IDF)}
                if manifest.sparse
                else None
            ),
            shard_number=self.settings.shard_number,
            replication_factor=self.settings.replication_factor,
            hnsw_config=models.HnswConfigDiff(
                m=self.settings.hnsw_m, ef_construct=self.settings.hnsw_ef_construct
            ),
            metadata={_MANIFEST_KEY: manifest.model_dump(mode="json")},
        )
        if self.settings.url:  # local mode has no payload indexes (and warns about them)
            for key, kind in manifest.payload_indexes.items():
                self.client.create_payload_index(manifest.collection, key, _SCHEMA[kind], wait=True)

    def delete_collection(self, collection: str) -> None:
        self.client.delete_collection(collection)

    def list_collections(self) -> list[str]:
        names = [c.name for c in self.client.get_collections().collections]
        return sorted(n for n in names if self._has_manifest(n))

    def _has_manifest(self, collection: str) -> bool:
        metadata = self.client.get_collection(collection).config.metadata or {}
        return _MANIFEST_KEY in metadata

    def read_manifest(self, collection: str) -> CollectionManifest:
        if not self.client.collection_exists(collection):
            raise CollectionNotFound(f"collection {collection} does not exist")
        metadata = self.client.get_collection(collection).config.metadata or {}
        if _MANIFEST_KEY not in metadata:
            raise StoreError(f"collection {collection} was not created by twostage (no manifest)")
        return CollectionManifest.model_validate(metadata[_MANIFEST_KEY])

    def write_manifest(self, manifest: CollectionManifest) -> None:
        manifest.updated_at = now_iso()
        self.client.update_collection(
            manifest.collection, metadata={_MANIFEST_KEY: manifest.model_dump(mode="json")}
        )

    def set_alias(self, alias: str, collection: str) -> None:
        check_collection_name(alias)
        if not self.client.collection_exists(collection):
            raise StoreError(f"cannot point alias {alias!r} at missing collection {collection}")
        operations: list[Any] = []
        if self.resolve_alias(alias) is not None:
            operations.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)))
        operations.append(
            models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name=collection, alias_name=alias)
            )
        )
        self.client.update_collection_aliases(change_aliases_operations=operations)

    def resolve_alias(self, alias: str) -> str | None:
        for entry in self.client.get_aliases().aliases:
            if entry.alias_name == alias:
                return entry.collection_name
        return None

    def upsert(self, collection: str, points: Sequence[Point]) -> None:
        if not points:
            return
        self.client.upsert(
            collection,
            points=[models.PointStruct(id=p.id, vector=_qdrant_vector(p), payload=p.payload) for p in points],
            wait=True,
        )

    def delete(self, collection: str, flt: Filter) -> None:
        self.client.delete(
            collection, points_selector=models.FilterSelector(filter=_qdrant_filter(flt)), wait=True
        )

    def set_payload(self, collection: str, flt: Filter, payload: dict[str, Any]) -> None:
        self.client.set_payload(collection, payload, points=_qdrant_filter(flt), wait=True)

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
        query_filter = _qdrant_filter(flt) if flt else None
        params = models.SearchParams(hnsw_ef=hnsw_ef or self.settings.hnsw_ef, exact=exact)
        dense = np.asarray(vector, dtype=np.float32).tolist() if vector is not None else None
        sparse_query = (
            models.SparseVector(indices=list(sparse.indices), values=list(sparse.values))
            if sparse is not None
            else None
        )
        if mode == "hybrid":
            assert fusion is not None
            response = self.client.query_points(
                collection,
                prefetch=[
                    models.Prefetch(query=dense, filter=query_filter, params=params, limit=limit),
                    models.Prefetch(
                        query=sparse_query, using=SPARSE_VECTOR, filter=query_filter, limit=limit
                    ),
                ],
                query=models.RrfQuery(rrf=models.Rrf(k=fusion.k, weights=list(fusion.weights))),
                query_filter=query_filter,
                limit=2 * limit,  # all the fused candidates, so ties at `limit` are cut in a fixed order
                with_payload=True,
            )
        else:
            response = self.client.query_points(
                collection,
                query=dense if dense is not None else sparse_query,
                using=None if dense is not None else SPARSE_VECTOR,
                query_filter=query_filter,
                search_params=params,
                limit=limit,
                with_payload=True,
            )
        return fixed_order(
            [Hit(str(p.id), float(p.score), dict(p.payload or {})) for p in response.points], limit
        )

    def scroll(
        self, collection: str, flt: Filter | None = None, fields: Sequence[str] | None = None
    ) -> Iterator[Record]:
        offset: Any = None
        while True:
            records, offset = self.client.scroll(
                collection,
                scroll_filter=_qdrant_filter(flt) if flt else None,
                limit=_SCROLL_PAGE,
                offset=offset,
                with_payload=list(fields) if fields is not None else True,
            )
            for r in records:
                yield Record(str(r.id), dict(r.payload or {}))
            if offset is None:
                return

    def count(self, collection: str, flt: Filter | None = None) -> int:
        return self.client.count(
            collection, count_filter=_qdrant_filter(flt) if flt else None, exact=True
        ).count

    def optimize(self, collection: str) -> None:
        """The server indexes in the background; nothing to do."""

    def registry_backend(self, name: str) -> "QdrantRegistryBackend":
        """Deployment records of collection `name` in this Qdrant, where every replica reads them."""
        return QdrantRegistryBackend(self.client, name)

    def close(self) -> None:
        self.client.close()


REGISTRY_COLLECTION = "twostage_registry"
_REGISTRY_NAMESPACE = uuid.UUID("6f1c3e0a-8f2d-4d55-9a51-2b7d0f1e9c44")


class QdrantRegistryBackend:
    """Registry documents as points of one small collection: id uuid5(name/key), the JSON in the payload.

    An upsert of one point is atomic in Qdrant, so a replica reads the old pointer or the new
    one, never half of either. No collection metadata is used: it would hold every record of
    every name in one document, rewritten on each switch.
    """

    def __init__(self, client: QdrantClient, name: str) -> None:
        self.client, self.name = client, name

    def _id(self, key: str) -> str:
        return str(uuid.uuid5(_REGISTRY_NAMESPACE, f"{self.name}/{key}"))

    def _ensure(self) -> None:
        if not self.client.collection_exists(REGISTRY_COLLECTION):
            self.client.create_collection(
                REGISTRY_COLLECTION, vectors_config=models.VectorParams(size=1, distance=models.Distance.DOT)
            )
            for field in ("name", "folder"):
                self.client.create_payload_index(REGISTRY_COLLECTION, field, models.PayloadSchemaType.KEYWORD)

    def read(self, key: str) -> dict[str, Any] | None:
        if not self.client.collection_exists(REGISTRY_COLLECTION):
            return None
        found = self.client.retrieve(REGISTRY_COLLECTION, [self._id(key)], with_payload=True)
        return json.loads(found[0].payload["value"]) if found and found[0].payload else None

    def write(self, key: str, value: dict[str, Any]) -> None:
        self._ensure()
        folder = key.rpartition("/")[0]
        payload = {"name": self.name, "key": key, "folder": folder, "value": json.dumps(value)}
        point = models.PointStruct(id=self._id(key), vector=[1.0], payload=payload)
        self.client.upsert(REGISTRY_COLLECTION, [point], wait=True)

    def delete(self, key: str) -> None:
        if self.client.collection_exists(REGISTRY_COLLECTION):
            selector = models.PointIdsList(points=[self._id(key)])
            self.client.delete(REGISTRY_COLLECTION, points_selector=selector, wait=True)

    def keys(self, folder: str) -> list[str]:
        if not self.client.collection_exists(REGISTRY_COLLECTION):
            return []
        where = models.Filter(must=[
            models.FieldCondition(key="name", match=models.MatchValue(value=self.name)),
            models.FieldCondition(key="folder", match=models.MatchValue(value=folder)),
        ])  # fmt: skip
        keys: list[str] = []
        offset: Any = None
        while True:
            points, offset = self.client.scroll(
                REGISTRY_COLLECTION,
                scroll_filter=where,
                limit=_SCROLL_PAGE,
                offset=offset,
                with_payload=["key"],
            )
            keys += [str(p.payload["key"]) for p in points if p.payload]
            if offset is None:
                return keys


def _qdrant_vector(point: Point) -> Any:
    dense = np.asarray(point.vector, dtype=np.float32).tolist()
    if point.sparse is None:
        return dense
    sparse = models.SparseVector(indices=list(point.sparse.indices), values=list(point.sparse.values))
    return {"": dense, SPARSE_VECTOR: sparse}


def _qdrant_condition(c: Condition) -> models.FieldCondition:
    if isinstance(c, Equals):
        return models.FieldCondition(key=c.key, match=models.MatchValue(value=c.value))
    if isinstance(c, AnyOf):
        return models.FieldCondition(key=c.key, match=models.MatchAny(any=list(c.values)))
    return models.FieldCondition(key=c.key, range=models.Range(gte=c.gte, gt=c.gt, lte=c.lte, lt=c.lt))


def _qdrant_filter(flt: Filter) -> models.Filter:
    return models.Filter(
        must=[_qdrant_condition(c) for c in flt.must] or None,
        must_not=[_qdrant_condition(c) for c in flt.must_not] or None,
    )
