"""Idempotent, resumable ingestion: records -> chunks -> vectors -> points, three stages overlapped.

    reader thread:  read + validate + look up stored state + chunk  --queue-->
    main thread:    embed (torch releases the GIL while it computes)  --queue-->
    writer thread:  upsert, then delete the document's stale points once all its chunks are in

Queues are bounded, so memory stays flat however large the corpus is. Why a rerun is
always right, even after `kill -9`: point ids are uuid5(doc id, chunk index), so rewriting
is an overwrite; every point carries its document's `doc_hash` and `n_chunks`, so a
document counts as done only when exactly chunks 0..n-1 are stored with the current hash
(a half-written document is simply redone); and a changed document's old points are
deleted only after all of its new ones are written, so a crash never loses a document.
"""

import itertools
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from twostage.retrieval.access.principals import ACL_FIELD, stored_acl
from twostage.retrieval.core.errors import InputError
from twostage.retrieval.ingest.chunker import Chunker
from twostage.retrieval.ingest.documents import BadRecord, Chunk, Document, chunk_payload
from twostage.retrieval.ingest.settings import IngestionSettings, IngestSettings
from twostage.retrieval.models.embedder import Embedder
from twostage.retrieval.store.collections import version_for_ingest
from twostage.retrieval.store.sparse import Bm25Encoder, sparse_encoder
from twostage.retrieval.store.vector_store import (
    AnyOf,
    CollectionManifest,
    Equals,
    Filter,
    Point,
    VectorStore,
)

_DONE = object()
_MAX_EXAMPLES = 20
_MAX_SKIPPED = 10_000  # every skipped file is listed up to here; the count is always exact


@dataclass
class IngestReport:
    """What one ingest run did; `summary()` is the line the CLI prints."""

    collection: str
    documents: int = 0
    new: int = 0
    updated: int = 0
    unchanged: int = 0
    acl_updated: int = 0  # unchanged documents whose permissions were re-written (no re-embedding)
    deleted: int = 0
    chunks_embedded: int = 0
    bad_records: int = 0
    bad_examples: list[str] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)  # documents read, by format
    skipped: list[dict[str, str]] = field(default_factory=list)  # {location, kind, reason}, each one
    skipped_by_kind: dict[str, int] = field(default_factory=dict)
    hidden_files: int = 0  # files under hidden names in a folder (.git, .DS_Store): not read
    shard: str | None = None
    sync_note: str | None = None
    elapsed_s: float = 0.0
    embed_s: float = 0.0
    total_documents: int = 0
    total_chunks: int = 0

    @property
    def chunks_per_s(self) -> float:
        return self.chunks_embedded / self.elapsed_s if self.elapsed_s else 0.0

    def skip(self, record: BadRecord) -> None:
        self.bad_records += 1
        self.skipped_by_kind[record.kind] = self.skipped_by_kind.get(record.kind, 0) + 1
        if len(self.skipped) < _MAX_SKIPPED:
            self.skipped.append({"location": record.location, "kind": record.kind, "reason": record.reason})
        if len(self.bad_examples) < _MAX_EXAMPLES:
            self.bad_examples.append(str(record))

    def summary(self) -> str:
        """One line of counts, then one line per skipped file or record (path and reason)."""
        formats = ", ".join(f"{fmt} {n}" for fmt, n in sorted(self.formats.items()))
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(self.skipped_by_kind.items()))
        parts = [
            f"{self.collection}: {self.documents} documents read" + (f" ({formats})" if formats else ""),
            f"{self.new} new, {self.updated} updated, {self.unchanged} unchanged"
            + (f" ({self.acl_updated} with new permissions)" if self.acl_updated else "")
            + f", {self.deleted} deleted",
            f"{self.chunks_embedded} chunks embedded in {self.elapsed_s:.1f}s ({self.chunks_per_s:.1f}/s)",
            f"{self.bad_records} bad records skipped" + (f" ({kinds})" if kinds else ""),
            f"index now {self.total_documents} documents / {self.total_chunks} chunks",
        ]
        if self.shard:
            parts.insert(1, f"shard {self.shard}")
        if self.hidden_files:
            parts.append(f"{self.hidden_files} hidden files (names starting with '.') not read")
        line = "; ".join(parts) + (f"; {self.sync_note}" if self.sync_note else "")
        more = self.bad_records - len(self.skipped)
        lines = [f"  skipped {s['location']}: {s['reason']}" for s in self.skipped]
        return "\n".join([line, *lines, *([f"  ... and {more} more"] if more > 0 else [])])


