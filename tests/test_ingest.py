"""Ingestion end to end with the real MiniLM embedder into real Qdrant engines.

Idempotency, updates, --sync, bad input, versions, and a `kill -9` in the middle of a run
followed by a rerun that must end with exactly the right points.
"""

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import DEBIAN_IR

from twostage.api.settings import Settings
from twostage.retrieval.core.errors import InputError
from twostage.retrieval.ingest.chunker import Chunker
from twostage.retrieval.ingest.documents import BadRecord, Document, chunk_point_id
from twostage.retrieval.ingest.pipeline import IngestReport, ingest_corpus
from twostage.retrieval.models.embedder import Embedder
from twostage.retrieval.models.loading import load_embedder
from twostage.retrieval.models.tokens import Qwen3Tokens
from twostage.retrieval.store.collections import active_manifest
from twostage.retrieval.store.edge import EdgeStore
from twostage.retrieval.store.qdrant import QdrantStore
from twostage.retrieval.store.settings import ChunkerSettings, StoreSettings
from twostage.retrieval.store.vector_store import Equals, Filter, StoreError, VectorStore

DATA = DEBIAN_IR / "corpus.jsonl"


def debian_docs(n: int, start: int = 0) -> list[Document]:
    with DATA.open() as handle:
        rows = [json.loads(line) for _, line in zip(range(start + n), handle, strict=False)][start:]
    return [
        Document(r["_id"], r["text"], r["title"], "corpus.jsonl", {"section": r["section"]}) for r in rows
    ]


