"""Real documents in: Debian's own manuals (a PDF, HTML pages, a Markdown README), a Word file
made with python-docx, and the damaged, locked and scanned files users also have.

The manuals come from Debian packages (libtasn1-doc, shared-mime-info, libffi-dev), which
.ci/run installs when they are missing; nobody here wrote them. One folder is ingested with
the real MiniLM once per module; the tests read its report, search it, and change it.
"""

import bisect
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pypdfium2 as pdfium
import pytest
from helpers import Served, run_cli, serve

from twostage.api.settings import Settings
from twostage.retrieval.ingest.chunker import Chunker
from twostage.retrieval.ingest.documents import BadRecord, Document, Section, chunk_payload, embedded_text
from twostage.retrieval.ingest.pipeline import IngestReport, Progress, ingest_corpus
from twostage.retrieval.ingest.readers import CorpusReader, in_shard
from twostage.retrieval.models.embedder import Embedder
from twostage.retrieval.models.tiny import TinyModelPaths
from twostage.retrieval.models.tokens import Qwen3Tokens
from twostage.retrieval.store.collections import open_store
from twostage.retrieval.store.edge import EdgeStore
from twostage.retrieval.store.qdrant import QdrantStore
from twostage.retrieval.store.settings import ChunkerSettings, StoreSettings
from twostage.retrieval.store.vector_store import VectorStore

PDF = Path("/usr/share/doc/libtasn1-doc/libtasn1.pdf")  # 36 pages, with an outline
HTML = Path("/usr/share/doc/shared-mime-info/shared-mime-info-spec.html/x34.html")  # DocBook sections
TEXINFO = Path("/usr/share/doc/libffi8/html/The-Basics.html")  # texinfo: navigation header and footer
MARKDOWN = Path("/usr/share/doc/shared-mime-info/README.md")
# a passage of libtasn1.pdf, on page 6 (1-based), in section 2.2 "Naming" of chapter 2
ON_PAGE_6 = "The notation to access the ‘Group’ type of the ‘Example’ definition"


def _docx(path: Path) -> Path:
    import docx

    document = docx.Document()
    document.add_paragraph("Staff handbook", style="Title")
    document.add_heading("Leave", level=1)
    document.add_paragraph("Every employee has twenty-five days of paid annual leave per calendar year.")
    document.add_heading("Carrying leave over", level=2)
    document.add_paragraph(
        "Up to five unused days may be carried over into the first quarter of the next year."
    )
    table = document.add_table(rows=2, cols=2)
    for row, (a, b) in zip(
        table.rows, [("Years of service", "Extra days"), ("10 or more", "3")], strict=True
    ):
        row.cells[0].text, row.cells[1].text = a, b
    document.add_heading("Expenses", level=1)
    document.add_paragraph("Travel expenses are reimbursed within thirty days of the claim being approved.")
    document.save(path)
    return path


def _scanned(path: Path) -> Path:
    """A one-page PDF that is a picture of a page: pixels, no text layer (what a scanner makes)."""
    source = pdfium.PdfDocument(str(PDF))
    bitmap = source[5].render(scale=0.5)
    scan = pdfium.PdfDocument.new()
    width, height = source[5].get_size()
    page = scan.new_page(width, height)
    image = pdfium.PdfImage.new(scan)
    image.set_bitmap(bitmap)
    image.set_matrix(pdfium.PdfMatrix().scale(width, height))
    page.insert_obj(image)
    page.gen_content()
    scan.save(str(path))
    return path


