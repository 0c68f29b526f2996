"""`twostage ingest --server URL`: send a corpus to a running service in batches.

In embedded mode the server owns the shard, so other processes ingest through it. Records
are read and validated locally (bad ones reported with file:line), sent as batches of
documents under a size cap, and each batch's background job is polled to the end.
"""

import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpx

from twostage.retrieval.core.errors import InputError, TwostageError
from twostage.retrieval.ingest.documents import BadRecord, Document

_SUMMED = ("documents", "new", "updated", "unchanged", "chunks_embedded", "bad_records")


def _batches(
    records: Iterable[Document | BadRecord], docs: int, max_bytes: int, skipped: list[BadRecord]
) -> Iterator[list[dict[str, Any]]]:
    """Documents as the JSON body of POST /v1/documents, with what citations need (source,
    sections, pages); records that cannot be sent are reported and collected in `skipped`."""
    batch: list[dict[str, Any]] = []
    size = 0
    for record in records:
        if isinstance(record, BadRecord):
            print(f"twostage: skipped {record}", file=sys.stderr)
            skipped.append(record)
            continue
        item = {
            "id": record.id, "text": record.text, "title": record.title, "metadata": record.metadata,
            "source": record.source, "format": record.format, "pages": list(record.pages),
            "sections": [{"start": s.start, "end": s.end, "headings": list(s.headings)}
                         for s in record.sections],
            **({"acl": list(record.acl)} if record.acl is not None else {}),
        }  # fmt: skip
        item_size = len(json.dumps(item, ensure_ascii=False).encode())
        if batch and (len(batch) >= docs or size + item_size > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += item_size
    if batch:
        yield batch


def ingest_via_server(
    records: Iterable[Document | BadRecord],
    url: str,
    collection: str,
    api_key: str | None,
    *,
    batch_docs: int = 256,
    max_bytes: int = 8 * 1024 * 1024,
) -> dict[str, Any]:
    """Send every batch, wait for its job, and return the summed report."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    totals: dict[str, Any] = dict.fromkeys(_SUMMED, 0)
    sent = 0
    skipped: list[BadRecord] = []
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=120) as client:
        for batch in _batches(records, batch_docs, max_bytes, skipped):
            job = request_json(
                client, "POST", "/v1/documents", {"collection": collection, "documents": batch}
            )
            for rejected in job.get("rejected", []):
                print(f"twostage: skipped {rejected}", file=sys.stderr)
            totals["bad_records"] += len(job.get("rejected", []))
            report = _wait(client, job["job_id"])
            for key in _SUMMED:
                totals[key] += report.get(key, 0)
            totals["collection"] = report.get("collection")
            totals["total_documents"], totals["total_chunks"] = (
                report["total_documents"],
                report["total_chunks"],
            )
            sent += len(batch)
            print(
                f"ingest: {sent} documents sent, {totals['chunks_embedded']} chunks embedded", file=sys.stderr
            )
    if not sent:
        raise InputError("no documents to ingest")
    totals["bad_records"] += len(skipped)  # read here and never sent: counted like the server's
    totals["skipped"] = [{"location": r.location, "kind": r.kind, "reason": r.reason} for r in skipped]
    return totals


def request_json(client: httpx.Client, method: str, path: str, body: Any = None) -> dict[str, Any]:
    try:
        response = client.request(method, path, json=body)
    except httpx.HTTPError as exc:
        raise TwostageError(f"cannot reach the server at {client.base_url}: {exc}") from exc
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text[:200]
        raise TwostageError(f"server answered {response.status_code} to {method} {path}: {detail}")
    result: dict[str, Any] = response.json()
    return result


def _wait(client: httpx.Client, job_id: str) -> dict[str, Any]:
    delay = 0.05
    while True:
        job = request_json(client, "GET", f"/v1/jobs/{job_id}")
        if job["status"] == "succeeded":
            report: dict[str, Any] = job["report"]
            return report
        if job["status"] == "failed":
            raise TwostageError(f"ingestion job {job_id} failed: {job['error']}")
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def retrain_via_server(
    url: str, options: Any, collection: str, api_key: str | None, say: Callable[[str], None]
) -> dict[str, Any]:
    """Send the pairs to `POST /v1/retrain`, relay the job's progress lines, return its report."""
    from twostage.training.data import pair_row
    from twostage.training.retrain import load_pairs

    def rows(path: Any) -> list[dict[str, Any]]:
        return [pair_row(p) for p in load_pairs(path, say)]

    body = {
        "collection": collection, "pairs": rows(options.pairs),
        "dev": rows(options.dev) if options.dev else None, "from_base": options.from_base,
        "skip_embedder": options.skip_embedder, "skip_reranker": options.skip_reranker,
        "promote": options.promote, "dry_run": options.dry_run,
        "source": options.source or options.pairs.name, "canary": options.canary,
        "interleave": options.interleave, "canary_events": options.canary_events,
        "canary_seconds": options.canary_seconds,
    }  # fmt: skip
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=120) as client:
        job = request_json(client, "POST", "/v1/retrain", body)
        for rejected in job.get("rejected", []):
            say(f"skipped {rejected}")
        shown = 0
        while True:
            state = request_json(client, "GET", f"/v1/jobs/{job['job_id']}")
            log: list[str] = state.get("log", [])
            for line in log[shown:]:
                say(line)
            shown = len(log)
            if state["status"] == "succeeded":
                report: dict[str, Any] = state["report"]
                return report
            if state["status"] == "failed":
                raise TwostageError(f"retrain job {job['job_id']} failed: {state['error']}")
            time.sleep(1.0)


def calibrate_via_server(
    url: str, collection: str, judgements: list[dict[str, Any]], source: str, api_key: str | None
) -> dict[str, Any]:
    """`twostage calibrate` through a running service (`POST /v1/calibrate`)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=3600) as client:
        body = {"collection": collection, "judgements": judgements, "source": source}
        return request_json(client, "POST", "/v1/calibrate", body)
