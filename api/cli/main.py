"""The `twostage` command line.

Every command builds what it needs in its own function (no module-level models); errors
meant for the user (`TwostageError`) print as one line on stderr with exit status 2.
"""

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from twostage.api.cli.feedback import add_feedback_commands
from twostage.api.cli.ingest import add_ingest_command
from twostage.api.cli.keys import add_keys_commands
from twostage.api.cli.retrain import add_retrain_commands
from twostage.api.cli.search import add_search_command
from twostage.api.cli.training import add_training_commands, positive_int
from twostage.api.runtime.interrupts import exit_at_once, interrupted
from twostage.retrieval.core.errors import TwostageError
from twostage.retrieval.core.progress import lines_when_not_a_tty


def _models_tiny(args: argparse.Namespace) -> int:
    from twostage.retrieval.models.tiny import write_tiny_models

    paths = write_tiny_models(Path(args.out), seed=args.seed)
    print(f"embedder: {paths.embedder}")
    print(f"reranker: {paths.reranker}")
    return 0


def _models_check(args: argparse.Namespace) -> int:
    """Load the configured embedder and reranker, run one input through each, say what loaded."""
    from twostage.api.settings import Settings
    from twostage.retrieval.models.loading import load_embedder, load_reranker

    settings = Settings()
    embedder = load_embedder(settings)
    vector = embedder.embed_queries(["twostage model check"])
    print(f"embedder: {embedder.model_id} dim={embedder.dim} norm={float((vector[0] ** 2).sum()) ** 0.5:.4f}")
    reranker = load_reranker(settings)
    score = reranker.score("twostage model check", ["a document"])[0]
    print(f"reranker: {reranker.model_id} score={score:.4f}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Bind the port, load the models and the store, then serve the API until SIGINT/SIGTERM."""
    from twostage.api.http.serving import bind, serve
    from twostage.api.settings import Settings

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

    add_ingest_command(commands)

    add_search_command(commands)
    add_training_commands(commands)
    add_retrain_commands(commands)
    add_feedback_commands(commands)
    add_keys_commands(commands)

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
    from twostage.api.cli.quickstart import quickstart

    return quickstart(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `twostage` console script."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    # libraries' deprecation notices (transformers renaming a keyword) are for us, not the user
    warnings.filterwarnings("ignore", category=FutureWarning)
    exit_at_once()  # Ctrl-C ends a command now, whatever its main thread is in (`interrupts`)
    try:
        from twostage.api.settings import Settings

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
