"""Background ingestion jobs for the API (embedded mode: the server owns the store).

One worker thread runs jobs in submission order, so ingestion never races itself on a
collection; deletions take the same lock. Jobs are kept in memory (the newest
`keep` of them) for `GET /v1/jobs/{id}`; an interrupted job is simply submitted again,
since ingestion is idempotent.
"""

import queue
import threading
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from api.micro_batcher import Overloaded
from retrieval.chunker import Chunker
from retrieval.documents import BadRecord, Document
from retrieval.ingest import ingest_corpus
from retrieval.store import AnyOf, Filter, now_iso

if TYPE_CHECKING:
    from api.service import Service


@dataclass
class Job:
    id: str
    collection: str
    documents: int
    status: Literal["queued", "running", "succeeded", "failed"] = "queued"
    created_at: str = field(default_factory=now_iso)
    finished_at: str | None = None
    report: dict[str, Any] | None = None
    error: str | None = None

    def public(self) -> dict[str, Any]:
        return asdict(self)


class JobRunner:
    """Runs ingestion jobs one at a time in a worker thread."""

    def __init__(self, service: "Service", keep: int = 1000, max_queued: int = 64) -> None:
        self.service = service
        self.keep = keep
        self.lock = threading.Lock()  # held while a job writes; deletions take it too
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._queue: queue.Queue[tuple[Job, list[Document | BadRecord]] | None] = queue.Queue(max_queued)
        self._worker = threading.Thread(target=self._loop, name="ingest-jobs", daemon=True)
        self._worker.start()

    def submit(self, collection: str, records: list[Document | BadRecord]) -> Job:
        job = Job(uuid.uuid4().hex, collection, sum(isinstance(r, Document) for r in records))
        try:
            self._queue.put_nowait((job, records))
        except queue.Full:
            raise Overloaded("ingestion", retry_after_s=5) from None
        self._jobs[job.id] = job
        while len(self._jobs) > self.keep:
            self._jobs.popitem(last=False)
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def delete_document(self, collection: str, doc_id: str) -> int:
        """Delete a document's chunks from the live version; returns how many were removed."""
        service = self.service
        assert service.store is not None
        with self.lock:
            target = service.deployment(collection).collection
            flt = Filter(must=(AnyOf("doc_id", (doc_id,)),))
            removed = service.store.count(target, flt)
            if removed:
                service.store.delete(target, flt)
            return removed

    def close(self, timeout_s: float) -> None:
        """Let the running job finish (bounded); queued jobs are dropped (resubmit: idempotent)."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        self._worker.join(timeout=timeout_s)

    def _loop(self) -> None:
        while (entry := self._queue.get()) is not None:
            job, records = entry
            job.status = "running"
            try:
                with self.lock:
                    report = self._ingest(job.collection, records)
                job.report, job.status = asdict(report), "succeeded"
            except Exception as exc:  # reported on the job, never crashes the worker
                job.error, job.status = str(exc), "failed"
            job.finished_at = now_iso()

    def _ingest(self, collection: str, records: list[Document | BadRecord]) -> Any:
        service = self.service
        assert service.store is not None and service.embedder is not None
        return ingest_corpus(
            records,
            store=service.store,
            embedder=service.embedder,
            chunker=Chunker(service.tokens, service.settings.chunker),
            settings=service.settings,
            collection=collection,
        )
