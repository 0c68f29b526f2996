"""Ingestion through the API: the server owns the embedded store, so writers come here."""

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from twostage.api.deps import ServiceDep, WriteAccess
from twostage.retrieval.errors import InputError, NotFound
from twostage.retrieval.ingest.documents import BadRecord, Document
from twostage.retrieval.ingest.readers import make_document
from twostage.retrieval.store.vector_store import check_collection_name

router = APIRouter(tags=["documents"], dependencies=[WriteAccess])


class DocumentIn(BaseModel):
    id: str = Field(min_length=1, max_length=512)
    text: str
    title: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)


class DocumentsRequest(BaseModel):
    collection: str | None = None
    documents: list[DocumentIn] = Field(min_length=1, max_length=1000)


@router.post("/v1/documents", status_code=202)
async def upsert_documents(body: DocumentsRequest, service: ServiceDep) -> dict[str, Any]:
    """Validate now (bad documents are listed), ingest in the background; poll the job."""
    collection = check_collection_name(body.collection or service.settings.collection)
    limit = service.settings.ingest.max_document_chars
    records: list[Document | BadRecord] = [
        make_document(d.id, d.text, d.title, "api", d.metadata, f"documents[{i}]", limit)
        for i, d in enumerate(body.documents)
    ]
    rejected = [str(r) for r in records if isinstance(r, BadRecord)]
    if len(rejected) == len(records):
        raise InputError(f"no valid documents: {'; '.join(rejected[:5])}")
    assert service.jobs is not None
    job = service.jobs.submit(collection, records)
    return {"job_id": job.id, "status": job.status, "documents": job.documents, "rejected": rejected}


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, service: ServiceDep) -> dict[str, Any]:
    assert service.jobs is not None
    job = service.jobs.get(job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r} (the newest 1000 jobs are kept)")
    return job.public()


@router.delete("/v1/documents/{doc_id}")
async def delete_document(doc_id: str, service: ServiceDep, collection: str | None = None) -> dict[str, Any]:
    name = check_collection_name(collection or service.settings.collection)
    assert service.jobs is not None
    removed = await run_in_threadpool(service.jobs.delete_document, name, doc_id)
    if not removed:
        raise NotFound(f"document {doc_id!r} is not in {name}")
    return {"doc_id": doc_id, "deleted_chunks": removed}
