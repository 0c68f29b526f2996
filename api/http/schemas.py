"""Wire schemas (pydantic, explicit bounds), kept apart from the domain dataclasses.

Filters on the wire are a mapping from an indexed payload field to a value (equality),
`{"any": [...]}` (any of) or `{"gte"|"gt"|"lte"|"lt": number}` (range), all ANDed:

    {"metadata.section": "games", "chunk_index": {"lte": 2}, "source": {"any": ["a", "b"]}}
"""

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from twostage.api.http.filters import parse_filter
from twostage.retrieval.access.caller import Caller
from twostage.retrieval.search.two_stage import Deployment, SearchHit, SearchQuery, SearchResult
from twostage.retrieval.store.vector_store import Filter
from twostage.retrieval.traffic.log import LoggedSearch

MAX_QUERY_CHARS = 32_768
MAX_INSTRUCTION_CHARS = 16_384
MAX_DOCUMENT_CHARS = 1_000_000

Scalar = str | int | bool
FilterValue = Scalar | dict[str, Any]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OnBehalfOf(_Strict):
    """The end user a delegating key searches for: the search sees the intersection of the key's
    principals and `user:USER` and `group:G` for each group."""

    user: str | None = Field(None, min_length=1, max_length=128)
    groups: list[str] = Field(default_factory=list, max_length=256)


class SearchRequest(_Strict):
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    instruction: str | None = Field(None, min_length=1, max_length=MAX_INSTRUCTION_CHARS)
    top_k: int = Field(50, ge=1, le=1000, description="chunks recalled by ANN")
    top_n: int = Field(10, ge=1, le=1000, description="hits returned")
    rerank_k: int | None = Field(
        None, ge=1, le=1000, description="recalled chunks the reranker sees, the rest follow in recall order "
        "(default: the service's setting, else all top_k)",
    )  # fmt: skip
    filter: dict[str, FilterValue] | None = None
    on_behalf_of: OnBehalfOf | None = Field(
        None, description="a delegating key (keys add --delegate) searching for one of its users"
    )
    rerank: bool | Literal["auto"] | None = Field(
        None, description='rerank the recalled chunks: true, false, or "auto" (only a reranker that '
        "measured better than recall; default: the service's setting, auto)",
    )  # fmt: skip
    recall: Literal["dense", "sparse", "hybrid"] | None = Field(
        None, description="first stage: dense ANN, BM25, or both fused by RRF (default: hybrid where "
        "the collection has BM25 vectors)",
    )  # fmt: skip
    rerank_fusion: Literal["rrf", "none"] | None = Field(
        None, description="how reranked hits are ordered: rrf fuses the reranker's rank with the recall "
        "rank, none orders by the reranker alone (default: the service's setting, rrf)",
    )  # fmt: skip
    collection: str | None = Field(None, description="alias to search; default the service's collection")
    group_by_doc: bool = Field(False, description="keep each document's best chunk only")
    min_relevance: float | None = Field(
        None, ge=0, le=1, description="drop hits whose calibrated relevance is below it; none left: the "
        "notes say nothing relevant was found (ignored, with a note, where the deployment is uncalibrated)",
    )  # fmt: skip
    session: str | None = Field(
        None, min_length=1, max_length=256, description="the client's opaque session id, kept in the search "
        "log with the search (feedback, and a canary's share, follow sessions)",
    )  # fmt: skip

    def search_query(
        self, deployment: Deployment, visible: Callable[[Filter | None], Filter | None]
    ) -> SearchQuery:
        """The search this body asks for, its filter checked against the deployment's indexed fields
        and the caller's permissions ANDed in (`visible`: `Service.visible` for the caller)."""
        flt = visible(parse_filter(self.filter, deployment.manifest.payload_indexes))
        return SearchQuery(
            query=self.query, top_k=self.top_k, top_n=self.top_n, instruction=self.instruction,
            filter=flt, recall=self.recall,
            rerank=self.rerank, rerank_k=self.rerank_k, rerank_fusion=self.rerank_fusion,
            group_by_doc=self.group_by_doc, min_relevance=self.min_relevance,
        )  # fmt: skip

    def caller(self, caller: Caller) -> Caller:
        """Who this search runs as: the key's caller, narrowed to the end user of `on_behalf_of`."""
        if self.on_behalf_of is None:
            return caller
        return caller.acting_for(self.on_behalf_of.user, self.on_behalf_of.groups)

    def logged(
        self, search_id: str, result: SearchResult, deployment: Deployment, caller: Caller,
        arm: str | None = None, teams: "Sequence[str] | None" = None,
    ) -> LoggedSearch:  # fmt: skip
        """What the search log keeps of this search, answered with `result`, and whose it is."""
        return LoggedSearch.of(search_id, self.query, self.instruction, self.filter, self.session, result,
                               deployment.record, arm, teams, owner=caller)  # fmt: skip

    @model_validator(mode="after")
    def _top_n_within_top_k(self) -> "SearchRequest":
        if self.top_n > self.top_k:
            raise ValueError(f"top_n ({self.top_n}) cannot exceed top_k ({self.top_k})")
        if self.rerank_k is not None and self.rerank_k > self.top_k:
            raise ValueError(f"rerank_k ({self.rerank_k}) cannot exceed top_k ({self.top_k})")
        return self