@pytest.fixture(params=["edge", "qdrant-local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VectorStore]:
    if request.param == "edge":
        opened: VectorStore = EdgeStore(tmp_path / "data")
    else:
        opened = QdrantStore(StoreSettings(kind="qdrant", location=":memory:"))
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def chunker(minilm_settings: Settings, minilm_embedder: Embedder) -> Chunker:
    return Chunker.for_embedder(Qwen3Tokens(), minilm_settings.chunker, minilm_embedder)


def run(
    records: list[Document | BadRecord],
    store: VectorStore,
    embedder: Embedder,
    chunker: Chunker,
    settings: Settings,
    **options: bool,
) -> IngestReport:
    return ingest_corpus(
        records,
        store=store,
        embedder=embedder,
        chunker=chunker,
        settings=settings,
        collection="docs",
        **options,
    )


def stored_points(store: VectorStore, collection: str) -> dict[str, dict]:
    return {r.id: r.payload for r in store.scroll(collection)}


def expected_ids(docs: list[Document], chunker: Chunker) -> set[str]:
    return {chunk_point_id(d.id, c.index) for d in docs for c in chunker.chunk(d.id, d.text)}


def test_ingest_is_idempotent_and_searchable(store, minilm_embedder, chunker, minilm_settings) -> None:
    docs = debian_docs(60)
    first = run(docs, store, minilm_embedder, chunker, minilm_settings)
    assert (first.new, first.unchanged, first.documents) == (60, 0, 60)
    manifest = active_manifest(store, "docs")
    assert manifest.collection == "docs__v1" and manifest.status == "ready"
    assert (manifest.documents, manifest.chunks) == (60, first.chunks_embedded)
    assert manifest.embedder == minilm_embedder.model_id and manifest.dim == 384
    assert manifest.chunker["embedder_max_tokens"] == minilm_embedder.max_length == 256
    assert manifest.sparse is not None and manifest.sparse.model == "qdrant-edge-bm25"
    assert set(stored_points(store, "docs__v1")) == expected_ids(docs, chunker)

    again = run(docs, store, minilm_embedder, chunker, minilm_settings)
    assert (again.unchanged, again.chunks_embedded, again.total_chunks) == (60, 0, first.total_chunks)

    query = minilm_embedder.embed_queries([docs[7].text])[0]
    top = store.search("docs__v1", query, 1)[0].payload
    assert top["doc_id"] == docs[7].id and top["chunk_index"] == 0 and top["title"] == docs[7].title
    assert docs[7].text[top["start"] : top["end"]] == top["text"]


def test_chunks_never_exceed_what_the_embedder_reads(minilm_embedder: Embedder) -> None:
    """512 Qwen3 tokens is more than MiniLM's 256 word pieces: such a chunk's second half would
    never be embedded. Capped by the embedder, every chunk fits and the text is still covered."""
    text = "\n\n".join(d.text for d in debian_docs(40))
    window = ChunkerSettings(tokens=512, overlap=64)
    plain = Chunker(Qwen3Tokens(), window).chunk("d", text)
    assert max(minilm_embedder.document_lengths([c.text for c in plain])) > 256  # the problem is real
    capped = Chunker.for_embedder(Qwen3Tokens(), window, minilm_embedder).chunk("d", text)
    lengths = minilm_embedder.document_lengths([c.text for c in capped])
    assert max(lengths) <= minilm_embedder.max_length == 256 and len(capped) > len(plain)
    assert capped[0].start == 0 and capped[-1].end == len(text.rstrip())
    assert all(not text[a.end : b.start].strip() for a, b in itertools.pairwise(capped))  # no text lost
    assert [c.text for c in capped] == [text[c.start : c.end] for c in capped]


def test_changed_document_replaces_its_chunks_and_drops_the_surplus(
    store, minilm_embedder, chunker, minilm_settings
) -> None:
    long = Document("long", "\n\n".join(d.text for d in debian_docs(12)), "Long")
    other = debian_docs(5)
    run([long, *other], store, minilm_embedder, chunker, minilm_settings)
    assert store.count("docs__v1", Filter(must=(Equals("doc_id", "long"),))) > 3

    short = Document("long", "Now it is a short document.", "Long")
    retagged = Document(other[0].id, other[0].text, other[0].title, other[0].source, {"section": "moved"})
    report = run([short, retagged, *other[1:]], store, minilm_embedder, chunker, minilm_settings)
    assert (report.updated, report.unchanged, report.new) == (2, 4, 0)
    points = stored_points(store, "docs__v1")
    long_points = [p for p in points.values() if p["doc_id"] == "long"]
    assert [(p["text"], p["n_chunks"], p["doc_hash"]) for p in long_points] == [
        (short.text, 1, short.content_hash)
    ]
    assert [p["metadata"] for p in points.values() if p["doc_id"] == other[0].id] == [{"section": "moved"}]
    assert set(points) == expected_ids([short, *other], chunker)


def test_sync_deletes_vanished_documents_but_not_after_bad_records(
    store, minilm_embedder, chunker, minilm_settings
) -> None:
    docs = debian_docs(8)
    run(docs, store, minilm_embedder, chunker, minilm_settings)
    unsure = run(
        [*docs[:5], BadRecord("c.jsonl:6", "invalid JSON")],
        store,
        minilm_embedder,
        chunker,
        minilm_settings,
        sync=True,
    )
    assert unsure.deleted == 0 and "sync skipped" in (unsure.sync_note or "")
    report = run(docs[:5], store, minilm_embedder, chunker, minilm_settings, sync=True)
    assert report.deleted == 3 and report.total_documents == 5
    assert {p["doc_id"] for p in stored_points(store, "docs__v1").values()} == {d.id for d in docs[:5]}


def test_duplicates_bad_records_and_strict(store, minilm_embedder, chunker, minilm_settings) -> None:
    docs = debian_docs(4)
    twin = Document(docs[0].id, "a different text with the same id", source="c.jsonl")
    report = run(
        [*docs, twin, BadRecord("c.jsonl:9", "missing 'text'")],
        store,
        minilm_embedder,
        chunker,
        minilm_settings,
    )
    assert report.documents == 4 and report.bad_records == 2
    assert any("duplicate id" in b for b in report.bad_examples)
    assert all(p["doc_hash"] != twin.content_hash for p in stored_points(store, "docs__v1").values())
    with pytest.raises(InputError, match=r"c.jsonl:9: missing 'text' .--strict."):
        run([*docs, BadRecord("c.jsonl:9", "missing 'text'")], store, minilm_embedder, chunker, minilm_settings,
            strict=True)  # fmt: skip


def test_empty_corpus_creates_nothing(store, minilm_embedder, chunker, minilm_settings) -> None:
    with pytest.raises(InputError, match=r"no documents to ingest .1 bad records: x:1: no text"):
        run([BadRecord("x:1", "no text")], store, minilm_embedder, chunker, minilm_settings)
    with pytest.raises(InputError, match=r"no documents to ingest .0 bad records"):
        run([], store, minilm_embedder, chunker, minilm_settings)
    assert store.list_collections() == [] and store.resolve_alias("docs") is None


def test_other_embedder_is_refused_and_new_version_switches(
    store, minilm_embedder, chunker, minilm_settings
) -> None:
    docs = debian_docs(6)
    run(docs, store, minilm_embedder, chunker, minilm_settings)
    smaller_settings = minilm_settings.model_copy(deep=True)
    smaller_settings.embedder.dim = 128
    smaller = load_embedder(smaller_settings)
    with pytest.raises(StoreError, match=r"docs__v1 was built with embedder .* \(dim 384\).*--new-version"):
        run(docs, store, smaller, chunker, smaller_settings)
    report = run(docs[:4], store, smaller, chunker, smaller_settings, new_version=True)
    assert report.collection == "docs__v2" and store.resolve_alias("docs") == "docs__v2"
    assert store.read_manifest("docs__v2").dim == 128
    assert store.read_manifest("docs__v1").documents == 6 and store.count("docs__v1") > 0  # previous kept


def test_unicode_in_every_script_round_trips(store, minilm_embedder, chunker, minilm_settings) -> None:
    samples = {
        "zh": "检索增强生成把检索到的文档交给语言模型。",
        "ja": "検索拡張生成は文書を言語モデルに渡します。",
        "ar": "التوليد المعزز بالاسترجاع يمرر المستندات إلى النموذج.",
        "hi": "पुनर्प्राप्ति-संवर्धित पीढ़ी दस्तावेज़ों को मॉडल तक पहुँचाती है।",
        "ru": "Генерация с дополнением поиском передаёт документы модели.",
        "emoji": "🔎📚➡️🤖 ZWJ family 👨‍👩‍👧 and combining e\u0301",
        "ko": "검색 증강 생성은 문서를 모델에 전달합니다.",
    }
    docs = [Document(f"doc-{k}", v) for k, v in samples.items()]
    run(docs, store, minilm_embedder, chunker, minilm_settings)
    texts = {p["doc_id"]: p["text"] for p in stored_points(store, "docs__v1").values()}
    assert texts == {d.id: d.text for d in docs}


def cli_env(settings: Settings, data_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "TWOSTAGE_DATA_DIR": str(data_dir),
        "TWOSTAGE_CACHE_DIR": str(settings.cache_dir),
        "TWOSTAGE_DEVICE": "cpu",
        "TWOSTAGE_EMBEDDER__MODEL": "pypi:all-MiniLM-L6-v2",
        "TWOSTAGE_CHUNKER__TOKENS": str(settings.chunker.tokens),
        "TWOSTAGE_CHUNKER__OVERLAP": str(settings.chunker.overlap),
        "TWOSTAGE_INGEST__PROGRESS_INTERVAL_S": "0.1",
        "TWOSTAGE_INGEST__LOOKUP_DOCS": "32",
    }


def twostage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "twostage.api.cli", *args], env=env, capture_output=True, text=True
    )


