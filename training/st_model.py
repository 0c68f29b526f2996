"""The embedder as a `SentenceTransformer`, for sentence-transformers' miners, trainers and evaluators.

A Qwen3-style directory (a decoder without sentence-transformers config) becomes
Transformer (left padding, max length) + last-token Pooling + Normalize, with the query
prompt `Instruct: {task}\\nQuery:` registered as the "query" prompt, which is exactly what
`LastTokenEmbedder` computes at inference (a test checks the vectors match). Directories
that already are sentence-transformers models load as they are.
"""

from pathlib import Path

from sentence_transformers import SentenceTransformer
from sentence_transformers.models import Normalize, Pooling, Transformer

from retrieval.embedder import detect_embedder_family
from retrieval.model_source import ModelSource
from retrieval.prompts import embedding_query
from retrieval.settings import Settings


def query_prompt(task: str) -> str:
    """The text put before a query: the Qwen3 prompt with an empty query."""
    return embedding_query(task, "")


def load_st_embedder(path: Path, settings: Settings, device: str = "cpu") -> SentenceTransformer:
    """A SentenceTransformer for the embedding model in `path` (already resolved to a directory)."""
    task = settings.embedder.instruction
    last_token = detect_embedder_family(ModelSource(str(path), path)) == "last-token"
    if (path / "modules.json").exists():
        model = SentenceTransformer(str(path), device=device, local_files_only=True)
        if not last_token:  # a model with its own prompts (or none): used as it is, as at inference
            return model
    else:
        transformer = Transformer(
            str(path),
            max_seq_length=settings.embedder.max_length,
            tokenizer_args={"padding_side": "left"},
        )
        pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="lasttoken")
        model = SentenceTransformer(modules=[transformer, pooling, Normalize()], device=device)
    model.prompts = {**model.prompts, "query": query_prompt(task), "document": ""}
    model.default_prompt_name = None
    return model
