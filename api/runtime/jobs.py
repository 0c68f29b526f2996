"""Background jobs for the API (embedded mode: the server owns the store): ingestion, retrain.

One worker thread runs jobs in submission order, so ingestion never races itself on a
collection, nor a retrain's reindex; deletions take the same lock. Each job's state is
written to `DATA/jobs/ID.json` whenever it changes (the newest `keep` are kept), so
`GET /v1/jobs/{id}` outlives the process: a job a crash interrupted (even `kill -9`) is
reported failed after the restart, with what to do. Resubmitting it is safe: ingestion is
idempotent (deterministic chunk ids, unchanged documents skipped) and a retrain cleans up
after a crashed one.
"""

import json
import logging
import queue
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from twostage.retrieval.core.errors import Overloaded
from twostage.retrieval.ingest.chunker import Chunker
from twostage.retrieval.ingest.documents import BadRecord, Document
from twostage.retrieval.ingest.pipeline import Progress, ingest_corpus
from twostage.retrieval.ingest.settings import IngestionSettings
from twostage.retrieval.models.embedder import Embedder
from twostage.retrieval.models.tokens import Qwen3Tokens
from twostage.retrieval.search.two_stage import Deployment
from twostage.retrieval.store.locks import write_json_atomic
from twostage.retrieval.store.vector_store import (
    AnyOf,
    CollectionNotFound,
    Filter,
    StoreError,
    VectorStore,
    now_iso,
)


class JobHost(Protocol):
    """What a job needs of the service that runs it (`service.Service`): its settings, store,
    tokenizer, default embedder and the deployment each collection serves."""

    @property
    def settings(self) -> IngestionSettings: ...
    @property
    def store(self) -> VectorStore | None: ...
    @property
    def embedder(self) -> Embedder | None: ...
    @property
    def tokens(self) -> Qwen3Tokens: ...

    def deployment(self, collection: str) -> Deployment: ...


log = logging.getLogger("twostage.api")
DELETE_WAIT_S = 2.0  # how long a delete waits for a running job before it is refused (409)


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
    progress: dict[str, int] = field(default_factory=dict)  # an ingest's documents read, chunks written
    owner: str | None = None  # the API key's name that submitted it: only it (or an admin) reads it

    def public(self) -> dict[str, Any]:
        return asdict(self)

    def say(self, line: str) -> None:
        self.log = [*self.log[-199:], line]


class JobProgress(Progress):
    """An ingest job's progress, on the job (`GET /v1/jobs/{id}` shows it) instead of stderr."""

    def __init__(self, job: Job) -> None:
        super().__init__(None, 1.0, enabled=False)
        self.job = job

    def update(self, bytes_read: int, documents: int, chunks: int) -> None:
        self.job.progress = {"documents_read": documents, "chunks_written": chunks}


class JobRunner:
    """Runs jobs one at a time in a worker thread."""

    def __init__(self, service: JobHost, keep: int = 1000, max_queued: int = 64) -> None:
        self.service = service
        self.keep = keep
        self.lock = threading.Lock()  # held while a job writes; deletions take it too
        self.running: Job | None = None
        self._folder = Path(service.settings.data_dir) / "jobs"
        self._jobs: OrderedDict[str, Job] = self._recover()
        self._queue: queue.Queue[tuple[Job, Callable[[Job], dict[str, Any]]] | None] = queue.Queue(max_queued)
        self._worker = threading.Thread(target=self._loop, name="jobs", daemon=True)
        self._worker.start()

    def submit(self, collection: str, records: list[Document | BadRecord], owner: str | None = None) -> Job:
        job = Job(uuid.uuid4().hex, collection, sum(isinstance(r, Document) for r in records), owner=owner)
        return self._enqueue(job, lambda _: asdict(self._ingest(collection, records, JobProgress(job))))

    def submit_work(
        self, collection: str, kind: Literal["retrain"], work: Callable[[Job], dict[str, Any]],
        owner: str | None = None,
    ) -> Job:  # fmt: skip
        """Any other job (a retrain): `work(job)` returns the report and may `job.say` progress."""
        return self._enqueue(Job(uuid.uuid4().hex, collection, 0, kind=kind, owner=owner), work)

    def _enqueue(self, job: Job, work: Callable[[Job], dict[str, Any]]) -> Job:
        try:
            self._queue.put_nowait((job, work))
        except queue.Full:
            raise Overloaded("jobs", 5, self._queue.qsize(), self._queue.maxsize) from None
        self._jobs[job.id] = job
        self._save(job)
        while len(self._jobs) > self.keep:
            old, _ = self._jobs.popitem(last=False)
            (self._folder / f"{old}.json").unlink(missing_ok=True)
        return job

    def _save(self, job: Job) -> None:
        """The job's state on disk (atomically), for `GET /v1/jobs/{id}` after a restart."""
        try:
            self._folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self._folder / f"{job.id}.json", job.public())
        except OSError:  # a full disk must not fail the job itself; the state stays in memory
            log.warning("could not save the state of job %s", job.id, exc_info=True)

    def _recover(self) -> "OrderedDict[str, Job]":
        """Jobs of earlier runs, oldest first; those a crash interrupted are marked failed."""
        jobs: OrderedDict[str, Job] = OrderedDict()
        found = []
        for path in self._folder.glob("*.json") if self._folder.is_dir() else []:
            try:
                found.append(Job(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                log.warning("ignoring unreadable job file %s", path)
        for job in sorted(found, key=lambda j: j.created_at)[-self.keep :]:
            if job.status in {"queued", "running"}:
                job.error = (
                    f"interrupted: the server stopped while this job was {job.status}; submit it again "
                    "(ingestion is idempotent: documents already stored are skipped, none is duplicated)"
                )
                job.status, job.finished_at = "failed", now_iso()
                self._save(job)
            jobs[job.id] = job
        return jobs

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def delete_document(
        self, collection: str, doc_id: str, visible: Callable[[Filter], Filter | None] = lambda f: f
    ) -> int:
        """Delete a document's chunks from the live version; returns how many were removed (0 for a
        document the caller may not see: `visible` adds the caller's permissions to the filter).

        Waits at most `DELETE_WAIT_S` for a running job (a retrain holds the lock for minutes),
        then refuses with 409 naming the job, so the caller is answered promptly either way.
        """
        service = self.service
        assert service.store is not None
        if not self.lock.acquire(timeout=DELETE_WAIT_S):
            job = self.running
            doing = f"{job.kind} job {job.id}" if job is not None else "another job"
            raise StoreError(
                f"{collection} is being written by {doing}; retry the delete when it has finished"
                + (f" (GET /v1/jobs/{job.id})" if job is not None else "")
            )
        try:
            target = service.deployment(collection).collection
            flt = visible(Filter(must=(AnyOf("doc_id", (doc_id,)),)))
            assert flt is not None
            removed = service.store.count(target, flt)
            if removed:
                service.store.delete(target, flt)
            return removed
        finally:
            self.lock.release()

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
            self._save(job)
            try:
                with self.lock:
                    self.running = job
                    try:
                        report = work(job)
                    finally:
                        self.running = None
                job.report, job.status = report, "succeeded"
            except Exception as exc:  # reported on the job, never crashes the worker
                job.error, job.status = str(exc), "failed"
            job.finished_at = now_iso()
            self._save(job)

    def _ingest(self, collection: str, records: list[Document | BadRecord], progress: Progress) -> Any:
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
            chunker=Chunker.for_embedder(service.tokens, service.settings.chunker, embedder),
            settings=service.settings,
            collection=collection,
            progress=progress,
        )