class SearchResponse(BaseModel):
    search_id: str | None = Field(
        description="names this search in feedback events (POST /v1/feedback); null when the search "
        "log's database was unreachable (a note says so)"
    )
    hits: list[SearchHit]
    collection: str = Field(description="the collection version that answered (NAME__vN)")
    embedder: str
    reranker: str | None = Field(description="the reranker that ordered the hits (null: not reranked)")
    recall: Literal["dense", "sparse", "hybrid"] = Field(description="the first stage that ran")
    rerank_fusion: Literal["rrf", "none"] | None = Field(
        description="how the reranked hits were ordered (null: not reranked)"
    )
    stages: list[str] = Field(description="the stages that ran, in order")
    notes: list[str] = Field(description="why a stage did not run, and how to turn it on")
    timings_ms: dict[str, float]


class RerankRequest(BaseModel):
    """What the rerank dialects share (unknown fields are accepted and ignored)."""

    model: str | None = None
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    documents: list[str | dict[str, Any]] = Field(
        min_length=1, description="at most api.max_client_batch (2,048) documents; more get 413"
    )
    top_n: int | None = Field(None, ge=1)
    max_tokens_per_doc: int | None = Field(None, ge=1, le=32768, description="Qwen3 tokens kept per document")
    truncation: bool | None = Field(
        None, description="true: a document longer than the reranker reads is cut to its beginning; default: "
        "it is scored in overlapping windows and gets its best window's score",
    )  # fmt: skip
    return_documents: bool = False
    instruction: str | None = Field(None, min_length=1, max_length=MAX_INSTRUCTION_CHARS)
    raw_scores: bool = Field(
        False, description="relevance_score is the reranker's own probability, not the calibrated relevance "
        "(which is served where the deployment has a calibration)",
    )  # fmt: skip


class CohereRerankRequest(RerankRequest):
    """Cohere v2 `POST /v2/rerank`."""


class JinaRerankRequest(RerankRequest):
    """Jina / vLLM `POST /v1/rerank` (returns documents unless told not to)."""

    return_documents: bool = True


class EmbeddingsRequest(BaseModel):
    """OpenAI `POST /v1/embeddings`. With an `instruction` (or input_type=query) inputs are
    embedded as queries with the Qwen3 query prompt; otherwise as documents (no instruction)."""

    input: str | list[str] = Field(description="a string or a list of strings")
    model: str | None = None
    dimensions: int | None = Field(None, ge=1)
    encoding_format: Literal["float", "base64"] = "float"
    instruction: str | None = Field(None, min_length=1, max_length=MAX_INSTRUCTION_CHARS)
    input_type: Literal["query", "document"] | None = None
    user: str | None = None


def _side(value: Any) -> Any:
    """TEI accepts `Left`/`Right` as well as `left`/`right`."""
    return value.lower() if isinstance(value, str) else value


TruncationSide = Annotated[Literal["left", "right"], BeforeValidator(_side)]


class TeiRerankRequest(BaseModel):
    """Text Embeddings Inference `POST /rerank` (unknown fields are accepted and ignored).

    The Cohere/Jina body (`documents`, `top_n`) is accepted here too, and answered in the
    Jina/Cohere shape, for clients configured with a base URL whose rerank path is `/rerank`.
    """

    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    texts: list[str] | None = Field(
        None, min_length=1, description="at most api.max_client_batch (2,048) texts; more get 413"
    )
    documents: list[str | dict[str, Any]] | None = Field(
        None,
        min_length=1,
        description="the Cohere/Jina body instead of texts: answered as /v1/rerank answers",
    )
    top_n: int | None = Field(None, ge=1, description="with documents: how many results")
    max_tokens_per_doc: int | None = Field(
        None, ge=1, le=32768, description="with documents: as in /v1/rerank"
    )
    return_documents: bool = Field(True, description="with documents: as in /v1/rerank")
    raw_scores: bool = Field(
        False, description="the reranker's logits instead of probabilities (calibrated where the deployment "
        "has a calibration); with documents, the reranker's own probabilities",
    )  # fmt: skip
    return_text: bool = False
    truncate: bool | None = Field(
        None, description="true: cut texts that do not fit the model (truncation_direction says which end "
        "stays); default: a text that does not fit is scored in overlapping windows, its best window counts",
    )  # fmt: skip
    truncation_direction: TruncationSide = Field(
        "right", description="right keeps a text's beginning, left its end (the prompt and query are kept)"
    )
    instruction: str | None = Field(None, min_length=1, max_length=MAX_INSTRUCTION_CHARS)

    @model_validator(mode="after")
    def _texts_or_documents(self) -> "TeiRerankRequest":
        if (self.texts is None) == (self.documents is None):
            raise ValueError("send either texts (TEI) or documents (Cohere/Jina), not both or neither")
        return self


class TeiEmbedRequest(BaseModel):
    """Text Embeddings Inference `POST /embed`. `prompt_name: query` (or an `instruction`) embeds
    the inputs as queries with the Qwen3 query prompt; otherwise they are documents."""

    inputs: str | list[str] = Field(description="a string or a list of strings")
    normalize: bool = True
    truncate: bool | None = None
    truncation_direction: TruncationSide = "right"
    dimensions: int | None = Field(None, ge=1)
    prompt_name: Literal["query", "document"] | None = None
    instruction: str | None = Field(None, min_length=1, max_length=MAX_INSTRUCTION_CHARS)
