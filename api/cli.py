"""The `twostage` command line.

Every command builds what it needs in its own function (no module-level models); errors
meant for the user (`TwostageError`) print as one line on stderr with exit status 2.
"""

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from retrieval.errors import TwostageError


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
