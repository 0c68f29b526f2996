"""Token-window chunking with Qwen3's tokenizer, preferring paragraph and sentence boundaries.

The text is cut into pieces no longer than the window: whole paragraphs where they fit,
else sentences, else lines/words, else runs of `overlap` tokens (so even a text without
any boundary gets overlapping windows). Pieces are then packed greedily into windows of at
most `tokens` tokens; each new window starts with the trailing pieces of the previous one
that fit in `overlap` tokens. Every emitted chunk is re-counted, so no chunk exceeds the
window even where BPE merges differently across a piece boundary. Offsets are character
offsets into the document text, with surrounding whitespace trimmed; empty chunks are never
produced.

The window is counted in Qwen3 tokens, but the embedder reads its own tokens and cuts off
the rest: all-MiniLM-L6-v2 reads 256 word pieces, so a 512-token chunk would be embedded by
its first half only, and its second half could never be found by dense recall. With a
`TokenLimit` (the embedder's tokenizer and maximum length) a document whose chunks do not
all fit is chunked again with a window shrunk in proportion, until every chunk fits.
"""

import bisect
import itertools
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twostage.retrieval.ingest.documents import Chunk, Document, Section
from twostage.retrieval.models.tokens import Qwen3Tokens
from twostage.retrieval.store.settings import ChunkerSettings

if TYPE_CHECKING:
    from twostage.retrieval.models.embedder import Embedder

# Boundaries, coarsest first; a cut is made at the start of each match, so the separating
# whitespace begins the next piece (as Qwen's pre-tokenizer attaches a space to the next word).
_BOUNDARIES = (
    re.compile(r"\n[ \t]*\n\s*"),  # paragraphs
    re.compile(r"(?<=[.!?;:])\s+|(?<=[。！？；])"),  # sentences (Latin and CJK punctuation)
    re.compile(r"\n|(?<=\S)\s+"),  # lines, then words
)

Piece = tuple[int, int, int]  # start, end, tokens
_MIN_WINDOW = 16  # the smallest window a document is re-chunked with to fit the embedder


@dataclass(frozen=True)
class TokenLimit:
    """The most tokens a chunk may take in the embedder's input, and how to count them."""

    max_tokens: int
    count: Callable[[Sequence[str]], list[int]]


