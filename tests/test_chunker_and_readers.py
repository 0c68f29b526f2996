"""Chunker windows (Qwen3 token counts, boundaries, overlap, offsets) and corpus readers."""

import io
import itertools
import json
import sys
from pathlib import Path

import pytest
from helpers import DEBIAN_IR

from twostage.retrieval.core.errors import InputError
from twostage.retrieval.ingest.chunker import Chunker
from twostage.retrieval.ingest.documents import BadRecord, Document, chunk_point_id
from twostage.retrieval.ingest.readers import CorpusReader
from twostage.retrieval.models.tokens import Qwen3Tokens
from twostage.retrieval.store.settings import ChunkerSettings

DATA = DEBIAN_IR / "corpus.jsonl"


@pytest.fixture(scope="module")
def tokens() -> Qwen3Tokens:
    return Qwen3Tokens()


@pytest.fixture(scope="module")
def debian_text() -> str:
    with DATA.open() as handle:
        return "\n\n".join(json.loads(next(handle))["text"] for _ in range(150))


TEXTS = {
    "no boundaries": "word " * 3000,
    "cjk": "检索增强生成系统需要精确的分块。" * 400,
    "no spaces": "abc.def" * 2000,
    "emoji": "emoji 😀🎉 mixed Ω≈ç√ text. " * 300,
    "one char": "x",
}


@pytest.mark.parametrize("size,overlap", [(512, 64), (64, 8), (32, 0)])
def test_chunks_fit_the_window_cover_the_text_and_keep_offsets(
    tokens: Qwen3Tokens, debian_text: str, size: int, overlap: int
) -> None:
    chunker = Chunker(tokens, ChunkerSettings(tokens=size, overlap=overlap))
    for text in [debian_text, *TEXTS.values()]:
        chunks = chunker.chunk("d", text)
        assert [c.index for c in chunks] == list(range(len(chunks)))
        covered = bytearray(len(text))
        for c in chunks:
            assert c.text and c.text == text[c.start : c.end] and c.text == c.text.strip()
            assert tokens.count(c.text) <= size
            covered[c.start : c.end] = b"\x01" * (c.end - c.start)
        assert all(covered[i] or text[i].isspace() for i in range(len(text)))
        assert all(a.start < b.start and a.end < b.end for a, b in itertools.pairwise(chunks))


def test_windows_prefer_paragraphs_and_overlap(tokens: Qwen3Tokens, debian_text: str) -> None:
    chunker = Chunker(tokens, ChunkerSettings(tokens=256, overlap=32))
    chunks = chunker.chunk("d", debian_text)
    starts_at_paragraph = sum(c.start == 0 or debian_text[c.start - 2 : c.start] == "\n\n" for c in chunks)
    assert starts_at_paragraph / len(chunks) > 0.5
    long_run = chunker.chunk("d", "word " * 2000)
    overlaps = [a.end - b.start for a, b in itertools.pairwise(long_run)]
    assert all(o > 0 for o in overlaps)  # consecutive windows share text
    assert all(tokens.count(long_run[0].text[-o:]) <= 40 for o in overlaps[:1])


def test_whitespace_only_text_gives_no_chunks(tokens: Qwen3Tokens) -> None:
    assert Chunker(tokens).chunk("d", " \n\n\t ") == []


def test_point_ids_are_deterministic_uuid5() -> None:
    assert chunk_point_id("doc-1", 0) == chunk_point_id("doc-1", 0)
    assert len({chunk_point_id("doc-1", i) for i in range(100)} | {chunk_point_id("doc-2", 0)}) == 101
    assert chunk_point_id("a", 0) == "c88eb111-e6ac-5924-836c-3d4a71cbaeed"  # pinned: ids must never drift


def test_jsonl_reader_reports_bad_records_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    lines = [
        json.dumps(
            {"_id": "a", "text": "Café\u0301 au lait", "title": "T", "metadata": {"k": 1}, "section": "x"}
        ),
        "{not json",
        json.dumps({"id": 7, "text": "seven"}),
        json.dumps({"_id": "b"}),
        json.dumps({"_id": "c", "text": "   \n "}),
        json.dumps(["a list"]),
        "",
        json.dumps({"_id": "d", "text": "x" * 2000}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    records = list(CorpusReader(str(path), max_document_chars=1000))
    docs = [r for r in records if isinstance(r, Document)]
    bad = [str(r) for r in records if isinstance(r, BadRecord)]
    assert [d.id for d in docs] == ["a", "7"]
    assert docs[0].text == "Café\u0301 au lait".replace("e\u0301", "é")  # NFC
    assert docs[0].metadata == {"section": "x", "k": 1} and docs[0].title == "T"
    assert bad[0].startswith(f"{path}:2: invalid JSON")
    assert bad[1] == f"{path}:4: missing 'text' (a string)"
    assert bad[2].startswith(f"{path}:5: document 'c' has no text")
    assert bad[3] == f"{path}:6: a line must be a JSON object"
    assert bad[4].startswith(f"{path}:8: document 'd' has 2,000 characters; the limit is 1,000")


def test_directory_reader_reads_text_markdown_html_and_skips_binary(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("plain text file")
    (tmp_path / "sub" / "b.md").write_text("# Heading B\n\nbody")
    (tmp_path / "c.html").write_text(
        "<html><head><title>Page C</title><style>p{}</style></head>"
        "<body><p>Hello &amp; welcome</p><script>var x;</script><p>second</p></body></html>"
    )
    (tmp_path / "d.txt").write_bytes(b"\x00\x01binary")
    (tmp_path / "e.txt").write_bytes(b"\xff\xfe latin junk")
    (tmp_path / "ignored.bin").write_bytes(b"whatever")
    records = list(CorpusReader(str(tmp_path), max_document_chars=10_000))
    docs = {r.id: r for r in records if isinstance(r, Document)}
    assert set(docs) == {"a.txt", "sub/b.md", "c.html"}
    assert docs["sub/b.md"].title == "Heading B"
    assert docs["c.html"].title == "Page C" and docs["c.html"].text == "Hello & welcome\n\nsecond"
    bad = sorted(str(r) for r in records if isinstance(r, BadRecord))
    assert "binary file" in bad[0] and "not UTF-8" in bad[1]


def test_stdin_and_missing_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"_id": "s", "text": "from stdin"}) + "\n"))
    assert [r.id for r in CorpusReader("-", 1000) if isinstance(r, Document)] == ["s"]
    with pytest.raises(InputError, match="does not exist"):
        CorpusReader("/no/such/corpus.jsonl", 1000)
