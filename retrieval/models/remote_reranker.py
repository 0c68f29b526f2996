"""The `Reranker` protocol over a remote rerank API: Cohere, Jina/vLLM or TEI.

`template = server`: the server applies its model's template (another twostage, a Qwen3
reranker converted to sequence classification): raw query and documents are sent, with the
instruction as the `instruction` field twostage understands. `template = client`: vLLM serving
the original Qwen3-Reranker through its documented `hf_overrides` (`Qwen3ForSequenceClassification`,
`classifier_from_token: ["no", "yes"]`, `is_original_qwen3_reranker`) applies no template, so
the query is sent as the system prefix + `<Instruct>` + `<Query>` and each document as
`<Document>` + the assistant suffix, as vLLM's own Qwen3-Reranker example formats them. Calls
larger than `remote.max_batch` documents are split and the scores merged in input order; an
answer with the wrong number of scores, or indices that do not cover the documents, is an
error (HTTP 503 with the reason), never a silent zero.
"""

from collections.abc import Callable, Sequence
from typing import Any

from twostage.retrieval.models.prompts import (
    RERANKER_PREFIX,
    RERANKER_SUFFIX,
    require_text,
    require_texts,
    reranker_document_part,
    reranker_query_part,
)
from twostage.retrieval.models.remote import RemoteClient, RemoteMetrics, escape_markers
from twostage.retrieval.models.reranker import RerankMixin
from twostage.retrieval.models.settings import RerankerSettings
from twostage.retrieval.models.tokens import Qwen3Tokens

_ROUTES = {"cohere": "/v2/rerank", "jina": "/v1/rerank", "tei": "/rerank"}


class RemoteReranker(RerankMixin):
    """Scores (query, document) pairs on a rerank server; scores are its relevance probabilities."""

    probabilities = True

    def __init__(self, cfg: RerankerSettings, metrics: RemoteMetrics | None = None) -> None:
        self.cfg = cfg
        self.client = RemoteClient(cfg.remote, "reranker", metrics)
        # what the server computes: the Qwen3 yes/no head when the prompt is formatted here
        auto = "yes-no" if cfg.template == "client" else "cross-encoder"
        self.family: str = cfg.family if cfg.family != "auto" else auto
        self.max_length = cfg.max_length
        self.instruction = cfg.instruction
        self._tokens = Qwen3Tokens()
        self._text: Callable[[str], str] = escape_markers if cfg.remote.escape_markers else str

    @property
    def model_id(self) -> str:
        return f"remote:{self.cfg.model}"

    @property
    def numerics(self) -> str:
        return "remote"

    def score(self, query: str, documents: Sequence[str], instruction: str | None = None) -> list[float]:
        require_text(query, "query")
        docs = require_texts(documents, "documents", allow_empty_items=True)
        task = self.instruction if instruction is None else require_text(instruction, "instruction")
        step = self.cfg.remote.max_batch
        scores: list[float] = []
        for start in range(0, len(docs), step):
            scores += self._call(query, docs[start : start + step], task)
        return scores

    def request(self, query: str, documents: Sequence[str], task: str) -> tuple[str, dict[str, Any]]:
        """The route and the body sent for one call (public so tests can pin the formats)."""
        text = self._text
        if self.cfg.template == "client":
            sent_query = RERANKER_PREFIX + reranker_query_part(text(task), text(query))
            sent = [reranker_document_part(text(d)) + RERANKER_SUFFIX for d in documents]
            extra: dict[str, Any] = {}
        else:
            sent_query, sent, extra = text(query), [text(d) for d in documents], {"instruction": text(task)}
        protocol = self.cfg.protocol
        if protocol == "tei":
            body = {"query": sent_query, "texts": sent, "raw_scores": False, "truncate": True}
        else:
            body = {"model": self.cfg.model, "query": sent_query, "documents": sent, "top_n": len(sent)}
            if protocol == "jina":
                body["return_documents"] = False
        return _ROUTES[protocol], {**body, **extra}

    def _call(self, query: str, documents: list[str], task: str) -> list[float]:
        route, body = self.request(query, documents, task)
        answer = self.client.post(route, body)
        if self.cfg.protocol == "tei":  # TEI answers a bare list of {index, score}
            results, key = answer, "score"
        else:
            results, key = answer.get("results") if isinstance(answer, dict) else None, "relevance_score"
        if not isinstance(results, list) or len(results) != len(documents):
            count = len(results) if isinstance(results, list) else "no"
            raise self.client.bad_answer(f"{count} scores for {len(documents)} documents")
        scores: dict[int, float] = {}
        try:
            for result in results:
                scores[int(result["index"])] = float(result[key])
        except (KeyError, TypeError, ValueError) as exc:
            raise self.client.bad_answer(f"not a {self.cfg.protocol} rerank answer ({exc!r})") from None
        if sorted(scores) != list(range(len(documents))):
            raise self.client.bad_answer(
                f"indices {sorted(scores)[:10]} do not cover {len(documents)} documents"
            )
        return [scores[i] for i in range(len(documents))]

    def input_lengths(
        self, query: str, documents: Sequence[str], instruction: str | None = None
    ) -> list[int]:
        task = self.instruction if instruction is None else require_text(instruction, "instruction")
        fixed = self._tokens.count(RERANKER_PREFIX + reranker_query_part(task, query) + RERANKER_SUFFIX)
        return [
            fixed + len(ids)
            for ids in self._tokens.encode_batch([reranker_document_part(d) for d in documents])
        ]
