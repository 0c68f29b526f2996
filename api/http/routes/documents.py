"""Ingestion through the API: the server owns the embedded store, so writers come here.

`POST /v1/documents` takes either JSON (documents already as text, optionally with their
sections and pages, as `twostage ingest --server` sends them) or a multipart upload of files
(PDF, Word, HTML, Markdown...), extracted here exactly as `twostage ingest` extracts a folder.
An upload's file name is only a name: it becomes the document's id and `source`, never a
path on the server (files are written under generated names and removed once extracted).
"""

import re
import tempfile
import unicodedata
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from twostage.api.http.deps import IngestAccess, ServiceDep
from twostage.api.runtime.service import Service
from twostage.retrieval.access.caller import Caller
from twostage.retrieval.access.principals import ACL_FIELD, PUBLIC, parse_acl
from twostage.retrieval.core.errors import InputError, NotFound
from twostage.retrieval.ingest.documents import BadRecord, Document, Section
from twostage.retrieval.ingest.formats import format_of
from twostage.retrieval.ingest.readers import extract_file, make_document
from twostage.retrieval.models.source import shown_paths
from twostage.retrieval.store.vector_store import (
    AnyOf,
    CollectionNotFound,
    Equals,
    Filter,
    check_collection_name,
)

router = APIRouter(tags=["documents"], dependencies=[IngestAccess])
IngestCaller = Annotated[Caller, IngestAccess]
Record = Document | BadRecord
MAX_FILES = 100  # per upload request


class SectionIn(BaseModel):
    start: int = Field(ge=0)
    end: int = Field(ge=0)
    headings: list[str] = Field(default_factory=list, max_length=32)


class DocumentIn(BaseModel):
    id: str = Field(min_length=1, max_length=512)
    text: str
    title: str = ""
    source: str = Field("", max_length=1024, description="where it comes from, as the hits will cite it")
    metadata: dict[str, Any] = Field(default_factory=dict)
    sections: list[SectionIn] = Field(default_factory=list, description="spans of text under a heading path")
    pages: list[int] = Field(default_factory=list, description="offsets where pages 1, 2, ... start")
    format: str = Field("jsonl", max_length=32)
    acl: list[str] | None = Field(
        None, max_length=256, description="who may see it: principals (user:NAME, group:NAME, tenant:NAME) "
        "or ['public']; default: the key's own principals (an admin's: access.default decides)",
    )  # fmt: skip


class DocumentsRequest(BaseModel):
    collection: str | None = None
    documents: list[DocumentIn] = Field(min_length=1, max_length=1000)


_REF = "#/components/schemas/{model}"
_BODIES = {
    "application/json": {"schema": {"$ref": _REF.format(model="DocumentsRequest")}},
    "multipart/form-data": {
        "schema": {
            "type": "object",
            "properties": {
                "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
                "collection": {"type": "string"},
                "acl": {"type": "string", "description": "principals, comma-separated, for every file"},
            },
            "required": ["file"],
        }
    },
}


def openapi_schemas() -> dict[str, Any]:
    """The JSON body's schemas, for the app's OpenAPI components (the route reads its body itself,
    JSON or multipart, so FastAPI does not list them)."""
    schema = DocumentsRequest.model_json_schema(ref_template=_REF)
    return {"DocumentsRequest": {k: v for k, v in schema.items() if k != "$defs"}, **schema.get("$defs", {})}


