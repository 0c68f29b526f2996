"""`twostage mine`, `twostage train embedder|reranker` and `twostage evaluate`.

Kept apart from `api/cli/main.py` (serving and ingestion) so each file reads as one job; the
handlers build what they need themselves, like every command.
"""

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twostage.retrieval.core.errors import InputError

if TYPE_CHECKING:
    from twostage.training.data import Example


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _examples(path: str) -> "list[Example]":
    """Training examples of a JSONL file; unusable lines are reported (file:line) and skipped."""
    from twostage.training.data import Graded, Pair, load_examples

    loaded = load_examples(Path(path))
    for bad in loaded.bad:
        print(f"twostage: skipped {bad}", file=sys.stderr)
    examples: list[Example] = [e for e in loaded.examples if isinstance(e, Pair | Graded)]
    if len(examples) < len(loaded.examples):
        skipped = len(loaded.examples) - len(examples)
        print(f"twostage: skipped {skipped} pairs that name their passages by id (twostage retrain "
              "resolves those against the collection)", file=sys.stderr)  # fmt: skip
    if not examples:
        raise InputError(f"no example in {path} carries its passage's text")
    return examples


def _mine(args: argparse.Namespace) -> int:
    """Mine hard negatives for training pairs against a corpus file or a collection's chunks."""
    from twostage.api.settings import Settings
    from twostage.retrieval.ingest.documents import Document
    from twostage.retrieval.ingest.readers import CorpusReader
    from twostage.retrieval.models.source import model_identity, resolve_model
    from twostage.retrieval.store.collections import active_manifest, open_store
    from twostage.training.data import Pair
    from twostage.training.mining import MiningSettings, mine, provenance, with_negatives, write_mined
    from twostage.training.st_model import load_st_embedder

    settings = Settings()
    pairs = [e for e in _examples(args.pairs) if isinstance(e, Pair)]
    if args.corpus:
        reader = CorpusReader(args.corpus, settings.ingest.max_document_chars)
        corpus = [r.text for r in reader if isinstance(r, Document)]
    else:
        store = open_store(settings)
        try:
            collection = active_manifest(store, args.collection or settings.collection).collection
            corpus = [str(r.payload["text"]) for r in store.scroll(collection, None, ["text"])]
        finally:
            store.close()
    source = resolve_model(
        settings.embedder.model, cache_dir=settings.cache_dir, revision=settings.embedder.revision
    )
    model = load_st_embedder(source.path, settings)
    model_id = model_identity(source, settings.cache_dir)
    mining = MiningSettings(
        num_negatives=args.negatives, range_min=args.range_min, range_max=args.range_max,
        relative_margin=args.relative_margin, max_score=args.max_score,
    )  # fmt: skip
    rescorer, reranker_id = None, None
    if args.rescore:
        from twostage.retrieval.models.loading import load_reranker
        from twostage.training.mining import RerankerScorer

        reranker = load_reranker(settings)
        rescorer, reranker_id = RerankerScorer(reranker, settings.reranker.instruction), reranker.model_id
    mined = mine(
        pairs, corpus, model, mining, cache_dir=settings.cache_dir, model_id=model_id, rescorer=rescorer
    )
    filled = 0
    if args.keep_all:
        mined, filled = with_negatives(pairs, mined, corpus, args.negatives)
    out = Path(args.out)
    write_mined(
        mined, out,
        provenance(mining, embedder=model_id, rescored_by=reranker_id, pairs=args.pairs,
                   corpus=args.corpus or args.collection,
                   corpus_size=len(corpus), pairs_in=len(pairs), pairs_out=len(mined),
                   random_negatives=filled),
    )  # fmt: skip
    print(f"{len(mined)} of {len(pairs)} pairs with {args.negatives} negatives each "
          f"({filled} filled with random passages) -> {out}")  # fmt: skip
    return 0


