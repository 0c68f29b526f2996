"""Documents end to end: extraction speed per format, workers 1 vs 2, and contextual headers.

The document set is Debian's own documentation on this machine (nobody here wrote it): the
PDF manuals under /usr/share/doc (valgrind, nettle, bzip2, zlib's CRC paper, fontconfig,
libtasn1, shared-mime-info: about 700 pages), the HTML manuals (libffi, shared-mime-info),
the Markdown READMEs, and Word files made from the HTML manuals' sections with python-docx
(Debian ships no .docx). Three measurements, last line one JSON object:

1. per format: pages/s (PDF) or files/s of extraction alone on one core, and chunks/s end to end
   (read, chunk, embed with all-MiniLM-L6-v2, upsert into Qdrant Edge); and PDFium against pypdf
   on the same PDFs (pages/s, characters extracted);
2. extraction of the PDF folder through `CorpusReader` with 1 and 2 worker processes;
3. retrieval with and without the heading path embedded in front of each chunk, paired: the
   queries are the section titles of the valgrind manual's outline and the shared-mime-info
   HTML spec (titles of four words or more, so they say what the section is about), a query's
   relevant chunks are the chunks of its section, scored by RR@10 and nDCG@10 over chunks of
   the whole set. Nothing is tuned on these queries; the setting's default follows the result.

    python bench/documents.py
    python bench/documents.py --skip-quality      # speed only
"""

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import run_info
from twostage.api.settings import Settings
from twostage.retrieval.ingest.chunker import Chunker
from twostage.retrieval.ingest.documents import Document
from twostage.retrieval.ingest.formats import read_document
from twostage.retrieval.ingest.pipeline import ingest_corpus
from twostage.retrieval.ingest.readers import CorpusReader
from twostage.retrieval.models.embedder import Embedder
from twostage.retrieval.models.loading import load_embedder
from twostage.retrieval.models.tokens import Qwen3Tokens
from twostage.retrieval.store.collections import open_store
from twostage.training.paired import paired_test

DOC = Path("/usr/share/doc")
MODEL = "pypi:all-MiniLM-L6-v2"


def build_set(root: Path) -> dict[str, list[Path]]:
    """Copy (and gunzip) the documents into root/FORMAT/; Word files from the HTML manuals."""
    import docx

    formats: dict[str, list[Path]] = defaultdict(list)
    for source in sorted(DOC.glob("*/*.pdf")) + sorted(DOC.glob("*/*.pdf.gz")):
        target = root / "pdf" / source.name.removesuffix(".gz")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(
            gzip.decompress(source.read_bytes()) if source.suffix == ".gz" else source.read_bytes()
        )
        formats["pdf"].append(target)
    for source in sorted(DOC.glob("libffi*/html/*.html")) + sorted(
        DOC.glob("shared-mime-info/*.html/*.html")
    ):
        target = root / "html" / f"{source.parent.parent.name}-{source.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        formats["html"].append(target)
    for source in sorted(DOC.glob("*/*.md")):
        if source.stat().st_size > 1000:
            target = root / "markdown" / f"{source.parent.name}-{source.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
            formats["markdown"].append(target)
    (root / "docx").mkdir(parents=True, exist_ok=True)
    for html in formats["html"]:
        extracted = read_document(html)
        document = docx.Document()
        for part in extracted.parts:
            if part.headings:
                document.add_heading(part.headings[-1], level=min(len(part.headings), 9))
            for paragraph in part.text.split("\n\n")[1 if part.headings else 0 :]:
                document.add_paragraph(paragraph)
        target = root / "docx" / html.with_suffix(".docx").name
        document.save(target)
        formats["docx"].append(target)
    return dict(formats)


def pdf_pages(paths: list[Path]) -> int:
    import pypdfium2 as pdfium

    return sum(len(pdfium.PdfDocument(str(p))) for p in paths)


def extraction_speed(formats: dict[str, list[Path]]) -> dict[str, dict[str, float]]:
    """Extraction alone, one process: files (and PDF pages) per second."""
    out: dict[str, dict[str, float]] = {}
    for fmt, paths in formats.items():
        started = time.perf_counter()
        for path in paths:
            read_document(path)
        seconds = time.perf_counter() - started
        entry = {
            "files": len(paths),
            "seconds": round(seconds, 3),
            "files_per_s": round(len(paths) / seconds, 1),
        }
        if fmt == "pdf":
            pages = pdf_pages(paths)
            entry |= {"pages": pages, "pages_per_s": round(pages / seconds, 1)}
        out[fmt] = entry
    return out


