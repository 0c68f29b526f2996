"""A collection's chunks as training reads them: to resolve pairs and judgements that name their
passages by id (`{query, doc_id}`, `{query, id, negative_ids}`) or by text."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from twostage.retrieval.core.errors import InputError
from twostage.retrieval.store.vector_store import VectorStore
from twostage.training.data import Judgement, Pair

Say = Callable[[str], None]
TEXT_KEY = 200  # a passage is matched by its first 200 characters, stripped (as retrain always has)


def text_key(text: str) -> str:
    return text.strip()[:TEXT_KEY]


@dataclass
class StoredChunks:
    """Every chunk of one collection version: text, document, and each document's first chunk."""

    collection: str
    texts: dict[str, str] = field(default_factory=dict)  # chunk id -> text
    documents: dict[str, str] = field(default_factory=dict)  # chunk id -> doc_id
    first: dict[str, tuple[int, str]] = field(default_factory=dict)  # doc_id -> (chunk_index, chunk id)
    by_text: dict[str, str] = field(default_factory=dict)  # text key -> the first chunk id with it

    @classmethod
    def read(cls, store: VectorStore, collection: str) -> "StoredChunks":
        chunks = cls(collection)
        for record in store.scroll(collection, fields=["text", "doc_id", "chunk_index"]):
            text, doc_id = str(record.payload.get("text", "")), str(record.payload.get("doc_id", ""))
            index = record.payload.get("chunk_index")
            index = index if isinstance(index, int) else 0
            chunks.texts[record.id], chunks.documents[record.id] = text, doc_id
            if doc_id not in chunks.first or index < chunks.first[doc_id][0]:
                chunks.first[doc_id] = (index, record.id)
            chunks.by_text.setdefault(text_key(text), record.id)
        return chunks

    def positive(self, judgement: Judgement) -> str | None:
        """The chunk a judgement names: by text, by id, or a document's first chunk; None if not stored."""
        if judgement.positive is not None:
            return self.by_text.get(text_key(judgement.positive))
        if judgement.chunk_id is not None:
            return judgement.chunk_id if judgement.chunk_id in self.texts else None
        first = self.first.get(judgement.doc_id or "")
        return first[1] if first is not None else None

    def pairs(self, records: Sequence[Pair | Judgement], say: Say) -> list[Pair]:
        """Every record as a text pair: text pairs whose positive is stored, as they are; pairs by id
        with the stored texts (negatives by id that are not stored are left out, counted). A record
        naming nothing stored is left out and counted; none left is an error."""
        kept: list[Pair] = []
        missing = gone = 0
        for record in records:
            if isinstance(record, Pair):
                found = record if text_key(record.positive) in self.by_text else None
            else:
                chunk = self.positive(record)
                negatives = tuple(
                    self.texts[n] for n in record.negative_ids if n in self.texts and n != chunk
                )
                gone += sum(1 for n in record.negative_ids if n not in self.texts)
                found = None if chunk is None else Pair(record.query, self.texts[chunk], negatives,
                                                        record.instruction)  # fmt: skip
            if found is None:
                missing += 1
            else:
                kept.append(found)
        if not kept:
            raise InputError(
                f"none of the {len(records)} pairs' positives is stored in {self.collection}: retrain learns "
                "from queries about indexed documents (ingest them first, or check the pairs file)"
            )
        if missing:
            say(f"warning: {missing} of {len(records)} pairs have a positive that is not in "
                f"{self.collection}; they are left out")  # fmt: skip
        if gone:
            say(f"warning: {gone} negative ids name no chunk of {self.collection}; those negatives are "
                "left out (the pairs keep the rest)")  # fmt: skip
        return list(dict.fromkeys(kept))
