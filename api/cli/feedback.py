"""`twostage feedback stats` and `twostage pairs from-feedback`: what the traffic says, and the
training pairs it gives; `twostage feedback migrate` copies a SQLite log into a shared database.
They read the configured log (`retrieval.traffic`: SQLite under the data directory, or
`feedback.database_url`), which running servers may be writing meanwhile."""

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from twostage.training.feedback_pairs import FeedbackPairs


def open_log() -> Any:
    """The configured search log (the data directory's SQLite file, or `feedback.database_url`)."""
    from twostage.api.settings import Settings
    from twostage.retrieval.core.errors import InputError
    from twostage.retrieval.traffic.database import LOG_FILE
    from twostage.retrieval.traffic.log import open_log as open_configured

    settings = Settings()
    log = open_configured(settings.data_dir, settings.feedback)
    if log is None:
        raise InputError(f"no search log in this data directory ({LOG_FILE} is made by the first search)")
    return log


def _stats(args: argparse.Namespace) -> int:
    """Searches, events by type, click-through by rank, zero-hit and low-score queries."""
    from twostage.retrieval.traffic.stats import stats_text, traffic_stats

    log = open_log()
    try:
        stats = traffic_stats(log, args.days, args.low_relevance)
    finally:
        log.close()
    print(json.dumps(asdict(stats), indent=2) if args.json else stats_text(stats))
    return 0


def _migrate(args: argparse.Namespace) -> int:
    """Copy the data directory's SQLite log (or `--from`'s) into the database at `--to`."""
    from twostage.api.settings import Settings
    from twostage.retrieval.core.errors import InputError
    from twostage.retrieval.traffic.database import LOG_FILE, check_url, copy_log, open_engine, shown_url

    settings = Settings()
    source = Path(args.source) if args.source else settings.data_dir / LOG_FILE
    if not source.is_file():
        raise InputError(f"no SQLite search log at {args.source or LOG_FILE} to copy from")
    target_url = check_url(args.to)
    source_engine, target_engine = open_engine(f"sqlite:///{source.absolute()}"), open_engine(target_url)
    try:
        copied = copy_log(source_engine, target_engine, say=lambda line: print(line, file=sys.stderr))
    finally:
        source_engine.dispose()
        target_engine.dispose()
    summary = ", ".join(
        f"{name} {new} copied ({there} already there)" for name, (new, there) in copied.items()
    )
    print(f"{summary} -> {shown_url(target_url)}")
    if not args.source:
        print(f"to use it: TWOSTAGE_FEEDBACK__DATABASE_URL={shown_url(target_url)} (the password as set)",
              file=sys.stderr)  # fmt: skip
    return 0


def _db_upgrade(args: argparse.Namespace) -> int:
    """Create or upgrade the log's schema (`serve` does this on start, too)."""
    from twostage.api.settings import Settings
    from twostage.retrieval.traffic.database import database_url, open_engine, reachable, shown_url, upgrade

    settings = Settings()
    url = database_url(settings.feedback.database_url, settings.data_dir)
    engine = open_engine(url)
    try:
        with reachable(url):
            before, now = upgrade(engine)
    finally:
        engine.dispose()
    what = (
        f"created at v{now}"
        if before is None
        else f"v{before} -> v{now}"
        if before < now
        else f"v{now}, current"
    )
    print(f"search log schema {what} ({shown_url(url)})")
    return 0


def _from_feedback(args: argparse.Namespace) -> int:
    """Write training pairs (chunk ids) made from the search log and its feedback events."""
    from twostage.api.settings import Settings
    from twostage.training.feedback_pairs import write_feedback_pairs

    settings = Settings()
    min_rate = settings.feedback.pairs_min_rate if args.min_rate is None else args.min_rate
    log = open_log()
    try:
        made = write_feedback_pairs(log, settings.collection, Path(args.out), args.min_events, args.dwell_s,
                                    args.days, settings.retrain.dev_fraction, min_rate)  # fmt: skip
    finally:
        log.close()
    dev = sum(1 for p in made.pairs if p.query in made.dev_queries)
    print(f"{len(made.pairs)} pairs ({len(made.pairs) - dev} train / {dev} dev) for {made.queries} queries, "
          f"{made.negatives} negatives (skipped above a positive, or thumbs-down), from {made.with_feedback} "
          f"of {made.searches} logged searches with feedback -> {args.out}", file=sys.stderr)  # fmt: skip
    if made.contested:
        print(f"{made.contested} clicked chunks were passed over or disliked as often as preferred; left out",
              file=sys.stderr)  # fmt: skip
    if made.rare:
        print(f"{made.rare} positives had a positive event in under --min-rate {min_rate} of their "
              "query's searches (stray clicks); left out", file=sys.stderr)  # fmt: skip
    if made.below_min:
        print(f"{made.below_min} positives had fewer than --min-events {args.min_events} events; left out",
              file=sys.stderr)  # fmt: skip
    if made.hashed:
        print(f"{made.hashed} searches with feedback kept only the query's hash; left out", file=sys.stderr)
    if made.unlogged or made.unmatched:
        lost = f"{made.unlogged} events on searches the log does not hold and {made.unmatched} on hits"
        print(f"{lost} their search did not show (taken while feedback.search_log was off); left out",
              file=sys.stderr)  # fmt: skip
    return 0


