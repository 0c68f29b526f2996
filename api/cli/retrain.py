"""`twostage retrain`, `twostage calibrate`, `twostage versions` and `twostage rollback`.

The commands open the store themselves (embedded: the shard lock refuses while a server holds
it, naming its pid; retrain through the server with `--server URL` then).
"""

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _retrain(args: argparse.Namespace) -> int:
    """Mine, fine-tune, evaluate deployed vs candidate, and promote only a better pair."""
    from twostage.api.settings import Settings
    from twostage.retrieval.core.errors import InputError
    from twostage.retrieval.store.collections import open_store
    from twostage.training.retrain import retrain
    from twostage.training.retrain_run import RetrainOptions

    settings = Settings()
    if args.collection:
        settings.collection = args.collection
    sources = [*([args.pairs] if args.pairs else []), *(args.pairs_from or [])]
    if not sources:
        raise InputError(
            "say what to learn from: --pairs FILE or --pairs-from feedback|synthetic|sample|FILE"
        )
    if len(sources) == 1 and args.pairs:
        pairs, source = Path(args.pairs), None
    else:
        from twostage.api.cli.feedback import gather_pairs

        pairs, source = gather_pairs(sources, settings.data_dir)
    options = RetrainOptions(
        pairs=pairs, dev=Path(args.dev) if args.dev else None, from_base=args.from_base,
        skip_embedder=args.skip_embedder, skip_reranker=args.skip_reranker, promote=not args.no_promote,
        dry_run=args.dry_run, source=source, canary=args.canary, interleave=args.interleave,
        canary_events=args.canary_events, canary_seconds=args.canary_seconds,
    )  # fmt: skip
    if args.interleave and args.canary is None:
        raise InputError("--interleave says how a canary is served: give --canary SHARE too")
    from twostage.api.http.serving import api_key, running_server

    url = args.server or running_server(settings)  # a server holding this store retrains it, and follows
    if url:
        from twostage.api.cli.client import retrain_via_server

        if not args.server:
            _say(f"retraining through the server that holds this data directory's store ({url})")
        result = retrain_via_server(url, options, settings.collection, api_key(args.api_key, settings), _say)
    else:
        store = open_store(settings)
        try:  # trainers print their logs on stdout; keep stdout for the result
            with contextlib.redirect_stdout(sys.stderr):
                result = retrain(settings, store, options, say=_say)
        finally:
            store.close()
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0 if result.get("decision") != "failed" else 1


def _versions(args: argparse.Namespace) -> int:
    """List the deployments of a collection with their metrics; the current one is marked."""
    from twostage.api.settings import Settings
    from twostage.retrieval.deployments.registry import deployments_table
    from twostage.retrieval.store.collections import open_store

    settings = Settings()
    if args.collection:
        settings.collection = args.collection
    store = open_store(settings) if settings.store.kind == "qdrant" else None  # records live in Qdrant there
    try:
        rows = deployments_table(settings, store)
    finally:
        if store is not None:
            store.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"{settings.collection}: no deployments recorded yet (run `twostage retrain`)")
        return 0
    header = (
        f"{'':2}{'id':<5}{'collection':<22}{'parent':<8}{'nDCG@10 dense':>14}{'hybrid':>8}{'reranked':>10}"
    )
    print(header + "  created / models")
    for row in rows:
        metrics: dict[str, Any] = row["metrics"]
        dense, hybrid = _metric(metrics, "dense"), _metric(metrics, "hybrid")
        staged = _metric(metrics, "hybrid+rerank" if "hybrid+rerank" in metrics else "two-stage")
        print(
            f"{'*' if row['current'] else '':2}{'d' + str(row['id']):<5}{row['collection']:<22}"
            f"{('d' + str(row['parent'])) if row['parent'] else '-':<8}{dense:>14}{hybrid:>8}{staged:>10}"
            f"  {row['created_at']}  {row['embedder']} | {row['reranker']}"
        )
        print(f"{'':15}{_calibration_line(row.get('calibration'))}")
        for line in _canary_lines(row, settings):
            print(f"{'':15}{line}")
        for role, decision in (row.get("gate") or {}).items():  # why the gate decided as it did
            verdict = "promoted" if decision["promote"] else "kept"
            print(
                f"{'':15}{role} {verdict}: "
                + "; ".join(r for r in decision["reasons"][1:] or decision["reasons"])
            )
    return 0


