"""The `twostage` command line.

Every command builds what it needs in its own function (no module-level models); errors
meant for the user (`TwostageError`) print as one line on stderr with exit status 2.
"""

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from twostage.api.feedback_cli import add_feedback_commands
from twostage.api.interrupts import exit_at_once, interrupted
from twostage.api.retrain_cli import add_retrain_commands
from twostage.api.search_cli import add_search_command
from twostage.api.training_cli import add_training_commands, positive_int
from twostage.retrieval.errors import InputError, TwostageError
from twostage.retrieval.progress import lines_when_not_a_tty

if TYPE_CHECKING:
    from twostage.retrieval.ingest.pipeline import IngestReport
    from twostage.retrieval.ingest.readers import CorpusReader
    from twostage.retrieval.settings import Settings


def _models_tiny(args: argparse.Namespace) -> int:
    from twostage.oracles.tiny_models import write_tiny_models

    paths = write_tiny_models(Path(args.out), seed=args.seed)
    print(f"embedder: {paths.embedder}")
    print(f"reranker: {paths.reranker}")
    return 0


def _models_check(args: argparse.Namespace) -> int:
    """Load the configured embedder and reranker, run one input through each, say what loaded."""
    from twostage.retrieval.models.embedder import load_embedder
    from twostage.retrieval.models.reranker import load_reranker
    from twostage.retrieval.settings import Settings

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

    from twostage.retrieval.ingest.readers import CorpusReader, parse_shard
    from twostage.retrieval.settings import Settings
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
    )  # fails fast on a missing path
    if args.server:
        from twostage.api.client import ingest_via_server

        if args.sync or args.new_version:
            raise InputError("--sync and --new-version run where the store is: not with --server")
        from twostage.api.serving import api_key

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
    from twostage.retrieval.models.embedder import load_embedder
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


def _serve(args: argparse.Namespace) -> int:
    """Bind the port, load the models and the store, then serve the API until SIGINT/SIGTERM."""
    from twostage.api.serving import bind, serve
    from twostage.retrieval.settings import Settings

    settings = Settings()
    settings.api.host = args.host or settings.api.host
    settings.api.port = args.port or settings.api.port
    serve(settings, bind(settings.api.host, settings.api.port))
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
    ingest.add_argument("--json", action="store_true", help="print the report as JSON")
    ingest.add_argument("--quiet", action="store_true", help="no progress output")
    ingest.set_defaults(handler=_ingest)

    add_search_command(commands)
    add_training_commands(commands)
    add_retrain_commands(commands)
    add_feedback_commands(commands)

    serve = commands.add_parser("serve", help="serve /v1/search and the compatible endpoints (uvicorn)")
    serve.add_argument("--host", help="default TWOSTAGE_API__HOST (127.0.0.1)")
    serve.add_argument("--port", type=positive_int, help="default TWOSTAGE_API__PORT (8000)")
    serve.set_defaults(handler=_serve)

    quick = commands.add_parser(
        "quickstart",
        help="choose models (offline fallbacks), ingest PATH or the Debian sample, and serve",
    )
    quick.add_argument("path", nargs="?", help="corpus to ingest (default: the Debian sample in the package)")
    quick.add_argument("--host", help="default TWOSTAGE_API__HOST (127.0.0.1)")
    quick.add_argument("--port", type=positive_int, help="default TWOSTAGE_API__PORT (8000)")
    quick.add_argument("--quiet", action="store_true", help="no ingest progress output")
    quick.set_defaults(handler=_quickstart)
    return parser


def _quickstart(args: argparse.Namespace) -> int:
    from twostage.api.quickstart import quickstart

    return quickstart(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `twostage` console script."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    # libraries' deprecation notices (transformers renaming a keyword) are for us, not the user
    warnings.filterwarnings("ignore", category=FutureWarning)
    exit_at_once()  # Ctrl-C ends a command now, whatever its main thread is in (`interrupts`)
    try:
        from twostage.retrieval.settings import Settings

        lines_when_not_a_tty(Settings().ingest.progress_interval_s)
        return handler(args)
    except TwostageError as exc:
        print(f"twostage: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C ends the process now: waiting at exit for worker threads (a model still loading,
        # an executor's queue) could take minutes
        interrupted()
    except Exception as exc:  # a library's error (transformers, peft, torch...): one line, not a traceback
        if isinstance(exc, ValidationError) and exc.title == "Settings":  # the environment, settings.env
            print(f"twostage: error: invalid settings: {_settings_problems(exc)}", file=sys.stderr)
            return 2
        where = _save_traceback(args.command)
        print(f"twostage: error: {args.command} failed: {type(exc).__name__}: {_first_line(exc)}"
              f" (traceback in {where})", file=sys.stderr)  # fmt: skip
        return 2


def _settings_problems(exc: ValidationError) -> str:
    """Each failed setting named as its environment variable, with pydantic's reason."""
    return "; ".join(
        f"TWOSTAGE_{'__'.join(str(p) for p in e['loc']).upper()}: {e['msg'].removeprefix('Value error, ')}"
        for e in exc.errors()
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "no message"


def _save_traceback(command: str) -> str:
    """Write the current exception's traceback to a file for a bug report; return its path."""
    import tempfile
    import traceback

    with tempfile.NamedTemporaryFile(
        "w", prefix=f"twostage-{command}-", suffix=".traceback", delete=False
    ) as handle:
        traceback.print_exc(file=handle)
        return handle.name


if __name__ == "__main__":
    sys.exit(main())