def pdf_libraries(paths: list[Path]) -> dict[str, Any]:
    """PDFium (what the reader uses) against pypdf (pure Python, the other permissive choice) on the
    same PDFs, one process: pages/s and characters of text extracted (fidelity: they should agree)."""
    import pypdfium2 as pdfium

    out: dict[str, Any] = {}
    started = time.perf_counter()
    pages = chars = 0
    for path in paths:
        pdf = pdfium.PdfDocument(str(path))
        for i in range(len(pdf)):
            chars += len(pdf[i].get_textpage().get_text_bounded())
            pages += 1
        pdf.close()
    out["pypdfium2"] = {"pages_per_s": round(pages / (time.perf_counter() - started), 1), "chars": chars}
    try:
        import pypdf
    except ImportError:  # a test dependency: installed with .[test]
        return out
    started = time.perf_counter()
    chars = 0
    for path in paths:
        chars += sum(len(page.extract_text() or "") for page in pypdf.PdfReader(str(path)).pages)
    out["pypdf"] = {"pages_per_s": round(pages / (time.perf_counter() - started), 1), "chars": chars}
    return out


def end_to_end(
    root: Path, formats: dict[str, list[Path]], settings: Settings, embedder: Embedder
) -> dict[str, Any]:
    """Each format's folder ingested into a fresh store: chunks/s (and pages/s for PDF), whole pipeline."""
    out: dict[str, Any] = {}
    chunker = Chunker.for_embedder(Qwen3Tokens(), settings.chunker, embedder)
    for fmt in formats:
        system = settings.model_copy(deep=True)
        system.data_dir = root / "data" / fmt
        store = open_store(system)
        try:
            reader = CorpusReader(str(root / fmt), 10**8, workers=1)
            started = time.perf_counter()
            report = ingest_corpus(reader, store=store, embedder=embedder, chunker=chunker, settings=system,
                                   collection="docs")  # fmt: skip
            seconds = time.perf_counter() - started
        finally:
            store.close()
        out[fmt] = {
            "documents": report.documents, "chunks": report.chunks_embedded, "seconds": round(seconds, 2),
            "chunks_per_s": round(report.chunks_embedded / seconds, 1), "skipped": report.bad_records,
        }  # fmt: skip
        if fmt == "pdf":
            out[fmt]["pages_per_s"] = round(pdf_pages(formats["pdf"]) / seconds, 2)
    return out


def workers_speed(source: Path, pages: int, copies: int) -> dict[str, Any]:
    """The PDF folder, `copies` times over (a corpus large enough for a pool to matter), extracted
    through CorpusReader with 1 and 2 processes (best of 2 runs each)."""
    folder = source.parent / "pdf-many"
    for i in range(copies):
        shutil.copytree(source, folder / f"copy-{i}")
    pages *= copies
    out: dict[str, Any] = {"pages": pages}
    for workers in (1, 2):
        best = float("inf")
        for _ in range(2):
            started = time.perf_counter()
            records = list(CorpusReader(str(folder), 10**8, workers=workers, pool_min_bytes=0))
            best = min(best, time.perf_counter() - started)
        out[f"workers_{workers}"] = {"seconds": round(best, 3), "pages_per_s": round(pages / best, 1),
                                     "documents": sum(isinstance(r, Document) for r in records)}  # fmt: skip
    out["speedup"] = round(out["workers_1"]["seconds"] / out["workers_2"]["seconds"], 3)
    return out


def labelled(root: Path) -> tuple[list[Path], dict[str, tuple[str, tuple[str, ...]]]]:
    """The quality set: documents, and queries (section titles) -> (document id, heading path)."""
    chosen = [root / "pdf" / "valgrind_manual.pdf", *sorted((root / "html").glob("shared-mime-info-*.html"))]
    queries: dict[str, tuple[str, tuple[str, ...]]] = {}
    seen: set[str] = set()
    for path in chosen:
        for part in read_document(path).parts:
            title = part.headings[-1] if part.headings else ""
            words = title.split()
            if len(words) >= 4 and title not in seen:  # "Introduction", "Options" say too little alone
                seen.add(title)
                queries[f"q{len(queries)}"] = (path.name, part.headings)
    return chosen, queries