def _train_embedder(args: argparse.Namespace) -> int:
    """Fine-tune the configured embedder on pairs (LoRA by default) and write the merged model."""
    import json

    from twostage.api.settings import Settings
    from twostage.retrieval.models.devices import resolve_device
    from twostage.retrieval.models.source import resolve_model
    from twostage.training.data import Pair, mix_general, split_by_query
    from twostage.training.embedder_training import EmbedderTrainSettings, train_embedder
    from twostage.training.st_model import load_st_embedder

    settings = Settings()
    all_pairs = [e for e in _examples(args.train) if isinstance(e, Pair)]
    pairs = list(dict.fromkeys(all_pairs))
    if len(pairs) < len(all_pairs):
        print(f"twostage: dropped {len(all_pairs) - len(pairs)} duplicate pairs", file=sys.stderr)
    if args.dev:
        dev = [e for e in _examples(args.dev) if isinstance(e, Pair)]
    else:
        pairs, dev = split_by_query(pairs, args.dev_fraction)
    if args.general:
        general = [e for e in _examples(args.general) if isinstance(e, Pair)]
        domain_part, general_part = (int(x) for x in args.general_ratio.split(":"))
        pairs = mix_general(pairs, general, (domain_part, general_part))  # type: ignore[assignment]
    if not pairs or not dev:
        raise InputError(f"need training and dev pairs (have {len(pairs)} and {len(dev)})")
    source = resolve_model(
        settings.embedder.model, cache_dir=settings.cache_dir, revision=settings.embedder.revision
    )
    model = load_st_embedder(source.path, settings, device=str(resolve_device(settings.device)))
    options = EmbedderTrainSettings(
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, lora=not args.full,
        lora_rank=args.lora_rank, matryoshka_dims=args.matryoshka or [], eval_steps=args.eval_steps,
        early_stopping_patience=args.patience, gradient_checkpointing=args.gradient_checkpointing,
    )  # fmt: skip
    out = Path(args.out)
    report = train_embedder(
        model,
        pairs,
        dev,
        out,
        options,
        app=settings,
    )
    report.update({"base_model": settings.embedder.model, "train_pairs": len(pairs), "dev_pairs": len(dev)})
    (out / "report.json").write_text(json.dumps(report, indent=2))
    metric = report["primary_metric"]
    print(
        f"{metric}: base {report['base'][metric]:.4f} -> best {report['best'][metric]:.4f} "
        f"(merged, reloaded: {report['merged'][metric]:.4f}); model: {report['model_dir']}"
    )
    return 0