PAIR_SOURCES = ("feedback", "synthetic", "sample")


def logged_pairs(what: str) -> "FeedbackPairs":
    """The pairs of the search log's searches on the configured collection (`training.feedback_pairs`);
    none is an error saying why."""
    from twostage.api.settings import Settings
    from twostage.retrieval.core.errors import InputError
    from twostage.training.feedback_pairs import collection_traffic, pairs_from_feedback

    settings = Settings()
    log = open_log()
    try:
        made = pairs_from_feedback(*collection_traffic(log, settings.collection),
                                   min_rate=settings.feedback.pairs_min_rate)  # fmt: skip
    finally:
        log.close()
    if not made.pairs:
        read = f"{made.searches} searches, {made.with_feedback} with feedback"
        raise InputError(f"{what}: no pairs in the search log ({read})")
    return made


def gather_pairs(sources: list[str], data_dir: Path) -> tuple[Path, str]:
    """`--pairs-from feedback|synthetic|sample|FILE ...` as one pairs file, kept under DATA/pairs/ for
    the run's record: `feedback` the search log's pairs (as `pairs from-feedback` makes them),
    `synthetic` the last `pairs synthesize`, `sample` the quickstart sample's 500 labelled queries
    (by doc_id), anything else a JSONL file as it is."""
    import gzip
    import time
    from importlib.resources import files

    from twostage.retrieval.core.errors import InputError
    from twostage.training.data import pair_row

    lines: list[str] = []
    for source in sources:
        if source == "feedback":
            made = logged_pairs("--pairs-from feedback")
            lines += [json.dumps(pair_row(p), ensure_ascii=False) for p in made.pairs]
        elif source == "synthetic":
            latest = data_dir / "pairs" / SYNTHETIC
            if not latest.is_file():
                raise InputError("--pairs-from synthetic: no synthetic pairs yet (twostage pairs synthesize)")
            lines += latest.read_text(encoding="utf-8").splitlines()
        elif source == "sample":
            sample = files("twostage.api.cli") / "samples" / "debian-sample-queries.jsonl.gz"
            lines += gzip.decompress(sample.read_bytes()).decode().splitlines()
        else:
            path = Path(source)
            if not path.is_file():
                raise InputError(
                    f"--pairs-from {source!r}: not {', '.join(PAIR_SOURCES)} or a file that exists"
                )
            lines += path.read_text(encoding="utf-8").splitlines()
    names = "+".join(s if s in PAIR_SOURCES else Path(s).name for s in sources)
    out = data_dir / "pairs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{len(sources)}-sources.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(line + "\n" for line in lines if line.strip()), encoding="utf-8")
    return out, names


LOCAL_LLM = "pypi:SmolLM2-135M-Instruct"
SYNTHETIC = "synthetic.jsonl"  # under DATA/pairs/: the last `pairs synthesize`, for --pairs-from synthetic