def _canary_lines(row: dict[str, Any], settings: Any) -> list[str]:
    """A canary being measured (with its live tallies from this data directory's search log), or
    how a decided one ended."""
    from twostage.retrieval.deployments.canary import tallies
    from twostage.retrieval.deployments.registry import Canary
    from twostage.retrieval.traffic.log import open_log

    lines = []
    if row.get("canary"):
        canary = Canary.model_validate(row["canary"])
        how = "both rankings interleaved" if canary.interleave else "its ranking"
        budget = f"{canary.max_events} events or {canary.max_seconds:g} s"
        lines.append(f"canary since {canary.started_at}: {canary.share:.0%} of sessions see {how} beside "
                     f"d{canary.control}; decides after {budget}")  # fmt: skip
        log = open_log(settings.data_dir, settings.feedback)
        if log is not None:
            try:
                counted = tallies(log, canary)
            finally:
                log.close()
            lines.append(f"  live: {counted.events} positive events; {counted.summary()}")
    outcome = row.get("canary_outcome")
    if outcome:
        lines.append(f"canary {outcome['decision']}: {outcome['why']}")
    return lines


def _calibration_line(calibration: dict[str, Any] | None) -> str:
    """How a deployment's relevance is calibrated, for `twostage versions`."""
    if not calibration:
        return "relevance: uncalibrated (`twostage calibrate --pairs DEV`)"
    r = calibration["reliability"]
    return (
        f"relevance: calibrated on {r['judgements']} judged hits of {r['queries']} queries, held-out ECE "
        f"{r['ece']:.4f}, Brier {r['brier']:.4f} ({calibration['source']})"
    )


def _calibrate(args: argparse.Namespace) -> int:
    """Fit the current deployment's calibrated relevance on judged queries and store it in its record."""
    from twostage.api.cli.search import find_server
    from twostage.api.settings import Settings
    from twostage.retrieval.core.errors import InputError
    from twostage.training.data import pair_row, parse_judgement, parse_lines

    settings = Settings()
    if args.collection:
        settings.collection = args.collection
    if args.from_feedback:
        judgements, source = _feedback_judgements()
    else:
        path = Path(args.pairs)
        if not path.is_file():
            raise InputError(f"judgements file {args.pairs!r} does not exist")
        with path.open(encoding="utf-8") as handle:
            judgements, bad = parse_lines(handle, path.name, parse_judgement, what="judgements")
        for skipped in bad:
            _say(f"skipped {skipped}")
        source = f"{len(judgements)} judgements from {path.name}"
    url = args.server or find_server(settings)
    if url:
        from twostage.api.cli.client import calibrate_via_server
        from twostage.api.http.serving import api_key

        key = api_key(args.api_key, settings)
        rows = [pair_row(j) for j in judgements]
        answer = calibrate_via_server(url, settings.collection, rows, source, key)
        for line in answer["said"]:
            _say(line)
        calibration = answer["calibration"]  # its line is among what the service said
    else:
        from twostage.retrieval.store.collections import open_store
        from twostage.training.calibration import calibrate

        store = open_store(settings)
        try:
            record = calibrate(settings, store, judgements, source, say=_say)
        finally:
            store.close()
        assert record.calibration is not None
        calibration = record.calibration.model_dump(mode="json")
    if args.json:
        print(json.dumps(calibration, indent=2))
    return 0


def _feedback_judgements() -> "tuple[list[Any], str]":
    """The positives users' feedback names, as judgements (`training.feedback_pairs`)."""
    from twostage.api.cli.feedback import logged_pairs

    made = logged_pairs("calibrate --from-feedback")
    return made.pairs, f"{len(made.pairs)} positives from the feedback of {made.with_feedback} searches"


def _metric(metrics: dict[str, Any], mode: str) -> str:
    value = metrics.get(mode, {}).get("nDCG@10")
    return f"{value:.4f}" if value is not None else "-"


def _rollback(args: argparse.Namespace) -> int:
    """Switch the alias and the reranker back to a previous deployment (default: the parent)."""
    from twostage.api.settings import Settings
    from twostage.retrieval.deployments.lifecycle import rollback
    from twostage.retrieval.store.collections import open_store
    from twostage.retrieval.traffic.coordination import coordination_locks

    settings = Settings()
    if args.collection:
        settings.collection = args.collection
    target = None
    if args.version is not None:
        target = int(args.version.lstrip("dD")) if args.version.lstrip("dD").isdigit() else -1
        if target < 1:
            from twostage.retrieval.core.errors import InputError

            raise InputError(f"version must look like d3 or 3, got {args.version!r}")
    store = open_store(settings)
    try:
        rollback(settings, store, target, say=print,
                 locks=coordination_locks(settings.feedback, settings.data_dir))  # fmt: skip
    finally:
        store.close()
    return 0