def _encrypted(path: Path) -> Path:
    from pypdf import PdfWriter

    writer = PdfWriter(clone_from=str(PDF))
    writer.encrypt(user_password="secret", owner_password="owner")
    writer.write(str(path))
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a user points twostage at: manuals in several formats, and files that cannot be used."""
    missing = [p for p in (PDF, HTML, TEXINFO, MARKDOWN) if not p.exists()]
    assert not missing, f"{missing}: apt-get install libtasn1-doc shared-mime-info libffi-dev (.ci/run does)"
    root = tmp_path_factory.mktemp("documents") / "docs"
    (root / "manuals" / "html").mkdir(parents=True)
    shutil.copy(PDF, root / "manuals" / "libtasn1.pdf")
    shutil.copy(HTML, root / "manuals" / "html" / "mime-spec.html")
    shutil.copy(TEXINFO, root / "manuals" / "html" / "libffi-basics.htm")
    shutil.copy(MARKDOWN, root / "README.md")
    _docx(root / "handbook.docx")
    (root / "notes.txt").write_text("Plain notes: the backup job runs every night at two.\n")
    (root / "broken.pdf").write_bytes(PDF.read_bytes()[:4000])  # cut off mid-file
    _encrypted(root / "locked.pdf")
    _scanned(root / "scan.pdf")
    (root / "empty.md").write_text("  \n")
    (root / "data.xyz").write_bytes(b"\x00\x01 something else")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return root


@dataclass
class Ingested:
    folder: Path
    env: dict[str, str]
    report: dict[str, object]
    stdout: str


@pytest.fixture(scope="module")
def ingested(folder: Path, tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Ingested:
    data = tmp_path_factory.mktemp("documents-data")
    env = {
        **os.environ, "TWOSTAGE_DATA_DIR": str(data), "TWOSTAGE_CACHE_DIR": str(model_cache), "TWOSTAGE_DEVICE": "cpu",
        "TWOSTAGE_EMBEDDER__MODEL": "pypi:all-MiniLM-L6-v2", "TWOSTAGE_CHUNKER__TOKENS": "128",
        "TWOSTAGE_CHUNKER__OVERLAP": "16", "TWOSTAGE_INGEST__WORKERS": "2",
    }  # fmt: skip
    result = run_cli(["ingest", str(folder), "--json", "--quiet"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    return Ingested(folder, env, json.loads(result.stdout), result.stdout + result.stderr)


def test_every_file_is_accounted_for(ingested: Ingested) -> None:
    report = ingested.report
    assert report["formats"] == {"docx": 1, "html": 2, "markdown": 1, "pdf": 1, "text": 1}, report["formats"]
    skipped = {s["location"]: (s["kind"], s["reason"]) for s in report["skipped"]}  # type: ignore[attr-defined]
    assert set(skipped) == {"broken.pdf", "locked.pdf", "scan.pdf", "empty.md", "data.xyz"}, skipped
    assert skipped["locked.pdf"][0] == "encrypted" and "password" in skipped["locked.pdf"][1]
    assert skipped["scan.pdf"][0] == "no-text-layer" and "OCR is not enabled" in skipped["scan.pdf"][1]
    assert "ocrmypdf" in skipped["scan.pdf"][1]  # says how
    assert skipped["broken.pdf"][0] == "unreadable" and "Data format error" in skipped["broken.pdf"][1]
    assert skipped["empty.md"][0] == "empty" and skipped["data.xyz"][0] == "unsupported"
    assert report["bad_records"] == 5 and report["hidden_files"] == 1 and report["documents"] == 6
    assert str(ingested.folder) not in ingested.stdout  # paths relative to the folder, in the output too


def test_each_format_keeps_its_structure(folder: Path) -> None:
    docs = {r.id: r for r in CorpusReader(str(folder), 10**7, workers=1) if isinstance(r, Document)}
    pdf = docs["manuals/libtasn1.pdf"]
    assert pdf.format == "pdf" and len(pdf.pages) == 36 and pdf.source == "manuals/libtasn1.pdf"
    at = pdf.text.find(ON_PAGE_6)
    assert at > 0 and bisect.bisect_right(pdf.pages, at) == 6  # the page it is printed on
    naming = next(s for s in pdf.sections if s.headings[-1:] == ("Naming",))
    assert naming.headings == ("2 ASN.1 structure handling", "Naming")
    spec = docs["manuals/html/mime-spec.html"]
    assert ("2. Unified system", "2.4. The glob files") in [s.headings for s in spec.sections]
    basics = docs["manuals/html/libffi-basics.htm"]
    assert basics.sections[0].headings == ("2.1 The Basics",) and basics.title.startswith("The Basics")
    assert "Next:" not in basics.text and "Up:" not in basics.text  # the texinfo navigation is gone
    handbook = docs["handbook.docx"]
    assert handbook.title == "Staff handbook"
    assert [s.headings for s in handbook.sections][-2:] == [("Leave", "Carrying leave over"), ("Expenses",)]
    assert "Years of service | Extra days\n10 or more | 3" in handbook.text  # a table row stays a line
    readme = docs["README.md"]
    assert ("Shared MIME Info", "Installation") in [s.headings for s in readme.sections]
    assert docs["notes.txt"].sections == () and docs["notes.txt"].title == "notes"
    pooled = list(
        CorpusReader(str(folder), 10**7, workers=2, pool_min_bytes=0)
    )  # the process pool: same, in order
    assert [r for r in pooled if isinstance(r, Document)] == list(docs.values())
    assert [str(r) for r in pooled if isinstance(r, BadRecord)] == [
        str(r) for r in CorpusReader(str(folder), 10**7) if isinstance(r, BadRecord)
    ]


def test_search_hits_cite_source_page_and_headings(ingested: Ingested) -> None:
    query = "how to name the Group type of the Example definition: Example.Group"
    result = run_cli(
        ["search", query, "--json", "--top-n", "3", "--recall", "dense", "--no-rerank"], ingested.env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    hits = json.loads(result.stdout)["hits"]
    top = hits[0]
    assert (top["source"], top["page"], top["headings"]) == (
        "manuals/libtasn1.pdf",
        6,
        ["2 ASN.1 structure handling", "Naming"],
    ), top
    assert str(ingested.folder) not in result.stdout
    table = run_cli(["search", query, "--top-n", "1", "--recall", "dense", "--no-rerank"], ingested.env)
    assert "manuals/libtasn1.pdf, p. 6 · 2 ASN.1 structure handling > Naming" in table.stdout, table.stdout


def test_reingest_picks_up_edits_and_sync_removes_deleted_files(ingested: Ingested, tmp_path: Path) -> None:
    work = tmp_path / "docs"
    shutil.copytree(ingested.folder, work)
    env = {**ingested.env, "TWOSTAGE_DATA_DIR": str(tmp_path / "data")}
    shutil.copytree(Path(ingested.env["TWOSTAGE_DATA_DIR"]), tmp_path / "data")
    (work / "notes.txt").write_text("Plain notes: the backup job now runs every night at three.\n")
    (work / "README.md").unlink()
    (work / "handbook.docx").write_bytes(b"PK\x03\x04 damaged now")  # still there, unreadable: kept
    result = run_cli(["ingest", str(work), "--json", "--quiet", "--sync"], env)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert (report["updated"], report["new"], report["deleted"], report["chunks_embedded"] > 0) == (
        1,
        0,
        1,
        True,
    )
    assert report["unchanged"] == 3 and {s["location"] for s in report["skipped"]} >= {"handbook.docx"}
    store = open_store(Settings(data_dir=tmp_path / "data"))
    try:
        sources = {
            r.payload["source"] for r in store.scroll(store.resolve_alias("docs") or "", None, ["source"])
        }
    finally:
        store.close()
    assert "README.md" not in sources and {"handbook.docx", "notes.txt"} <= sources


def test_strict_and_shard_rules(ingested: Ingested, tmp_path: Path) -> None:
    env = {**ingested.env, "TWOSTAGE_DATA_DIR": str(tmp_path / "data")}
    strict = run_cli(["ingest", str(ingested.folder), "--strict", "--quiet"], env)
    assert strict.returncode == 2 and "(--strict)" in strict.stderr and "Traceback" not in strict.stderr
    refused = run_cli(["ingest", str(ingested.folder), "--sync", "--shard", "2/3"], env)
    assert refused.returncode == 2 and "other shards would look deleted" in refused.stderr
    assert run_cli(["ingest", str(ingested.folder), "--shard", "4/3"], env).returncode == 2
    assert in_shard("manuals/libtasn1.pdf", (0, 1)) and in_shard("a", (1, 2)) == in_shard("a", (1, 2))
    pinned = [True, False, True, False, False, False]  # the hash must never drift: shards would move
    assert [in_shard(f"doc-{i}", (0, 2)) for i in range(6)] == pinned


def test_shards_together_ingest_the_whole_folder(
    folder: Path, minilm_embedder: Embedder, minilm_settings: Settings
) -> None:
    """Two shard runs into one Qdrant collection (qdrant-client's local mode stands in for the
    server several machines would share) store exactly the whole folder, each document once."""
    chunker = Chunker.for_embedder(Qwen3Tokens(), minilm_settings.chunker, minilm_embedder)
    store = QdrantStore(StoreSettings(kind="qdrant", location=":memory:"))
    ids: list[set[str]] = []
    for index in range(2):
        reader = CorpusReader(str(folder), 10**7, shard=(index, 2))
        ingest_corpus(
            reader,
            store=store,
            embedder=minilm_embedder,
            chunker=chunker,
            settings=minilm_settings,
            collection="docs",
            bytes_passed=lambda r=reader: r.bytes_passed,
        )  # type: ignore[misc]
        ids.append(
            {r.id for r in CorpusReader(str(folder), 10**7, shard=(index, 2)) if isinstance(r, Document)}
        )
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    stored = {r.payload["doc_id"] for r in store.scroll("docs__v1", None, ["doc_id"])}
    store.close()
    assert (
        stored
        == ids[0] | ids[1]
        == {r.id for r in CorpusReader(str(folder), 10**7) if isinstance(r, Document)}
    )


class _Recorded(Progress):
    def __init__(self, total: int | None) -> None:
        super().__init__(total, 1.0, enabled=False)
        self.done: list[int] = []

    def update(self, done_bytes: int, documents: int, chunks: int) -> None:
        self.done.append(done_bytes)


def test_progress_counts_finished_work_only(
    folder: Path, tmp_path: Path, minilm_embedder: Embedder, minilm_settings: Settings
) -> None:
    """Progress is the source bytes of documents fully written (plus input needing no writing):
    it only grows, reaches the total exactly at the end, and a rerun of unchanged files is done
    document by document too."""
    chunker = Chunker.for_embedder(Qwen3Tokens(), minilm_settings.chunker, minilm_embedder)
    store: VectorStore = EdgeStore(tmp_path / "data")
    for _ in range(2):
        reader = CorpusReader(str(folder), 10**7)
        progress = _Recorded(reader.bytes_total)
        report: IngestReport = ingest_corpus(
            reader, store=store, embedder=minilm_embedder, chunker=chunker, settings=minilm_settings,
            collection="docs", progress=progress, bytes_passed=lambda r=reader: r.bytes_passed,  # type: ignore[misc]
        )  # fmt: skip
        assert progress.done == sorted(progress.done) and progress.done[-1] == reader.bytes_total
        assert len(progress.done) >= 2  # not one jump at the end
    store.close()
    assert report.unchanged == 6 and report.chunks_embedded == 0
    assert Progress(1000, 1.0).eta(250, Progress(1000, 1.0).start + 10).endswith("25% done, ETA 30s")


@pytest.fixture(scope="module")
def doc_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModelPaths, model_cache: Path
) -> Iterator[Served]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("upload-data"), cache_dir=model_cache, device="cpu",
        embedder={"model": str(tiny_models.embedder)}, reranker={"model": str(tiny_models.reranker), "max_length": 256},
        api={"api_keys": ["k"], "max_upload_bytes": 400_000, "batch_wait_ms": 1}, ingest={"workers": 1},
    )  # fmt: skip
    yield from serve(settings)


def _wait(served: Served, job_id: str) -> dict[str, object]:
    for _ in range(600):
        job = httpx.get(f"{served.url}/v1/jobs/{job_id}", headers={"Authorization": "Bearer k"}).json()
        if job["status"] in {"succeeded", "failed"}:
            return dict(job)
        time.sleep(0.1)
    raise AssertionError("job did not finish")


def test_upload_files_to_the_api(doc_server: Served, folder: Path) -> None:
    auth = {"Authorization": "Bearer k"}
    files = [
        ("file", ("handbook.docx", (folder / "handbook.docx").read_bytes())),
        ("file", ("../../etc/locked.pdf", (folder / "locked.pdf").read_bytes())),
        ("file", ("spec.html", (folder / "manuals" / "html" / "mime-spec.html").read_bytes())),
        ("file", ("run.exe", b"MZ\x90\x00")),
    ]
    r = httpx.post(
        f"{doc_server.url}/v1/documents", files=files, data={"collection": "uploads"}, headers=auth
    )
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["documents"] == 2 and len(body["rejected"]) == 2, body
    assert body["rejected"][0].startswith("locked.pdf: encrypted PDF")  # the name only, never a path
    job = _wait(doc_server, body["job_id"])
    report = job["report"]
    assert job["status"] == "succeeded" and report["formats"] == {"docx": 1, "html": 1}, job  # type: ignore[index]
    assert {s["kind"] for s in report["skipped"]} == {"encrypted", "unsupported"}  # type: ignore[index]
    hits = httpx.post(f"{doc_server.url}/v1/search", json={"query": "annual leave", "collection": "uploads",
                                                          "top_n": 50, "rerank": False}).json()["hits"]  # fmt: skip
    cited = {(h["source"], tuple(h["headings"])) for h in hits}
    assert ("handbook.docx", ("Leave", "Carrying leave over")) in cited and all(
        h["page"] is None for h in hits
    )
    too_big = httpx.post(f"{doc_server.url}/v1/documents", files=[("file", ("big.pdf", b"%PDF" * 200_000))],
                         headers=auth)  # fmt: skip
    assert too_big.status_code == 413 and "400000" in too_big.json()["detail"]
    none = httpx.post(f"{doc_server.url}/v1/documents", files=[("other", ("a.txt", b"x"))], headers=auth)
    assert none.status_code == 400 and "named 'file'" in none.json()["detail"]
    only_bad = httpx.post(f"{doc_server.url}/v1/documents", files=[("file", ("a.pdf", b"%PDF-1.4 junk"))],
                          headers=auth)  # fmt: skip
    assert only_bad.status_code == 400 and "a.pdf: corrupt or unreadable pdf" in only_bad.json()["detail"]
    unauthorised = httpx.post(f"{doc_server.url}/v1/documents", files=files[:1])
    assert unauthorised.status_code == 401


def test_long_documents_are_reranked_by_their_best_window(doc_server: Served) -> None:
    service = doc_server.service
    reranker = service.reranker
    assert reranker is not None
    query = "which job runs at night"
    long_doc = " ".join(f"filler sentence number {i} about nothing in particular." for i in range(400))
    long_doc += " The backup job runs every night at two."
    short = "The backup job runs every night at two."
    r = httpx.post(
        f"{doc_server.url}/v1/rerank", json={"query": query, "documents": [long_doc, short]}, timeout=120
    )
    assert r.status_code == 200, r.text
    windowed = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    from twostage.retrieval.models.truncation import windows

    parts = windows(long_doc, lambda d: reranker.input_lengths(query, d), reranker.max_length, service.tokens)
    assert len(parts) > 1 and parts[-1].endswith("every night at two.")
    best = max(d.score for d in reranker.rerank(query, parts))
    assert windowed[0] == pytest.approx(best, abs=1e-5)
    cut = httpx.post(f"{doc_server.url}/v2/rerank", json={"query": query, "documents": [long_doc],
                                                         "truncation": True}).json()  # fmt: skip
    first = reranker.rerank(query, [parts[0]])[0].score
    assert cut["results"][0]["relevance_score"] == pytest.approx(first, abs=1e-5)  # the beginning only
    bare = httpx.post(
        f"{doc_server.url}/rerank", json={"query": query, "documents": [long_doc, short], "top_n": 1}
    )
    assert bare.status_code == 200 and [x["index"] for x in bare.json()["results"]] == [
        max(windowed, key=windowed.get)
    ]
    tei = httpx.post(f"{doc_server.url}/rerank", json={"query": query, "texts": [long_doc, short]}).json()
    assert {x["index"]: x["score"] for x in tei} == pytest.approx(windowed, abs=1e-5)
    both = httpx.post(
        f"{doc_server.url}/rerank", json={"query": query, "texts": [short], "documents": [short]}
    )
    assert both.status_code == 422 and "not both" in both.text


def test_contextual_headers_are_embedded_and_fit_the_embedder(minilm_embedder: Embedder) -> None:
    text = "Intro line of the guide.\n\nRun the installer and answer its questions. " * 30
    sections = (Section(0, 24, ("Guide",)), Section(26, len(text), ("Guide", "Install")))
    doc = Document("g.md", text, sections=sections)
    window = ChunkerSettings(tokens=128, overlap=16)
    on = Chunker.for_embedder(Qwen3Tokens(), window, minilm_embedder).chunk_document(doc)
    off = Chunker.for_embedder(
        Qwen3Tokens(), window.model_copy(update={"heading_context": False}), minilm_embedder
    )
    assert on[0].embed_text == "Guide\n\nIntro line of the guide." and on[1].context == "Guide > Install"
    assert all(c.context == "" and c.embed_text == c.text for c in off.chunk_document(doc))
    assert max(minilm_embedder.document_lengths([c.embed_text for c in on])) <= minilm_embedder.max_length
    stored = chunk_payload(doc, on[1], doc.content_hash, len(on))
    assert embedded_text(stored) == on[1].embed_text  # what a reindex embeds is what the ingest did