@dataclass
class _Work:
    """Chunks to embed, each with its document and that document's hash and chunk count."""

    items: list[tuple[Document, str, int, Chunk]]


class Progress:
    """Docs, chunks, chunks/s and ETA: a tqdm bar on a terminal, a line every few seconds otherwise.

    Progress is measured in source bytes of work finished: documents whose chunks are all
    written (or found unchanged), plus input that needs no writing (bad records, other
    shards). Bytes merely read ahead sit in queues and say nothing about the time left.
    """

    def __init__(self, total_bytes: int | None, interval_s: float, enabled: bool = True) -> None:
        self.enabled = enabled
        self.interval_s = interval_s
        self.start = time.monotonic()
        self._last = self.start
        self._bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="ingest", file=sys.stderr)
        self.total_bytes = total_bytes

    def update(self, done_bytes: int, documents: int, chunks: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        rate = chunks / max(now - self.start, 1e-9)
        if self._bar is not None:
            self._bar.n = done_bytes
            self._bar.set_postfix(docs=documents, chunks=chunks, chunks_s=f"{rate:.1f}", refresh=True)
        elif now - self._last >= self.interval_s:
            self._last = now
            print(f"ingest: {documents} docs, {chunks} chunks written, {rate:.1f} chunks/s"
                  f"{self.eta(done_bytes, now)}", file=sys.stderr)  # fmt: skip

    def eta(self, done_bytes: int, now: float) -> str:
        """', ETA Ns' from the rate of finished work, or '' before any is finished."""
        if not self.total_bytes or done_bytes <= 0:
            return ""
        left = max(self.total_bytes - done_bytes, 0)
        done = 100 * min(done_bytes / self.total_bytes, 1)
        return f", {done:.0f}% done, ETA {(now - self.start) * left / done_bytes:.0f}s"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class Ingestor:
    """Runs one ingest of a record stream into one collection version."""

    def __init__(
        self,
        store: VectorStore,
        embedder: Embedder,
        chunker: Chunker,
        settings: IngestSettings,
        progress: Progress | None = None,
    ) -> None:
        self.store = store
        self.embedder = embedder
        self.chunker = chunker
        self.settings = settings
        self.progress = progress or Progress(None, settings.progress_interval_s, enabled=False)
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self._done_lock = threading.Lock()  # progress: the reader (unchanged documents) and the writer add
        self._done_bytes = 0
        self._unidentified = 0  # bad records whose document id is unknown (--sync cannot be sure)
        self._passed: Callable[[], int] = lambda: 0

    def _finished(self, size: int, report: IngestReport) -> None:
        """Count `size` source bytes as finished and show progress (from the reader and the
        writer thread: one lock, so progress is reported in order and only grows)."""
        with self._done_lock:
            self._done_bytes += size
            self.progress.update(self._done_bytes + self._passed(), report.documents, report.chunks_embedded)

    def run(
        self,
        records: Iterable[Document | BadRecord],
        manifest: CollectionManifest,
        *,
        sync: bool = False,
        strict: bool = False,
        bytes_passed: Callable[[], int] | None = None,
    ) -> IngestReport:
        """Ingest `records` into `manifest.collection`; counts in the manifest are updated at the end.

        `bytes_passed` says how many source bytes the reader consumed without yielding a
        document to write (progress counts them as finished).
        """
        report = IngestReport(collection=manifest.collection)
        self._passed = bytes_passed or (lambda: 0)
        started = time.monotonic()
        to_embed: queue.Queue[Any] = queue.Queue(self.settings.queue_batches)
        to_write: queue.Queue[Any] = queue.Queue(self.settings.queue_batches)
        seen: set[str] = set()
        reader = threading.Thread(
            target=self._guard,
            args=(self._read, records, manifest.collection, report, seen, strict, to_embed),
            name="ingest-read",
            daemon=True,
        )
        writer = threading.Thread(
            target=self._guard,
            args=(self._write, manifest.collection, sparse_encoder(manifest.sparse), to_write, report),
            name="ingest-write",
            daemon=True,
        )
        reader.start()
        writer.start()
        try:
            self._embed(to_embed, to_write, report)
        except BaseException:
            self._stop.set()
            raise
        finally:
            self._put(to_write, _DONE)
            writer.join()
            reader.join()
            self.progress.close()
        if self._errors:
            raise self._errors[0]
        if sync:
            self._sync(manifest.collection, seen, report)
        # Optimising holds the embedded engine (and the GIL) for seconds to minutes: searches wait.
        # So only after bulk loads; a small job's points are found exactly until the next one.
        first_fill = manifest.chunks == 0
        manifest.unoptimized += report.chunks_embedded + report.deleted
        if first_fill or manifest.unoptimized >= self.settings.optimize_after:
            self.store.optimize(manifest.collection)
            manifest.unoptimized = 0
        report.total_chunks = self.store.count(manifest.collection)
        report.total_documents = self.store.count(
            manifest.collection, Filter(must=(Equals("chunk_index", 0),))
        )
        manifest.documents, manifest.chunks = report.total_documents, report.total_chunks
        self.store.write_manifest(manifest)
        report.elapsed_s = time.monotonic() - started
        return report

    # -- stages ----------------------------------------------------------------------------

    def _guard(self, fn: Any, *args: Any) -> None:
        """Run a stage in a thread; the first failure stops every stage and is re-raised by run()."""
        try:
            fn(*args)
        except BaseException as exc:
            self._errors.append(exc)
            self._stop.set()

    def _put(self, q: "queue.Queue[Any]", item: Any) -> None:
        """Put without deadlocking when another stage has died."""
        while True:
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                if self._stop.is_set():  # the consumer has stopped (or will on its next get)
                    return

    def _get(self, q: "queue.Queue[Any]") -> Any:
        while True:
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set():
                    return _DONE

    def _read(
        self,
        records: Iterable[Document | BadRecord],
        collection: str,
        report: IngestReport,
        seen: set[str],
        strict: bool,
        out: "queue.Queue[Any]",
    ) -> None:
        batch: list[Document] = []
        pending: list[tuple[Document, str, int, Chunk]] = []
        try:
            for record in self._unique(records, seen, report, strict):
                if self._stop.is_set():
                    return
                batch.append(record)
                if len(batch) >= self.settings.lookup_docs:
                    pending = self._plan(collection, batch, report, pending, out)
                    batch = []
            pending = self._plan(collection, batch, report, pending, out)
            if pending:
                self._put(out, _Work(pending))
        finally:
            self._put(out, _DONE)

    def _unique(
        self, records: Iterable[Document | BadRecord], seen: set[str], report: IngestReport, strict: bool
    ) -> Iterator[Document]:
        """Documents with ids not seen before in this run; bad records reported (or fatal with strict)."""
        for record in records:
            if isinstance(record, Document) and record.id in seen:
                record = BadRecord(
                    record.source or "input",
                    f"duplicate id {record.id!r} in this run; skipped",
                    "duplicate",
                    record.id,
                )
            if isinstance(record, BadRecord):
                if strict:
                    raise InputError(f"{record} (--strict)")
                report.skip(record)
                if record.doc_id is not None:  # still there, unreadable now: --sync must not delete it
                    seen.add(record.doc_id)
                else:
                    self._unidentified += 1
                print(f"twostage: skipped {record}", file=sys.stderr)
                continue
            seen.add(record.id)
            report.documents += 1
            report.formats[record.format] = report.formats.get(record.format, 0) + 1
            yield record

    def _plan(
        self,
        collection: str,
        docs: list[Document],
        report: IngestReport,
        pending: list[tuple[Document, str, int, Chunk]],
        out: "queue.Queue[Any]",
    ) -> list[tuple[Document, str, int, Chunk]]:
        """Skip documents stored complete with the same hash; chunk the rest and queue their chunks."""
        if not docs:
            return pending
        stored: dict[str, list[dict[str, Any]]] = {}
        ids = tuple(d.id for d in docs)
        for rec in self.store.scroll(
            collection,
            Filter(must=(AnyOf("doc_id", ids),)),
            ["doc_id", "chunk_index", "doc_hash", "n_chunks", ACL_FIELD],
        ):
            stored.setdefault(rec.payload["doc_id"], []).append(rec.payload)
        per_batch = max(16, self.settings.lookup_docs)
        for doc in docs:
            doc_hash = doc.content_hash
            old = stored.get(doc.id, [])
            if old and _complete(old, doc_hash):
                report.unchanged += 1
                acl = stored_acl(doc.acl)
                if any(p.get(ACL_FIELD) != acl for p in old):  # permissions alone: no re-embedding
                    self.store.set_payload(
                        collection, Filter(must=(Equals("doc_id", doc.id),)), {ACL_FIELD: acl}
                    )
                    report.acl_updated += 1
                self._finished(doc.size, report)
                continue
            if old:
                report.updated += 1
            else:
                report.new += 1
            chunks = self.chunker.chunk_document(doc)
            pending += [(doc, doc_hash, len(chunks), c) for c in chunks]
            while len(pending) >= per_batch:
                self._put(out, _Work(pending[:per_batch]))
                pending = pending[per_batch:]
        return pending

    def _embed(self, inbox: "queue.Queue[Any]", outbox: "queue.Queue[Any]", report: IngestReport) -> None:
        while (work := self._get(inbox)) is not _DONE:
            started = time.monotonic()
            vectors = self.embedder.embed_documents([item[3].embed_text for item in work.items])
            report.embed_s += time.monotonic() - started
            self._put(outbox, (work, vectors))

    def _write(
        self,
        collection: str,
        encoder: Bm25Encoder | None,
        inbox: "queue.Queue[Any]",
        report: IngestReport,
    ) -> None:
        remaining: dict[str, int] = {}
        while (entry := self._get(inbox)) is not _DONE:
            work, vectors = entry
            texts = [item[3].embed_text for item in work.items]
            sparse = encoder.embed_documents(texts) if encoder else [None] * len(texts)
            points = [
                Point(chunk.point_id, vector, chunk_payload(doc, chunk, doc_hash, n), sv)
                for (doc, doc_hash, n, chunk), vector, sv in zip(work.items, vectors, sparse, strict=True)
            ]
            self.store.upsert(collection, points)
            report.chunks_embedded += len(points)
            finished = 0
            for doc, doc_hash, n, _ in work.items:
                remaining[doc.id] = remaining.get(doc.id, n) - 1
                if remaining[doc.id] == 0:  # all new chunks stored: now the old ones may go
                    del remaining[doc.id]
                    self.store.delete(
                        collection,
                        Filter(must=(Equals("doc_id", doc.id),), must_not=(Equals("doc_hash", doc_hash),)),
                    )
                    finished += doc.size
            self._finished(finished, report)

    def _sync(self, collection: str, seen: set[str], report: IngestReport) -> None:
        """Delete documents that are no longer in the source.

        A file that exists but could not be read keeps what was indexed from it (its id is in
        `seen`). A bad JSONL record without a usable id could be any document, so then nothing
        is deleted.
        """
        if self._unidentified:
            report.sync_note = (
                f"--sync skipped: {report.bad_records} bad records, so vanished documents cannot be told "
                "from unreadable ones; fix them and rerun"
            )
            return
        stored = {r.payload["doc_id"] for r in self.store.scroll(collection, None, ["doc_id"])}
        gone = sorted(stored - seen)
        for i in range(0, len(gone), 256):
            self.store.delete(collection, Filter(must=(AnyOf("doc_id", tuple(gone[i : i + 256])),)))
        report.deleted = len(gone)


def _complete(stored: list[dict[str, Any]], doc_hash: str) -> bool:
    """True when exactly chunks 0..n-1 are stored, all with the current document hash."""
    n = stored[0].get("n_chunks")
    return (
        isinstance(n, int)
        and all(p.get("doc_hash") == doc_hash and p.get("n_chunks") == n for p in stored)
        and sorted(int(p.get("chunk_index", -1)) for p in stored) == list(range(n))
    )


def ingest_corpus(
    records: Iterable[Document | BadRecord],
    *,
    store: VectorStore,
    embedder: Embedder,
    chunker: Chunker,
    settings: IngestionSettings,
    collection: str,
    sync: bool = False,
    strict: bool = False,
    new_version: bool = False,
    progress: Progress | None = None,
    bytes_passed: Callable[[], int] | None = None,
) -> IngestReport:
    """Pick (or create) the collection version, ingest, and switch the alias when the version is new.

    Nothing is created until the corpus has yielded its first good document, so an empty
    or wholly unreadable corpus leaves the store untouched.
    """
    stream = iter(records)
    head: list[Document | BadRecord] = []
    for record in stream:
        head.append(record)
        if isinstance(record, Document):
            break
        if strict:
            raise InputError(f"{record} (--strict)")
    if not any(isinstance(r, Document) for r in head):
        bad = "; ".join(str(r) for r in head[:3])
        raise InputError(f"no documents to ingest ({len(head)} bad records{': ' + bad if bad else ''})")
    manifest, switch = version_for_ingest(store, collection, embedder, settings, new_version)
    ingestor = Ingestor(store, embedder, chunker, settings.ingest, progress)
    report = ingestor.run(
        itertools.chain(head, stream), manifest, sync=sync, strict=strict, bytes_passed=bytes_passed
    )
    if switch:
        manifest.status = "ready"
        store.write_manifest(manifest)
        store.set_alias(collection, manifest.collection)
    elif manifest.status != "ready":
        manifest.status = "ready"
        store.write_manifest(manifest)
    return report
