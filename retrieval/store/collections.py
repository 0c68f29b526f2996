"""Versioned collections: `NAME__vN` holds the data, the alias `NAME` points at the live one.

Policy only, over any `VectorStore`: which version an ingest writes into, when a new one is
made, and the refusal to mix embedders. The alias switch itself is the store's atomic
`set_alias`; previous versions are kept (for rollback) until deleted explicitly.
"""

from twostage.retrieval.models.embedder import Embedder
from twostage.retrieval.models.numerics import INT8_FUSED_PATH, INT8_PATH
from twostage.retrieval.models.settings import NumericsSettings
from twostage.retrieval.store.settings import ChunkerSettings, IndexSettings
from twostage.retrieval.store.sparse import SparseManifest
from twostage.retrieval.store.vector_store import (
    CORE_INDEXES,
    CollectionManifest,
    CollectionNotFound,
    FieldType,
    StoreError,
    VectorStore,
    check_collection_name,
    parse_versioned_name,
    versioned_name,
)

TOKENIZER = "qwen3-tiktoken"


def open_store(settings: IndexSettings) -> VectorStore:
    """The configured store (its shards open lazily, on first use)."""
    if settings.store.kind == "embedded":
        from twostage.retrieval.store.edge import EdgeStore

        return EdgeStore(settings.data_dir, settings.store)
    from twostage.retrieval.store.qdrant import QdrantStore

    return QdrantStore(settings.store)


def chunker_record(chunker: ChunkerSettings, embedder: Embedder) -> dict[str, int | str]:
    """How a collection was chunked: the window in Qwen3 tokens, and the embedder's own maximum
    (in its tokens) that no chunk exceeds (`Chunker.for_embedder`)."""
    return {
        "tokens": chunker.tokens,
        "overlap": chunker.overlap,
        "tokenizer": TOKENIZER,
        "embedder_max_tokens": embedder.max_length,
    }


def versions(store: VectorStore, name: str) -> list[int]:
    """Version numbers of `name` that exist, ascending."""
    found = [parse_versioned_name(c) for c in store.list_collections()]
    return sorted(v[1] for v in found if v is not None and v[0] == name)


def active_manifest(store: VectorStore, name: str) -> CollectionManifest:
    """The manifest of the version the alias `name` points at; a clear error when there is none."""
    collection = store.resolve_alias(check_collection_name(name))
    if collection is None:
        raise CollectionNotFound(
            f"collection {name!r} does not exist yet; run `twostage ingest PATH --collection {name}`"
        )
    return store.read_manifest(collection)


NUMERIC_MIN_COSINE = NumericsSettings().embedder_min_cosine


def embedder_mismatch(
    manifest: CollectionManifest, embedder: Embedder, min_cosine: float = NUMERIC_MIN_COSINE
) -> str | None:
    """Why `embedder` cannot query or write the version `manifest` describes (None: it can).

    The same model on another numeric path (built in float32, queried in bfloat16 or int8) may
    query it only when its probe vectors keep a cosine of at least `min_cosine`
    (`numerics.embedder_min_cosine`) with those recorded at build time.
    """
    if manifest.embedder != embedder.model_id or manifest.dim != embedder.dim:
        return (
            f"collection {manifest.collection} was built with embedder {manifest.embedder} "
            f"(dim {manifest.dim}); this one is {embedder.model_id} (dim {embedder.dim})"
        )
    built, now = manifest.embedder_fingerprint, embedder.fingerprint
    path = embedder.numerics
    if built is not None and now is not None and manifest.embedder_numerics not in (None, path):
        cosine = built.min_cosine(now)
        if cosine < min_cosine:
            rebuild = {
                INT8_PATH: "TWOSTAGE_EMBEDDER__QUANTIZE=int8",
                INT8_FUSED_PATH: (
                    "TWOSTAGE_EMBEDDER__QUANTIZE=int8 TWOSTAGE_NUMERICS__INT8_ENGINE=onednn-fused"
                ),
            }.get(
                manifest.embedder_numerics or "",
                f"TWOSTAGE_EMBEDDER__QUANTIZE=none TWOSTAGE_DTYPE={manifest.embedder_numerics}",
            )
            return (
                f"collection {manifest.collection} was embedded in {manifest.embedder_numerics}; this "
                f"process runs {manifest.embedder} in {path}, whose probe vectors stray from those "
                f"(cosine {cosine:.4f} < numerics.embedder_min_cosine {min_cosine}): run the embedder as "
                f"it was built ({rebuild})"
            )
        return None
    if built is not None and (now is None or not built.matches(now)):
        return (
            f"collection {manifest.collection} was built by {manifest.embedder} answering with probe "
            f"fingerprint {built.sha256[:12]}; it now answers {now.sha256[:12] if now else 'none'}: "
            "another model is behind that name or URL"
        )
    return None