def quality(root: Path, settings: Settings, embedder: Embedder) -> dict[str, Any]:
    """RR@10 and nDCG@10 per query with heading_context off and on, paired."""
    import ir_measures

    documents, queries = labelled(root)
    folder = root / "quality"
    folder.mkdir()
    for path in documents:
        shutil.copy(path, folder / path.name)
    runs: dict[str, dict[str, dict[str, float]]] = {}
    qrels: dict[str, dict[str, dict[str, int]]] = {}  # per mode: a header changes where windows fall
    texts = {q: " ".join(headings[-1].split()[1:]) if headings[-1].split()[0][0].isdigit() else headings[-1]
             for q, (_, headings) in queries.items()}  # the title without its section number  # fmt: skip
    for mode in ("off", "on"):
        system = settings.model_copy(deep=True)
        system.chunker.heading_context = mode == "on"
        system.data_dir = root / "data" / f"quality-{mode}"
        chunker = Chunker.for_embedder(Qwen3Tokens(), system.chunker, embedder)
        store = open_store(system)
        try:
            reader = CorpusReader(str(folder), 10**8, workers=1)
            ingest_corpus(
                reader, store=store, embedder=embedder, chunker=chunker, settings=system, collection="docs"
            )
            collection = store.resolve_alias("docs") or ""
            chunks = {r.id: r.payload for r in store.scroll(collection, None, ["doc_id", "headings"])}
            qrels[mode] = {
                q: {
                    pid: 1
                    for pid, p in chunks.items()
                    if p["doc_id"] == doc_id and tuple(p["headings"]) == headings
                }
                for q, (doc_id, headings) in queries.items()
            }
            vectors = embedder.embed_queries(list(texts.values()), None)
            runs[mode] = {}
            for q, vector in zip(texts, vectors, strict=True):
                hits = store.search(collection, vector, 10)
                runs[mode][q] = {h.id: h.score for h in hits}
        finally:
            store.close()
    judged = [q for q in queries if qrels["off"][q] and qrels["on"][q]]
    measures = [ir_measures.parse_measure("RR@10"), ir_measures.parse_measure("nDCG@10")]
    per: dict[str, dict[str, dict[str, float]]] = {}
    for mode, run in runs.items():
        per[mode] = defaultdict(dict)
        for m in ir_measures.iter_calc(
            measures, {q: qrels[mode][q] for q in judged}, {q: run[q] for q in judged}
        ):
            per[mode][str(m.measure)][m.query_id] = m.value
    result: dict[str, Any] = {"queries": len(judged), "documents": [p.name for p in documents]}
    for measure in ("RR@10", "nDCG@10"):
        off = {q: per["off"][measure].get(q, 0.0) for q in judged}
        on = {q: per["on"][measure].get(q, 0.0) for q in judged}
        paired = paired_test(off, on)
        result[measure] = {
            "off": round(paired.baseline, 4), "on": round(paired.candidate, 4), "gain": round(paired.gain, 4),
            "ci95": [round(paired.ci_low, 4), round(paired.ci_high, 4)], "p_value": round(paired.p_value, 4),
        }  # fmt: skip
    nd = result["nDCG@10"]
    result["default"] = "on" if nd["gain"] > 0 and nd["p_value"] < 0.05 else "off"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--copies", type=int, default=12, help="copies of the PDF folder for workers 1 vs 2")
    parser.add_argument("--tokens", type=int, default=200, help="chunk window (Qwen3 tokens)")
    args = parser.parse_args()
    settings = Settings(
        embedder={"model": MODEL}, chunker={"tokens": args.tokens, "overlap": 32}, device="cpu"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        formats = build_set(root)
        result: dict[str, Any] = {"bench": "documents", **run_info("cpu"), "model": MODEL,
                                  "set": {f: len(p) for f, p in formats.items()}}  # fmt: skip
        result["extraction"] = extraction_speed(formats)
        result["pdf_libraries"] = pdf_libraries(formats["pdf"])
        print(json.dumps({"extraction": result["extraction"]}), file=sys.stderr)
        result["workers"] = workers_speed(root / "pdf", result["extraction"]["pdf"]["pages"], args.copies)
        print(json.dumps({"workers": result["workers"]}), file=sys.stderr)
        settings.cache_dir = root / "cache"
        embedder = load_embedder(settings)
        result["end_to_end"] = end_to_end(root, formats, settings, embedder)
        print(json.dumps({"end_to_end": result["end_to_end"]}), file=sys.stderr)
        if not args.skip_quality:
            result["heading_context"] = quality(root, settings, embedder)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