class Chunker:
    """Splits document text into `Chunk`s. Cheap to build; share one per process."""

    def __init__(
        self, tokens: Qwen3Tokens, settings: ChunkerSettings | None = None, limit: TokenLimit | None = None
    ) -> None:
        self.tokens = tokens
        self.settings = settings or ChunkerSettings()
        self.limit = limit

    @classmethod
    def for_embedder(cls, tokens: Qwen3Tokens, settings: ChunkerSettings, embedder: "Embedder") -> "Chunker":
        """Chunks the embedder reads whole: within `settings` and the embedder's `max_length`."""
        return cls(tokens, settings, TokenLimit(embedder.max_length, embedder.document_lengths))

    def chunk(self, doc_id: str, text: str) -> list[Chunk]:
        """The chunks of a plain text, in order, indexed from 0 (each within `limit`, if any)."""
        return self.chunk_document(Document(doc_id, text))

    def chunk_document(self, doc: Document) -> list[Chunk]:
        """The chunks of a document: its sections first (a chunk never spans two), then token
        windows; each chunk carries its heading path and page span."""
        sections = doc.sections or (Section(0, len(doc.text)),)
        chunks: list[Chunk] = []
        for section in sections:
            for chunk in self._fitted(doc, section):
                page, page_end = _page_span(doc.pages, chunk.start, chunk.end)
                chunks.append(Chunk(doc.id, len(chunks), chunk.text, chunk.start, chunk.end, section.headings,
                                    page, page_end, chunk.context))  # fmt: skip
        return chunks

    def _fitted(self, doc: Document, section: Section) -> list[Chunk]:
        """One section's chunks, re-cut with a smaller window until the embedder reads each whole."""
        cfg = self.settings
        context = " > ".join(section.headings) if cfg.heading_context else ""
        while True:
            chunks = self._chunk(doc.id, doc.text, section.start, section.end, cfg, context)
            if self.limit is None or not chunks:
                return chunks
            counts = self.limit.count([c.embed_text for c in chunks])
            worst = max(n / self.limit.max_tokens for n in counts)
            if worst <= 1 or cfg.tokens <= _MIN_WINDOW:
                return chunks
            size = max(_MIN_WINDOW, min(cfg.tokens - 1, int(cfg.tokens / worst * 0.95)))
            cfg = cfg.model_copy(update={"tokens": size, "overlap": min(cfg.overlap, size // 4)})

    def _chunk(
        self, doc_id: str, text: str, begin: int, finish: int, cfg: ChunkerSettings, context: str
    ) -> list[Chunk]:
        windows = self._windows(text, self._pieces(text, begin, finish, 0, cfg), cfg)
        chunks: list[Chunk] = []
        for start, end in windows:
            body = text[start:end]
            stripped = body.strip()
            if not stripped:
                continue
            start += len(body) - len(body.lstrip())
            chunks.append(Chunk(doc_id, len(chunks), stripped, start, start + len(stripped), context=context))
        return chunks

    def _pieces(self, text: str, start: int, end: int, level: int, cfg: ChunkerSettings) -> list[Piece]:
        """Cut text[start:end] into pieces of at most `tokens` tokens at the coarsest boundaries."""
        n = self.tokens.count(text[start:end].strip())
        if n <= cfg.tokens:
            return [(start, end, n)] if end > start else []
        if level == len(_BOUNDARIES):
            return list(self._token_runs(text, start, end, cfg))
        cuts = [start]
        for match in _BOUNDARIES[level].finditer(text, start, end):
            if match.start() > cuts[-1]:
                cuts.append(match.start())
        cuts.append(end)
        if len(cuts) == 2:  # no boundary of this kind inside: try the next finer one
            return self._pieces(text, start, end, level + 1, cfg)
        return [p for a, b in itertools.pairwise(cuts) for p in self._pieces(text, a, b, level + 1, cfg)]

    def _token_runs(self, text: str, start: int, end: int, cfg: ChunkerSettings) -> Iterator[Piece]:
        """Runs of `overlap` tokens (or a whole window when overlap is 0) with their offsets."""
        ids = self.tokens.encode(text[start:end])
        _, offsets = self.tokens.encoding.decode_with_offsets(ids)
        step = cfg.overlap or cfg.tokens
        bounds = [*offsets[::step], end - start]
        for a, b in itertools.pairwise(bounds):
            if b > a:
                yield start + a, start + b, self.tokens.count(text[start + a : start + b].strip())

    def _windows(self, text: str, pieces: list[Piece], cfg: ChunkerSettings) -> list[tuple[int, int]]:
        """Pack pieces into windows of at most `tokens` tokens, carrying `overlap` tokens over."""
        size, overlap = cfg.tokens, cfg.overlap
        windows: list[tuple[int, int]] = []
        queue = list(reversed(pieces))  # next piece at the end
        current: list[Piece] = []
        carried = 0  # leading pieces of `current` repeated from the previous window
        while queue:
            total = sum(p[2] for p in current)
            if not current[carried:] or total + queue[-1][2] <= size:
                current.append(queue.pop())
                if queue:
                    continue
            # The window is full (or the input is done). Counts of pieces add up to the count
            # of their concatenation except where BPE merges across a join: re-count, give back.
            while len(current) - carried > 1 and self._count(text, current) > size:
                queue.append(current.pop())
            while carried and self._count(text, current) > size:
                current.pop(0)
                carried -= 1
            windows.append((current[0][0], current[-1][1]))
            tail: list[Piece] = []
            for piece in reversed(current):
                if sum(p[2] for p in tail) + piece[2] > overlap:
                    break
                tail.insert(0, piece)
            while tail and queue and sum(p[2] for p in tail) + queue[-1][2] > size:
                tail.pop(0)
            current, carried = (tail, len(tail)) if queue else ([], 0)
        return windows

    def _count(self, text: str, pieces: list[Piece]) -> int:
        """Tokens of the window the pieces make, as stored (whitespace trimmed)."""
        return self.tokens.count(text[pieces[0][0] : pieces[-1][1]].strip())


def _page_span(pages: tuple[int, ...], start: int, end: int) -> tuple[int | None, int | None]:
    """1-based first and last page of text[start:end], given the offsets where pages start."""
    if not pages:
        return None, None
    return bisect.bisect_right(pages, start), bisect.bisect_right(pages, max(start, end - 1))