def require_same_builder(
    manifest: CollectionManifest,
    embedder: Embedder,
    chunker: ChunkerSettings,
    min_cosine: float = NUMERIC_MIN_COSINE,
) -> None:
    """Refuse to write (or query) a version with an embedder or chunker other than its own."""
    mismatch = embedder_mismatch(manifest, embedder, min_cosine)
    if mismatch is not None:
        raise StoreError(
            f"{mismatch}. Configure TWOSTAGE_EMBEDDER__MODEL={manifest.embedder_model} (the model that "
            "built it), or build a new version with `twostage ingest --new-version`"
        )
    now = chunker_record(chunker, embedder)
    # collections from before the embedder cap record no "embedder_max_tokens": compare the rest
    if manifest.chunker != {k: v for k, v in now.items() if k in manifest.chunker}:
        raise StoreError(
            f"collection {manifest.collection} was chunked with {manifest.chunker}; the settings say "
            f"{now}. Re-chunking needs a new version: `twostage ingest --new-version`"
        )


def create_version(
    store: VectorStore,
    name: str,
    embedder: Embedder,
    settings: IndexSettings,
    extra_indexes: dict[str, FieldType] | None = None,
) -> CollectionManifest:
    """Create `NAME__v(N+1)` for `embedder` (status building, not yet behind the alias)."""
    check_collection_name(name)
    existing = versions(store, name)
    manifest = CollectionManifest(
        name=name,
        version=(existing[-1] + 1) if existing else 1,
        embedder=embedder.model_id,
        embedder_model=settings.embedder.model,
        embedder_revision=settings.embedder.revision,
        embedder_fingerprint=embedder.fingerprint,
        embedder_numerics=embedder.numerics,
        dim=embedder.dim,
        chunker=chunker_record(settings.chunker, embedder),
        sparse=SparseManifest(params=settings.recall.bm25) if settings.recall.sparse else None,
        payload_indexes={**CORE_INDEXES, **(extra_indexes or {})},
    )
    store.create_collection(manifest)
    return manifest


def version_for_ingest(
    store: VectorStore, name: str, embedder: Embedder, settings: IndexSettings, new_version: bool
) -> tuple[CollectionManifest, bool]:
    """The version an ingest writes into, and whether the alias must be switched to it at the end.

    Without `new_version`: the live version (created and aliased on the first ingest).
    With it: a fresh version, or the newest unfinished one built by the same embedder and
    chunker, which is how an interrupted `--new-version` run resumes instead of starting over.
    """
    active = store.resolve_alias(check_collection_name(name))
    if active is not None and not new_version:
        manifest = store.read_manifest(active)
        require_same_builder(manifest, embedder, settings.chunker, settings.numerics.embedder_min_cosine)
        return manifest, False
    parsed = parse_versioned_name(active) if active else None
    active_version = parsed[1] if parsed else 0
    for version in reversed(versions(store, name)):
        if version <= active_version:
            break
        candidate = store.read_manifest(versioned_name(name, version))
        if candidate.status == "building":
            try:
                require_same_builder(
                    candidate, embedder, settings.chunker, settings.numerics.embedder_min_cosine
                )
            except StoreError:
                break
            return candidate, True
        break
    return create_version(store, name, embedder, settings, settings.store.payload_indexes), True