def _train_reranker(args: argparse.Namespace) -> int:
    """Fine-tune the configured reranker (yes/no LM or seq-cls cross-encoder); write the model."""
    import json

    from twostage.api.settings import Settings
    from twostage.retrieval.models.devices import resolve_device
    from twostage.retrieval.models.loading import reranker_family
    from twostage.retrieval.models.source import resolve_model
    from twostage.training.data import split_by_query
    from twostage.training.reranker_families import fine_tune_reranker
    from twostage.training.reranker_training import RerankerTrainSettings

    settings = Settings()
    examples = _examples(args.train)
    if args.dev:
        train, dev = examples, _examples(args.dev)
    else:
        train, dev = split_by_query(examples, args.dev_fraction)
    if not train or not dev:
        raise InputError(f"need training and dev examples (have {len(train)} and {len(dev)})")
    cfg = settings.reranker
    source = resolve_model(cfg.model, cache_dir=settings.cache_dir, revision=cfg.revision)
    options = RerankerTrainSettings(
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
        mode=args.mode, last_layers=args.last_layers, lora_rank=args.lora_rank,
        eval_steps=args.eval_steps, early_stopping_patience=args.patience, loss=args.loss,
        group_negatives=args.group_negatives,
    )  # fmt: skip
    out = Path(args.out)
    report = fine_tune_reranker(
        source.path, reranker_family(source, cfg.family), train, dev, out, options,
        instruction=cfg.instruction, max_length=args.max_length, device=str(resolve_device(settings.device)),
    )  # fmt: skip
    report["base_model"] = cfg.model
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(
        f"dev loss: base {report['base_dev_loss']:.4f} -> best {report['best_dev_loss']:.4f}; "
        f"model: {report['model_dir']}"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    """Dense and two-stage metrics for the configured models and an optional candidate pair."""
    from twostage.api.settings import Settings
    from twostage.retrieval.ingest.documents import Document
    from twostage.retrieval.ingest.readers import CorpusReader
    from twostage.retrieval.models.loading import load_embedder, load_reranker
    from twostage.retrieval.search.two_stage import served_fusion
    from twostage.retrieval.store.sparse import Rrf
    from twostage.training.data import Pair
    from twostage.training.evaluation import (
        comparison_table,
        comparisons,
        evaluation_runs,
        from_pairs,
        load_beir,
        score_run,
        table,
        write_report,
    )
    from twostage.training.paired import PRIMARY

    settings = Settings()
    if args.beir:
        data = load_beir(Path(args.beir), args.split)
    else:
        pairs = [e for e in _examples(args.pairs) if isinstance(e, Pair)]
        distractors: list[str] = []
        if args.distractors:
            reader = CorpusReader(args.distractors, settings.ingest.max_document_chars)
            distractors = [r.text for r in reader if isinstance(r, Document)][: args.max_distractors]
        data = from_pairs(pairs, distractors)
    systems = {"base": settings}
    if args.candidate_embedder or args.candidate_reranker:
        candidate = settings.model_copy(deep=True)
        candidate.embedder.model = args.candidate_embedder or settings.embedder.model
        candidate.reranker.model = args.candidate_reranker or settings.reranker.model
        systems["candidate"] = candidate
    runs = {}
    for name, system in systems.items():
        reranker = None if args.dense_only else load_reranker(system)
        runs[name] = evaluation_runs(
            data, load_embedder(system), reranker, top_k=args.top_k, recalls=args.recall,
            rrf=Rrf(settings.recall.rrf_k, settings.recall.rrf_weights), bm25=settings.recall.bm25,
            fusion=served_fusion(settings), rerank_k=settings.search.rerank_k,
        )  # fmt: skip
    results = {
        name: {m: score_run(data.qrels, run) for m, run in modes.items()} for name, modes in runs.items()
    }
    paired = comparisons(data.qrels, runs, PRIMARY)
    models = {n: {"embedder": s.embedder.model, "reranker": s.reranker.model} for n, s in systems.items()}
    context = {
        "systems": models,
        "queries": len(data.queries),
        "corpus": len(data.corpus),
        "top_k": args.top_k,
        "comparisons": paired,
    }
    chart = write_report(results, Path(args.out), context)
    print(table(results))
    print(f"\npaired over the same {len(data.queries)} queries (per-query {PRIMARY}: bootstrap 95% CI, "
          "randomization p):")  # fmt: skip
    print(comparison_table(paired))
    print(f"report: {Path(args.out) / 'report.json'}, chart: {chart}")
    return 0


def add_training_commands(commands: Any) -> None:
    """Register mine / train / evaluate on the CLI's subcommand set."""
    mine = commands.add_parser("mine", help="mine hard negatives for training pairs (sentence-transformers)")
    mine.add_argument("--pairs", required=True, help="JSONL of {query, positive} (or ms-swift) records")
    where = mine.add_mutually_exclusive_group()
    where.add_argument("--corpus", help="corpus to mine from (JSONL or directory, as for ingest)")
    where.add_argument("--collection", help="mine from a collection's stored chunks (default: the live one)")
    mine.add_argument("--out", required=True, help="output JSONL; the settings go to OUT.settings.json")
    mine.add_argument("--negatives", type=positive_int, default=3, help="negatives per query")
    mine.add_argument("--range-min", type=int, default=3, help="skip this many top-ranked candidates")
    mine.add_argument(
        "--range-max", type=positive_int, default=50, help="consider candidates up to this rank"
    )
    mine.add_argument(
        "--relative-margin", type=float, default=0.05, help="negative <= positive - |positive| x margin"
    )
    mine.add_argument("--max-score", type=float, help="negatives must score below this")
    mine.add_argument(
        "--rescore", action="store_true",
        help="rescore candidates with the configured reranker; margin and max score then apply to its scores",
    )  # fmt: skip
    mine.add_argument(
        "--keep-all", action="store_true",
        help="pairs without enough hard negatives past the guards get random passages (else dropped)",
    )  # fmt: skip
    mine.set_defaults(handler=_mine)

    train = commands.add_parser("train", help="fine-tune the embedder or the reranker")
    train_commands = train.add_subparsers(dest="train_command", required=True, metavar="MODEL")
    embedder = train_commands.add_parser(
        "embedder", help="LoRA (or full) fine-tuning with MNRL + mined negatives"
    )
    embedder.add_argument("--train", required=True, help="JSONL pairs/triplets (e.g. from twostage mine)")
    embedder.add_argument("--dev", help="held-out pairs (default: a query-level split of --train)")
    embedder.add_argument("--dev-fraction", type=float, default=0.1)
    embedder.add_argument("--general", help="general-domain pairs mixed in to limit forgetting")
    embedder.add_argument("--general-ratio", default="7:3", help="domain:general")
    embedder.add_argument("--out", required=True, help="run directory (checkpoints, merged model, report)")
    embedder.add_argument("--epochs", type=float, default=1.0)
    embedder.add_argument("--batch-size", type=positive_int, default=32)
    embedder.add_argument("--lr", type=float, default=1e-4)
    embedder.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    embedder.add_argument("--lora-rank", type=positive_int, default=16)
    embedder.add_argument("--matryoshka", type=int, nargs="*", help="MatryoshkaLoss over these dims")
    embedder.add_argument("--eval-steps", type=positive_int, default=50)
    embedder.add_argument("--patience", type=positive_int, default=3, help="early stopping, in evaluations")
    embedder.add_argument("--gradient-checkpointing", action="store_true")
    embedder.set_defaults(handler=_train_embedder)
    reranker = train_commands.add_parser(
        "reranker",
        help="yes/no LMs: Qwen3 objective (BCE on z_yes - z_no, LoRA); seq-cls: CrossEncoderTrainer",
    )
    reranker.add_argument("--train", required=True, help="JSONL pairs with negatives, or graded judgements")
    reranker.add_argument("--dev", help="held-out examples (default: a query-level split of --train)")
    reranker.add_argument("--dev-fraction", type=float, default=0.1)
    reranker.add_argument("--out", required=True, help="run directory (checkpoints, merged model, report)")
    reranker.add_argument("--mode", choices=["lora", "full", "last-layers"], default="lora")
    reranker.add_argument("--last-layers", type=positive_int, default=2, help="with --mode last-layers")
    reranker.add_argument(
        "--loss", choices=["bce", "listwise"], default="bce",
        help="bce: pointwise on z (Qwen3); listwise: softmax over a positive and its negatives",
    )  # fmt: skip
    reranker.add_argument(
        "--group-negatives", type=positive_int, default=3, help="with --loss listwise: negatives per group"
    )
    reranker.add_argument("--epochs", type=float, default=1.0)
    reranker.add_argument("--batch-size", type=positive_int, default=16)
    reranker.add_argument("--lr", type=float, default=1e-4)
    reranker.add_argument("--lora-rank", type=positive_int, default=16)
    reranker.add_argument("--eval-steps", type=positive_int, default=50)
    reranker.add_argument("--patience", type=positive_int, default=3)
    reranker.add_argument("--max-length", type=positive_int, default=1024, help="prompt tokens in training")
    reranker.set_defaults(handler=_train_reranker)

    evaluate = commands.add_parser(
        "evaluate", help="NDCG@10, MRR@10, Recall@10/100, MAP: dense, BM25, hybrid, each reranked"
    )
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--pairs", help="dev pairs (JSONL): queries scored against their own positives")
    source.add_argument("--beir", help="a BEIR-style folder (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv)")
    evaluate.add_argument("--split", default="test", help="qrels split for --beir")
    evaluate.add_argument("--distractors", help="corpus whose documents are added as distractors (--pairs)")
    evaluate.add_argument("--max-distractors", type=positive_int, default=20000)
    evaluate.add_argument("--candidate-embedder", help="model to compare with the configured embedder")
    evaluate.add_argument("--candidate-reranker", help="model to compare with the configured reranker")
    evaluate.add_argument(
        "--top-k", type=positive_int, default=100, help="recalled candidates the reranker sees"
    )
    evaluate.add_argument(
        "--recall", nargs="+", choices=("dense", "sparse", "hybrid"), default=["dense", "sparse", "hybrid"],
        help="first stages to report (each also reranked unless --dense-only); default all three",
    )  # fmt: skip
    evaluate.add_argument("--dense-only", action="store_true", help="skip the reranker (first stages only)")
    evaluate.add_argument("--out", required=True, help="directory for report.json and report.png")
    evaluate.set_defaults(handler=_evaluate)