def test_kill_9_mid_ingest_then_rerun_ends_with_exactly_the_right_points(
    tmp_path: Path, minilm_settings: Settings, chunker: Chunker
) -> None:
    docs = debian_docs(300)  # the kill lands at the first written batch (32 chunks), a few seconds in
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"_id": d.id, "text": d.text, "title": d.title}) + "\n" for d in docs)
    )
    env = cli_env(minilm_settings, tmp_path / "data")
    process = subprocess.Popen(
        [sys.executable, "-m", "twostage.api.cli", "ingest", str(corpus)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    deadline = time.monotonic() + 240
    for line in process.stderr:  # wait until points are being written, then pull the plug
        written = re.search(r"(\d+) chunks written", line)
        if (written and int(written.group(1)) > 0) or time.monotonic() > deadline:
            break
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL

    rerun = twostage("ingest", str(corpus), "--json", "--quiet", env=env)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    assert report["unchanged"] > 0 and report["new"] + report["updated"] > 0  # the kill landed mid-run

    store = EdgeStore(tmp_path / "data")
    try:
        points = stored_points(store, "docs__v1")
        assert store.count("docs__v1") == len(points)
        assert set(points) == expected_ids(docs, chunker)
        hashes = {
            Document(d.id, d.text, d.title, corpus.name, {}).content_hash for d in docs
        }  # cited by name
        assert {p["doc_hash"] for p in points.values()} == hashes
        assert active_manifest(store, "docs").documents == len(docs)
    finally:
        store.close()


def test_cli_bad_input_gives_one_line_and_no_garbage(tmp_path: Path, minilm_settings: Settings) -> None:
    env = cli_env(minilm_settings, tmp_path / "data")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"_id": "a", "text": "hello"}) + "\n")
    for args, message in [
        (["ingest", str(tmp_path / "missing.jsonl")], "does not exist"),
        (["ingest", str(corpus), "--collection", "my docs"], "invalid collection name 'my docs'"),
        (["ingest", str(corpus), "--collection", "a/b"], "invalid collection name 'a/b'"),
    ]:
        result = twostage(*args, env=env)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("twostage: error: ") and message in result.stderr
    assert not (tmp_path / "data").exists()

    huge = tmp_path / "huge.jsonl"
    with huge.open("w") as handle:
        handle.write(json.dumps({"_id": "huge", "text": "lorem ipsum " * 4_500_000}) + "\n")  # 54 MB
        handle.write(json.dumps({"_id": "blank", "text": " \n\t "}) + "\n")
        handle.write(json.dumps({"_id": "ok", "text": "a normal document"}) + "\n")
    result = twostage("ingest", str(huge), "--json", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["documents"], report["bad_records"], report["total_chunks"]) == (1, 2, 1)
    assert f"{huge}:1: document 'huge' has 54,000,000 characters; the limit is 5,000,000" in result.stderr
    assert "document 'blank' has no text" in result.stderr
    strict = twostage("ingest", str(huge), "--strict", env=env)
    assert strict.returncode == 2 and "(--strict)" in strict.stderr