@router.post(
    "/v1/documents", status_code=202, openapi_extra={"requestBody": {"content": _BODIES, "required": True}}
)
async def upsert_documents(request: Request, service: ServiceDep, caller: IngestCaller) -> dict[str, Any]:
    """Validate now (bad documents and unreadable files are listed), ingest in the background;
    poll the job."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        collection, records = await _uploaded(request, service)
    else:
        try:
            body = DocumentsRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from None
        collection = body.collection
        limit = service.settings.ingest.max_document_chars
        records = [_json_document(d, f"documents[{i}]", limit) for i, d in enumerate(body.documents)]
    name = check_collection_name(collection or service.settings.collection)
    caller.require_collection(name)
    records = await run_in_threadpool(_permitted, service, caller, name, records)
    rejected = [str(r) for r in records if isinstance(r, BadRecord)]
    if len(rejected) == len(records):
        raise InputError(f"no valid documents: {'; '.join(rejected[:5])}")
    assert service.jobs is not None
    job = service.jobs.submit(name, records, owner=caller.key)
    return {"job_id": job.id, "status": job.status, "documents": job.documents, "rejected": rejected}


def _permitted(service: Service, caller: Caller, collection: str, records: list[Record]) -> list[Record]:
    """Each document with the ACL it will be stored with, or a BadRecord: a key with principals
    grants only its own (or public), gives its own to a document sent without an ACL, and may not
    replace a document it cannot see (which is answered as not permitted, never as existing)."""
    own = caller.principals
    if own is None:  # an admin, or no key carries principals: what was sent is stored
        return records
    ids = tuple(r.id for r in records if isinstance(r, Document))
    hidden: set[str] = set()
    if ids and collection_exists(service, collection):
        target = service.deployment(collection).collection
        assert service.store is not None
        anyone = Filter(must=(AnyOf("doc_id", ids),))
        mine = service.visible(caller, anyone)
        seen = {r.payload["doc_id"] for r in service.store.scroll(target, mine, ["doc_id"])}
        hidden = {r.payload["doc_id"] for r in service.store.scroll(target, anyone, ["doc_id"])} - seen
    out: list[Record] = []
    for record in records:
        if not isinstance(record, Document):
            out.append(record)
        elif record.id in hidden:
            out.append(
                BadRecord(record.id, f"not permitted: key {caller.key!r} may not replace {record.id!r}")
            )
        elif record.acl is None:
            out.append(replace(record, acl=tuple(sorted(own))) if own else record)
        elif not set(record.acl) <= own | {PUBLIC}:
            out.append(BadRecord(record.id, f"not permitted: key {caller.key!r} may grant only its own "
                                 f"principals ({', '.join(sorted(own)) or 'none'}) or public"))  # fmt: skip
        else:
            out.append(record)
    return out


def collection_exists(service: Service, collection: str) -> bool:
    try:
        service.deployment(collection)
    except CollectionNotFound:
        return False
    return True


def _json_document(d: DocumentIn, location: str, limit: int) -> Document | BadRecord:
    sections = tuple(Section(s.start, s.end, tuple(s.headings)) for s in d.sections)
    if sections or d.pages:
        if not unicodedata.is_normalized("NFC", d.text):
            return BadRecord(location, "sections and pages need NFC-normalised text (their offsets index it)")
        ends = [0, *(x for s in sections for x in (s.start, s.end)), len(d.text)]
        if (
            ends != sorted(ends)
            or any(p < 0 or p > len(d.text) for p in d.pages)
            or d.pages != sorted(d.pages)
        ):
            return BadRecord(
                location, "sections must be ordered spans of the text, pages ordered offsets into it"
            )
    try:
        acl = None if d.acl is None else parse_acl(d.acl, f"{location}.acl")
    except InputError as exc:
        return BadRecord(location, str(exc), doc_id=d.id)
    if ACL_FIELD in d.metadata:
        return BadRecord(
            location, f"'metadata.{ACL_FIELD}' is reserved: send permissions as 'acl'", doc_id=d.id
        )
    record = make_document(d.id, d.text, d.title, d.source or "api", d.metadata, location, limit,
                           sections=sections, pages=tuple(d.pages), fmt=d.format)  # fmt: skip
    return replace(record, acl=acl) if isinstance(record, Document) and acl is not None else record


async def _uploaded(request: Request, service: ServiceDep) -> tuple[str | None, list[Document | BadRecord]]:
    """The uploaded files, each extracted as a document (or a BadRecord naming it and why not)."""
    form = await request.form(max_files=MAX_FILES, max_fields=8)
    try:
        uploads = [v for v in form.getlist("file") if isinstance(v, UploadFile)]
        if not uploads:
            raise InputError(
                f"no files: send them as multipart form fields named 'file' (at most {MAX_FILES})"
            )
        collection = form.get("collection")
        given = form.get("acl")
        acl = parse_acl(given, "the form field acl") if isinstance(given, str) else None
        names = [_safe_name(u.filename, i) for i, u in enumerate(uploads)]
        if len(set(names)) != len(names):
            raise InputError("two uploaded files have the same name; names are the documents' ids")
        limit = service.settings.ingest.max_document_chars
        with tempfile.TemporaryDirectory(prefix="upload-") as folder:
            paths = []
            for i, (upload, name) in enumerate(zip(uploads, names, strict=True)):
                path = Path(folder) / f"{i}{Path(name).suffix.lower() if format_of(Path(name)) else ''}"
                path.write_bytes(await upload.read())
                paths.append(path)
            records = await run_in_threadpool(
                lambda: [_extracted(p, name, limit) for p, name in zip(paths, names, strict=True)]
            )
            if acl is not None:
                records = [replace(r, acl=acl) if isinstance(r, Document) else r for r in records]
    finally:
        await form.close()
    return (str(collection) if isinstance(collection, str) else None), records


def _extracted(path: Path, name: str, limit: int) -> Document | BadRecord:
    """Extract a saved upload under its client-given name (the name's suffix picks the reader)."""
    if format_of(Path(name)) is None:
        reason = f"unsupported type: '{Path(name).suffix or name}' files are not read"
        return BadRecord(name, reason, "unsupported", name)
    return extract_file(str(path), name, limit)


def _safe_name(filename: str | None, index: int) -> str:
    """A client's file name as a document id: its last path component, printable, at most 255 chars."""
    base = re.split(r"[\\/]", filename or "")[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip().lstrip(".")
    return base[:255] or f"upload-{index + 1}"


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, service: ServiceDep, caller: IngestCaller) -> dict[str, Any]:
    """A job's state; another key's job is answered as unknown."""
    assert service.jobs is not None
    job = service.jobs.get(job_id)
    if job is None or not caller.owns(job.owner):
        raise NotFound(f"no job {job_id!r} (the newest 1000 jobs are kept)")
    shown: dict[str, Any] = shown_paths(job.public(), service.settings.data_dir)
    return shown


@router.get("/v1/documents")
async def list_documents(
    service: ServiceDep,
    caller: IngestCaller,
    collection: str | None = None,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0),
) -> dict[str, Any]:
    """The documents of `collection` the caller may see (id, title, source, acl), by id."""
    name = check_collection_name(collection or service.settings.collection)
    caller.require_collection(name)

    def listed() -> dict[str, Any]:
        assert service.store is not None
        target = service.deployment(name).collection
        first = service.visible(caller, Filter(must=(Equals("chunk_index", 0),)))
        rows = sorted(
            (
                r.payload
                for r in service.store.scroll(target, first, ["doc_id", "title", "source", ACL_FIELD])
            ),
            key=lambda p: str(p["doc_id"]),
        )
        shown = [{"id": p["doc_id"], "title": p.get("title", ""), "source": p.get("source", ""),
                  "acl": p.get(ACL_FIELD)} for p in rows[offset : offset + limit]]  # fmt: skip
        return {"collection": name, "total": len(rows), "documents": shown}

    return await run_in_threadpool(listed)


@router.delete("/v1/documents/{doc_id}")
async def delete_document(
    doc_id: str, service: ServiceDep, caller: IngestCaller, collection: str | None = None
) -> dict[str, Any]:
    """Delete a document the caller may see; one it may not see is answered as absent."""
    name = check_collection_name(collection or service.settings.collection)
    caller.require_collection(name)
    assert service.jobs is not None
    removed = await run_in_threadpool(
        service.jobs.delete_document, name, doc_id, partial(service.visible, caller)
    )
    if not removed:
        raise NotFound(f"document {doc_id!r} is not in {name}")
    return {"doc_id": doc_id, "deleted_chunks": removed}
