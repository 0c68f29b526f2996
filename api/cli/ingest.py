"""`twostage ingest PATH`: read, chunk, embed and upsert a corpus, here or through a server.

Here: the store is opened first (a store a server holds is refused at once, naming its pid),
then the embedder loads and the pipeline runs with progress (`ingest_local`, which quickstart
uses too). `--server URL`: the records are read here and sent in batches (`client.py`).
"""

import argparse
from typing import TYPE_CHECKING, Any

from twostage.api.cli.training import positive_int
from twostage.retrieval.core.errors import InputError

if TYPE_CHECKING:
    from twostage.api.settings import Settings
    from twostage.retrieval.ingest.pipeline import IngestReport
    from twostage.retrieval.ingest.readers import CorpusReader


def add_ingest_command(commands: Any) -> None:
    ingest = commands.add_parser("ingest", help="chunk, embed and upsert a corpus (idempotent, resumable)")
    ingest.add_argument(
        "path", help="a folder of documents (PDF, .docx, HTML, Markdown, reST, text, JSONL), one such file, "
        "or - for JSONL on stdin",
    )  # fmt: skip
    ingest.add_argument("--collection", help="collection (alias) name; default TWOSTAGE_COLLECTION")
    ingest.add_argument("--batch-tokens", type=positive_int, help="embedder token budget per forward pass")
    ingest.add_argument("--sync", action="store_true", help="delete documents that are gone from the source")
    ingest.add_argument(
        "--strict", action="store_true", help="exit with status 2 at the first file or record that cannot be "
        "ingested, instead of reporting it and going on",
    )  # fmt: skip
    ingest.add_argument(
        "--shard", metavar="I/N", help="ingest only shard I of N (by a stable hash of each document id), so "
        "N "
        "machines can split one corpus into the same Qdrant collection",
    )  # fmt: skip
    ingest.add_argument(
        "--workers", type=positive_int, help="processes extracting documents (default "
        "TWOSTAGE_INGEST__WORKERS: "
        "the cores)",
    )  # fmt: skip
    ingest.add_argument(
        "--new-version",
        action="store_true",
        help="build a new collection version, then switch the alias to it",
    )
    ingest.add_argument(
        "--server", help="ingest through a running service at this URL (its store, its embedder)"
    )
    ingest.add_argument("--api-key", help="bearer key for --server (default: $TWOSTAGE_API_KEY)")
    ingest.add_argument(
        "--acl", help="who may see the documents, comma-separated principals (user:NAME, group:NAME, "
        "tenant:NAME) or public; a record's own `acl` and a folder's .twostage-acl.toml come first",
    )  # fmt: skip
    ingest.add_argument("--json", action="store_true", help="print the report as JSON")
    ingest.add_argument("--quiet", action="store_true", help="no progress output")
    ingest.set_defaults(handler=_ingest)


def _ingest(args: argparse.Namespace) -> int:
    """Read a corpus, chunk, embed and upsert it into the collection's live (or a new) version."""
    import json
    from dataclasses import asdict

    from twostage.api.settings import Settings
    from twostage.retrieval.access.principals import parse_acl
    from twostage.retrieval.ingest.readers import CorpusReader, parse_shard
    from twostage.retrieval.store.vector_store import check_collection_name

    settings = Settings()
    collection = check_collection_name(args.collection or settings.collection)
    batch_tokens = args.batch_tokens or settings.ingest.batch_tokens
    if batch_tokens:
        settings.embedder.batch_tokens = batch_tokens
    shard = parse_shard(args.shard) if args.shard else None
    if shard is not None and shard[1] > 1 and args.sync:
        raise InputError(
            f"--sync with --shard {args.shard}: this run reads only its shard, so every document of the "
            "other shards would look deleted; run --sync once without --shard after the shards are done"
        )
    reader = CorpusReader(
        args.path,
        settings.ingest.max_document_chars,
        workers=args.workers or settings.ingest.workers,
        shard=shard,
        acl=parse_acl(args.acl, "--acl") if args.acl else None,
    )  # fails fast on a missing path or a bad ACL file
    if args.server:
        from twostage.api.cli.client import ingest_via_server

        if args.sync or args.new_version:
            raise InputError("--sync and --new-version run where the store is: not with --server")
        from twostage.api.http.serving import api_key

        totals = ingest_via_server(reader, args.server, collection, api_key(args.api_key, settings))
        print(json.dumps(totals) if args.json else ", ".join(f"{k}={v}" for k, v in totals.items()))
        return 0
    report = ingest_local(
        settings, reader, collection, sync=args.sync, strict=args.strict, new_version=args.new_version,
        quiet=args.quiet,
    )  # fmt: skip
    report.shard = args.shard
    print(json.dumps(asdict(report)) if args.json else report.summary())
    return 0


def ingest_local(
    settings: "Settings",
    reader: "CorpusReader",
    collection: str,
    *,
    sync: bool = False,
    strict: bool = False,
    new_version: bool = False,
    quiet: bool = False,
) -> "IngestReport":
    """Ingest into this process's own store: open it first (a store held by a server is refused
    at once, naming its pid), then load the embedder and run the pipeline with progress."""
    from twostage.retrieval.ingest.chunker import Chunker
    from twostage.retrieval.ingest.pipeline import Progress, ingest_corpus
    from twostage.retrieval.models.loading import load_embedder
    from twostage.retrieval.models.tokens import Qwen3Tokens
    from twostage.retrieval.store.collections import open_store

    store = open_store(settings)
    try:
        store.list_collections()  # an unreachable server fails here, before the model loads
        embedder = load_embedder(settings)
        report = ingest_corpus(
            reader,
            store=store,
            embedder=embedder,
            chunker=Chunker.for_embedder(Qwen3Tokens(), settings.chunker, embedder),
            settings=settings,
            collection=collection,
            sync=sync,
            strict=strict,
            new_version=new_version,
            progress=Progress(reader.bytes_total, settings.ingest.progress_interval_s, enabled=not quiet),
            bytes_passed=lambda: reader.bytes_passed,
        )
        report.hidden_files = reader.hidden
        return report
    finally:
        store.close()
