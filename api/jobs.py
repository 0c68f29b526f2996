"""Background jobs for the API (embedded mode: the server owns the store): ingestion, retrain.

One worker thread runs jobs in submission order, so ingestion never races itself on a
collection, nor a retrain's reindex; deletions take the same lock. Jobs are kept in memory
(the newest `keep` of them) for `GET /v1/jobs/{id}`; an interrupted job is simply submitted
again, since ingestion is idempotent and a retrain cleans up after a crashed one.
"""

import queue
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from twostage.api.micro_batcher import Overloaded
from twostage.retrieval.chunker import Chunker
from twostage.retrieval.documents import BadRecord, Document
from twostage.retrieval.ingest import ingest_corpus
from twostage.retrieval.store import AnyOf, CollectionNotFound, Filter, now_iso

if TYPE_CHECKING:
    from twostage.api.service import Service


@dataclass
class Job:
    id: str
    collection: str
    documents: int
    kind: Literal["ingest", "retrain"] = "ingest"
    status: Literal["queued", "running", "succeeded", "failed"] = "queued"
    created_at: str = field(default_factory=now_iso)
    finished_at: str | None = None
    report: dict[str, Any] | None = None
    error: str | None = None
    log: list[str] = field(default_factory=list)  # progress lines (a retrain's; the newest 200)

    def public(self) -> dict[str, Any]:
        return asdict(self)

    def say(self, line: str) -> None:
        self.log = [*self.log[-199:], line]


class JobRunner:
    """Runs jobs one at a time in a worker thread."""

    def __init__(self, service: "Service", keep: int = 1000, max_queued: int = 64) -> None:
        self.service = service
        self.keep = keep
        self.lock = threading.Lock()  # held while a job writes; deletions take it too
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._queue: queue.Queue[tuple[Job, Callable[[Job], dict[str, Any]]] | None] = queue.Queue(max_queued)
        self._worker = threading.Thread(target=self._loop, name="jobs", daemon=True)
        self._worker.start()

    def submit(self, collection: str, records: list[Document | BadRecord]) -> Job:
        job = Job(uuid.uuid4().hex, collection, sum(isinstance(r, Document) for r in records))
        return self._enqueue(job, lambda _: asdict(self._ingest(collection, records)))

    def submit_work(
        self, collection: str, kind: Literal["retrain"], work: Callable[[Job], dict[str, Any]]
    ) -> Job:
        """Any other job (a retrain): `work(job)` returns the report and may `job.say` progress."""
        return self._enqueue(Job(uuid.uuid4().hex, collection, 0, kind=kind), work)

    def _enqueue(self, job: Job, work: Callable[[Job], dict[str, Any]]) -> Job:
        try:
            self._queue.put_nowait((job, work))
        except queue.Full:
            raise Overloaded("jobs", 5, self._queue.qsize(), self._queue.maxsize) from None
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
            job, work = entry
            job.status = "running"
            try:
                with self.lock:
                    report = work(job)
                job.report, job.status = report, "succeeded"
            except Exception as exc:  # reported on the job, never crashes the worker
                job.error, job.status = str(exc), "failed"
            job.finished_at = now_iso()

    def _ingest(self, collection: str, records: list[Document | BadRecord]) -> Any:
        service = self.service
        assert service.store is not None and service.embedder is not None
        try:  # the deployed embedder of an existing collection (it changes after a retrain)
            embedder = service.deployment(collection).embedder
        except CollectionNotFound:
            embedder = service.embedder
        return ingest_corpus(
            records,
            store=service.store,
            embedder=embedder,
            chunker=Chunker(service.tokens, service.settings.chunker),
            settings=service.settings,
            collection=collection,
        )