def add_retrain_commands(commands: Any) -> None:
    """Register retrain / versions / rollback on the CLI's subcommand set."""
    retrain = commands.add_parser(
        "retrain", help="mine, fine-tune both models, evaluate, promote only a better pair (reindex + switch)"
    )
    retrain.add_argument(
        "--pairs", help="JSONL pairs about indexed documents: {query, positive} or {query, doc_id | id}"
    )
    retrain.add_argument(
        "--pairs-from", action="append", metavar="SOURCE",
        help="feedback (pairs from the search log), synthetic (the last `pairs synthesize`), sample (the "
        "quickstart sample's 500 labelled queries) or a FILE; repeat to combine. The gate's dev set is "
        "held-out queries of these, or --dev",
    )  # fmt: skip
    retrain.add_argument("--dev", help="held-out pairs (default: a query-level split of --pairs)")
    retrain.add_argument("--collection", help="default TWOSTAGE_COLLECTION")
    retrain.add_argument("--from-base", action="store_true", help="start from the configured base models")
    retrain.add_argument(
        "--skip-embedder", action="store_true", help="retrain the reranker only (no reindex)"
    )
    retrain.add_argument("--skip-reranker", action="store_true", help="retrain the embedder only")
    retrain.add_argument("--no-promote", action="store_true", help="stop after the evaluation report")
    retrain.add_argument(
        "--canary", type=float, metavar="SHARE",
        help="an online A/B before the switch: a promoted pair serves this share of sessions (0-1] until "
        "its feedback decides (the server switches to it if it is better, else drops it)",
    )  # fmt: skip
    retrain.add_argument("--interleave", action="store_true",
                         help="the canary's share sees both rankings merged by team draft")  # fmt: skip
    retrain.add_argument(
        "--canary-events", type=int, help="positive events to decide on (retrain.canary_events)"
    )
    retrain.add_argument(
        "--canary-seconds", type=float, help="decide after this long (retrain.canary_seconds)"
    )
    retrain.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    retrain.add_argument("--server", help="run it inside the service at this URL (default: the one holding "
                         "this data directory's store, if one runs; else on the store here)")  # fmt: skip
    retrain.add_argument("--api-key", help="bearer key for the server (default: $TWOSTAGE_API_KEY, else this "
                         "data directory's own admin key, DATA/cli.key)")  # fmt: skip
    retrain.add_argument("--json", action="store_true", help="print the run manifest as JSON")
    retrain.set_defaults(handler=_retrain)

    calibrate = commands.add_parser(
        "calibrate", help="fit the current deployment's calibrated relevance (0-1) on judged queries"
    )
    judged = calibrate.add_mutually_exclusive_group(required=True)
    judged.add_argument(
        "--pairs",
        help="JSONL judgements about indexed documents: {query, doc_id}, {query, id} (a chunk) or "
        "{query, positive}; instruction optional",
    )  # fmt: skip
    judged.add_argument(
        "--from-feedback", action="store_true",
        help="judgements from the search log: the hits users cited, clicked or liked (as `twostage pairs "
        "from-feedback` finds them)",
    )  # fmt: skip
    calibrate.add_argument("--collection", help="default TWOSTAGE_COLLECTION")
    calibrate.add_argument("--server", help="fit it inside the service at this URL (default: the one "
                           "holding this data directory, as `twostage search` finds it)")  # fmt: skip
    calibrate.add_argument("--api-key", help="bearer key for the server (default: $TWOSTAGE_API_KEY)")
    calibrate.add_argument("--json", action="store_true", help="print the calibration as JSON")
    calibrate.set_defaults(handler=_calibrate)

    versions = commands.add_parser("versions", help="list deployments (collection, models, metrics)")
    versions.add_argument("--collection", help="default TWOSTAGE_COLLECTION")
    versions.add_argument("--json", action="store_true")
    versions.set_defaults(handler=_versions)

    rollback = commands.add_parser(
        "rollback", help="switch back to a previous deployment (default: the parent)"
    )
    rollback.add_argument("version", nargs="?", help="deployment id, e.g. d1")
    rollback.add_argument("--collection", help="default TWOSTAGE_COLLECTION")
    rollback.set_defaults(handler=_rollback)
