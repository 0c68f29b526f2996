"""The embedder as a `SentenceTransformer`, for sentence-transformers' miners, trainers and evaluators.

A Qwen3-style directory (a decoder without sentence-transformers config) becomes
Transformer (left padding, max length) + last-token Pooling + Normalize, with the query
prompt `Instruct: {task}\\nQuery:` registered as the "query" prompt and `<|endoftext|>`
appended to every input (as the current Qwen3-Embedding tokenizer does, and as
`LastTokenEmbedder` does for one that does not), which is exactly what `LastTokenEmbedder`
computes at inference (tests check the vectors match, with either kind of tokenizer). Directories
that already are sentence-transformers models load as they are.
"""

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from sentence_transformers import SentenceTransformer
from sentence_transformers.models import Normalize, Pooling, Transformer

from twostage.retrieval.models.loading import detect_embedder_family
from twostage.retrieval.models.prompts import embedding_query
from twostage.retrieval.models.source import ModelSource
from twostage.retrieval.models.tokens import append_end_of_text, split_markers_in_text
from twostage.training.settings import TrainingSettings

T = TypeVar("T")


def query_prompt(task: str) -> str:
    """The text put before a query: the Qwen3 prompt with an empty query."""
    return embedding_query(task, "")


def prompt_for(model: SentenceTransformer, instruction: str | None) -> str | None:
    """The text serving puts before a query that carries `instruction` (None: the default task).

    As the serving embedders do: an instruction-aware model (its query prompt is Qwen3's
    `Instruct: ...\\nQuery:`) gets the pair's own instruction, any other model its own query
    prompt (or none), whatever the pair says. Mining, training and evaluation all ask here.
    """
    default = (model.prompts or {}).get("query") or None
    if instruction is not None and default is not None and default.startswith("Instruct:"):
        return query_prompt(instruction)
    return default


def by_instruction(items: Sequence[T], instruction: Callable[[T], str | None]) -> dict[str | None, list[T]]:
    """`items` grouped by their instruction, in first-seen order (each group gets one prompt)."""
    groups: dict[str | None, list[T]] = {}
    for item in items:
        groups.setdefault(instruction(item), []).append(item)
    return groups


def load_st_embedder(path: Path, settings: TrainingSettings, device: str = "cpu") -> SentenceTransformer:
    """A SentenceTransformer for the embedding model in `path` (already resolved to a directory)."""
    task = settings.embedder.instruction
    last_token = detect_embedder_family(ModelSource(str(path), path)) == "last-token"
    own_modules = (path / "modules.json").exists()
    if own_modules:
        model = SentenceTransformer(str(path), device=device, local_files_only=True)
    else:
        transformer = Transformer(
            str(path),
            max_seq_length=settings.embedder.max_length,
            tokenizer_args={"padding_side": "left"},
        )
        pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="lasttoken")
        model = SentenceTransformer(modules=[transformer, pooling, Normalize()], device=device)
    split_markers_in_text(model.tokenizer, by_default=True)  # as the serving embedders read text
    if last_token:  # `LastTokenEmbedder` pools the <|endoftext|> it appends when the tokenizer does not
        append_end_of_text(model.tokenizer)
    if own_modules and not last_token:  # a model with its own prompts (or none): as at inference
        return model
    model.prompts = {**model.prompts, "query": query_prompt(task), "document": ""}
    model.default_prompt_name = None
    return model
