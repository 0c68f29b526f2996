"""The exact prompt strings of the Qwen3 embedding and reranker models.

These are byte-for-byte the strings of the official model cards; golden tests pin the
token ids they produce, because a template that is off by one space still "works" and
silently ranks worse.
"""

from collections.abc import Sequence

from twostage.retrieval.core.errors import InputError

DEFAULT_TASK = "Given a web search query, retrieve relevant passages that answer the query"

RERANKER_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and "
    'the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
RERANKER_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DOCUMENT_TAG = "<Document>: "


def embedding_query(task: str, query: str) -> str:
    """Qwen3-Embedding query text; documents are embedded as they are, with no instruction."""
    return f"Instruct: {task}\nQuery:{query}"


def embedding_queries(queries: Sequence[str], instruction: str | None, default_task: str) -> list[str]:
    """Qwen3-Embedding query texts of `queries`, with `instruction` or else the default task."""
    task = default_task if instruction is None else require_text(instruction, "instruction")
    return [embedding_query(task, q) for q in require_texts(queries, "queries")]


def reranker_body(instruction: str, query: str, document: str) -> str:
    """The user turn of the Qwen3-Reranker prompt (what the official recipe truncates)."""
    return reranker_query_part(instruction, query) + reranker_document_part(document)


def reranker_query_part(instruction: str, query: str) -> str:
    """The part of the body shared by every document of one query.

    It ends with a newline that is followed by `<`, a boundary the Qwen pre-tokenizer never
    merges across, so tokenizing the two parts separately gives the same ids as the whole body.
    """
    return f"<Instruct>: {instruction}\n<Query>: {query}\n"


def reranker_document_part(document: str) -> str:
    """The per-document tail of the body."""
    return DOCUMENT_TAG + document


def require_text(value: object, what: str, *, allow_empty: bool = False) -> str:
    """Return `value` if it is usable text, else raise an `InputError` that names it."""
    if not isinstance(value, str):
        raise InputError(f"{what} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise InputError(f"{what} is empty")
    return value


def require_texts(values: object, what: str, *, allow_empty_items: bool = False) -> list[str]:
    """Validate a list of texts, naming the first bad item by index."""
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise InputError(f"{what} must be a list of strings, got {type(values).__name__}")
    return [require_text(v, f"{what}[{i}]", allow_empty=allow_empty_items) for i, v in enumerate(values)]


# No Qwen3 token spans more than this many characters (checked against the vocabulary by a
# test), so the first N tokens of a text always lie within its first N * this characters.
MAX_CHARS_PER_TOKEN = 256


def clip_for_tokens(text: str, max_tokens: int) -> str:
    """Cut a huge text to a prefix that still yields more than `max_tokens` tokens.

    Truncation happens on tokens; this only spares tokenizing megabytes that would be cut
    anyway (a 50 MB document is clipped to ~2 MB before it reaches the tokenizer).
    """
    limit = (max_tokens + 64) * MAX_CHARS_PER_TOKEN
    return text if len(text) <= limit else text[:limit]