def _synthesize(args: argparse.Namespace) -> int:
    """Queries an LLM writes for sampled chunks, kept when the deployed retriever finds their chunk."""
    import shutil

    from twostage.api.settings import Settings
    from twostage.retrieval.core.errors import InputError
    from twostage.retrieval.deployments.follower import load_served
    from twostage.retrieval.search.two_stage import needs_reranker
    from twostage.retrieval.store.collections import open_store
    from twostage.training.synthesis import ChatEndpoint, LocalWriter, QueryWriter, synthesize, write_pairs

    settings = Settings()
    if args.collection:
        settings.collection = args.collection
    writer: QueryWriter
    if args.llm == "local":
        writer = LocalWriter(args.model or LOCAL_LLM, settings, seed=args.seed)
    elif args.llm.startswith(("http://", "https://")):
        if not args.model:
            raise InputError("--llm URL needs --model: the name the endpoint serves")
        writer = ChatEndpoint(args.llm, args.model, settings.synthesis)
    else:
        raise InputError(
            f"--llm must be local or an http(s) URL of an OpenAI-compatible server, got {args.llm!r}"
        )
    store = open_store(settings)
    try:
        deployment = load_served(
            settings, store, settings.collection, reranker=needs_reranker(settings, None)
        )
        made = synthesize(settings, store, deployment, writer, chunks=args.chunks, per_chunk=args.per_chunk,
                          seed=args.seed, say=lambda line: print(line, file=sys.stderr))  # fmt: skip
    finally:
        store.close()
        writer.close()
    for failed in made.failed[:20]:
        print(f"twostage: skipped chunk {failed}", file=sys.stderr)
    if len(made.failed) > 20:
        print(f"twostage: and {len(made.failed) - 20} more chunks the LLM failed on", file=sys.stderr)
    if not made.pairs:
        top = settings.synthesis.top_k
        raise InputError(
            f"no query of {made.written} written for {made.chunks} chunks was kept by the round "
            f"trip (the deployed retriever found none of their chunks in its top {top})"
        )
    write_pairs(made, Path(args.out))
    latest = settings.data_dir / "pairs" / SYNTHETIC
    latest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.out, latest)
    dev = sum(1 for p in made.pairs if p.query in made.dev_queries)
    print(f"kept {made.kept} of {made.written} queries written by {made.writer} for {made.chunks} chunks "
          f"(round trip: the chunk in the top {settings.synthesis.top_k}); {len(made.pairs) - dev} train / "
          f"{dev} dev -> {args.out}", file=sys.stderr)  # fmt: skip
    return 0


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return number


def add_feedback_commands(commands: Any) -> None:
    """Register `feedback stats|migrate`, `db upgrade` and `pairs from-feedback|synthesize`."""
    from twostage.api.cli.training import positive_int

    feedback = commands.add_parser("feedback", help="what users did with the hits (the search log)")
    actions = feedback.add_subparsers(dest="feedback_command", required=True, metavar="ACTION")
    stats = actions.add_parser("stats", help="searches, events, click-through by rank, zero-hit queries")
    stats.add_argument("--days", type=_positive_float, default=7.0, help="window, days back from now (7)")
    stats.add_argument("--low-relevance", type=float, default=0.5,
                       help="a best hit below this relevance makes a low-score query (0.5)")  # fmt: skip
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(handler=_stats)
    migrate = actions.add_parser("migrate", help="copy a SQLite search log into a shared database "
                                 "(idempotent: run it again to finish or to catch up)")  # fmt: skip
    migrate.add_argument(
        "--to", required=True, help="the database: postgresql+psycopg://USER:PW@HOST:PORT/DB"
    )
    migrate.add_argument("--from", dest="source", help="a SQLite log file (default: the data directory's)")
    migrate.set_defaults(handler=_migrate)

    database = commands.add_parser("db", help="the search log's database")
    db_actions = database.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_actions.add_parser(
        "upgrade", help="create or upgrade its schema (serve does it on start)"
    ).set_defaults(handler=_db_upgrade)

    pairs = commands.add_parser("pairs", help="make training pairs")
    makers = pairs.add_subparsers(dest="pairs_command", required=True, metavar="SOURCE")
    made = makers.add_parser("from-feedback", help="pairs from the search log and its feedback events")
    made.add_argument("--out", required=True, help="JSONL file to write ({query, id, negative_ids, label})")
    made.add_argument("--min-events", type=positive_int, default=1,
                      help="positive events a positive needs, over the query's searches (1)")  # fmt: skip
    made.add_argument("--min-rate", type=float,
                      help="share of its query's searches in which a positive got a positive event "
                      "(default feedback.pairs_min_rate, 0: off)")  # fmt: skip
    made.add_argument("--dwell-s", type=_positive_float, default=30.0,
                      help="a dwell of at least this many seconds is a positive (30)")  # fmt: skip
    made.add_argument("--days", type=_positive_float, help="only the last N days (default: all kept)")
    made.set_defaults(handler=_from_feedback)

    synth = makers.add_parser("synthesize", help="queries an LLM writes for sampled chunks (cold start)")
    synth.add_argument("--out", required=True, help="JSONL file to write ({query, id, instruction, split})")
    synth.add_argument("--llm", default="local",
                       help="an OpenAI-compatible server's base URL (vLLM, Ollama, OpenAI), or local: a "
                       f"causal LM run here through transformers (default; model {LOCAL_LLM})")  # fmt: skip
    synth.add_argument("--model", help="the model: the name the server serves, or a local model for local")
    synth.add_argument("--chunks", type=positive_int, default=200, help="chunks sampled (200)")
    synth.add_argument("--per-chunk", type=positive_int, default=1, help="queries written per chunk (1)")
    synth.add_argument("--seed", type=int, default=0, help="which chunks, and the local sampling (0)")
    synth.add_argument("--collection", help="default TWOSTAGE_COLLECTION")
    synth.set_defaults(handler=_synthesize)
