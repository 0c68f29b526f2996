"""The `twostage` command line.

Every command builds what it needs in its own function (no module-level models); errors
meant for the user (`TwostageError`) print as one line on stderr with exit status 2.
"""

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from api.retrain_cli import add_retrain_commands
from api.training_cli import add_training_commands, positive_int
from retrieval.errors import InputError, TwostageError


def _models_tiny(args: argparse.Namespace) -> int:
    from retrieval.tiny_models import write_tiny_models

    paths = write_tiny_models(Path(args.out), seed=args.seed)
    print(f"embedder: {paths.embedder}")
    print(f"reranker: {paths.reranker}")
    return 0


def _models_check(args: argparse.Namespace) -> int:
    """Load the configured embedder and reranker, run one input through each, say what loaded."""
    from retrieval.embedder import load_embedder
    from retrieval.reranker import load_reranker
    from retrieval.settings import Settings

    settings = Settings()
    embedder = load_embedder(settings)
    vector = embedder.embed_queries(["twostage model check"])
    print(f"embedder: {embedder.model_id} dim={embedder.dim} norm={float((vector[0] ** 2).sum()) ** 0.5:.4f}")
    reranker = load_reranker(settings)
    score = reranker.score("twostage model check", ["a document"])[0]
    print(f"reranker: {reranker.model_id} score={score:.4f}")
    return 0


def _ingest(args: argparse.Namespace) -> int:
    """Read a corpus, chunk, embed and upsert it into the collection's live (or a new) version."""
    import json
    from dataclasses import asdict

    from retrieval.chunker import Chunker
    from retrieval.collections import open_store
    from retrieval.embedder import load_embedder
    from retrieval.ingest import Progress, ingest_corpus
    from retrieval.readers import CorpusReader
    from retrieval.settings import Settings
    from retrieval.store import check_collection_name
    from retrieval.tokens import Qwen3Tokens

    settings = Settings()
    collection = check_collection_name(args.collection or settings.collection)
    batch_tokens = args.batch_tokens or settings.ingest.batch_tokens
    if batch_tokens:
        settings.embedder.batch_tokens = batch_tokens
    reader = CorpusReader(args.path, settings.ingest.max_document_chars)  # fails fast on a missing path
    if args.server:
        from api.client import ingest_via_server

        if args.sync or args.new_version:
            raise InputError("--sync and --new-version run where the store is: not with --server")
        totals = ingest_via_server(
            reader, args.server, collection, args.api_key or os.environ.get("TWOSTAGE_API_KEY")
        )
        print(json.dumps(totals) if args.json else ", ".join(f"{k}={v}" for k, v in totals.items()))
        return 0
    embedder = load_embedder(settings)
    store = open_store(settings)
    try:
        report = ingest_corpus(
            reader,
            store=store,
            embedder=embedder,
            chunker=Chunker(Qwen3Tokens(), settings.chunker),
            settings=settings,
            collection=collection,
            sync=args.sync,
            strict=args.strict,
            new_version=args.new_version,
            progress=Progress(
                reader.bytes_total, settings.ingest.progress_interval_s, enabled=not args.quiet
            ),
            bytes_read=lambda: reader.bytes_read,
        )
    finally:
        store.close()
    print(json.dumps(asdict(report)) if args.json else report.summary())
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Load the models and the store, then serve the API with uvicorn until SIGINT/SIGTERM."""
    import logging

    import uvicorn

    from api.app import create_app
    from api.service import Service
    from retrieval.settings import Settings

    settings = Settings()
    host = args.host or settings.api.host
    port = args.port or settings.api.port
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    service = Service(settings)
    service.start()  # model and store errors surface here as one line, before binding the port
    if service.load_error:
        print(f"twostage: warning: {service.load_error}", file=sys.stderr)
    print(f"twostage: serving {settings.collection} on http://{host}:{port} (docs at /docs)", file=sys.stderr)
    uvicorn.run(
        create_app(settings, service),
        host=host,
        port=port,
        access_log=False,
        timeout_graceful_shutdown=settings.api.shutdown_timeout_s,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="twostage", description="Two-stage retrieval for RAG chatbots.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = commands.add_parser("models", help="model utilities")
    model_commands = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    tiny = model_commands.add_parser(
        "tiny", help="write tiny random Qwen3 embedder + reranker with the real Qwen3 tokenizer (offline)"
    )
    tiny.add_argument("--out", required=True, help="directory to write the two models into")
    tiny.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    tiny.set_defaults(handler=_models_tiny)
    check = model_commands.add_parser(
        "check",
        help="load the configured models (TWOSTAGE_EMBEDDER__MODEL, TWOSTAGE_RERANKER__MODEL) and try them",
    )
    check.set_defaults(handler=_models_check)

    ingest = commands.add_parser("ingest", help="chunk, embed and upsert a corpus (idempotent, resumable)")
    ingest.add_argument("path", help="JSONL file, directory of .txt/.md/.html files, or - for JSONL on stdin")
    ingest.add_argument("--collection", help="collection (alias) name; default TWOSTAGE_COLLECTION")
    ingest.add_argument("--batch-tokens", type=positive_int, help="embedder token budget per forward pass")
    ingest.add_argument("--sync", action="store_true", help="delete documents that are gone from the source")
    ingest.add_argument(
        "--strict", action="store_true", help="fail on the first bad record instead of skipping"
    )
    ingest.add_argument(
        "--new-version",
        action="store_true",
        help="build a new collection version, then switch the alias to it",
    )
    ingest.add_argument(
        "--server", help="ingest through a running service at this URL (its store, its embedder)"
    )
    ingest.add_argument("--api-key", help="bearer key for --server (default: $TWOSTAGE_API_KEY)")
    ingest.add_argument("--json", action="store_true", help="print the report as JSON")
    ingest.add_argument("--quiet", action="store_true", help="no progress output")
    ingest.set_defaults(handler=_ingest)

    add_training_commands(commands)
    add_retrain_commands(commands)

    serve = commands.add_parser("serve", help="serve /v1/search and the compatible endpoints (uvicorn)")
    serve.add_argument("--host", help="default TWOSTAGE_API__HOST (127.0.0.1)")
    serve.add_argument("--port", type=positive_int, help="default TWOSTAGE_API__PORT (8000)")
    serve.set_defaults(handler=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `twostage` console script."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except TwostageError as exc:
        print(f"twostage: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("twostage: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
