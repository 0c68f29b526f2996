"""Hard-negative mining with sentence-transformers' `mine_hard_negatives`.

For each (query, positive), candidates are the corpus passages the current embedder ranks
highest. Guards against false negatives (unlabelled passages that are in fact relevant):
the top `range_min` ranks are skipped, and a candidate must score below the positive by a
relative margin (`score <= positive - |positive| * relative_margin`) and, optionally, below
`max_score`. Optionally a reranker rescores the candidates first (`rescorer`, see
`RerankerScorer`): the margin and `max_score` then apply to its scores, so a passage the
cross-encoder reads as relevant is not used as a negative even where the embedder ranked it
below the positive. The corpus is a list of texts: a corpus file's documents, or the chunk texts
stored in a collection for corpora that only live in the index. The embedding cache is
per model identity, so a retrained model never reuses stale vectors.
"""

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset

from twostage.retrieval.core.errors import InputError
from twostage.retrieval.models.reranker import Reranker
from twostage.training.data import Pair
from twostage.training.st_model import by_instruction, prompt_for


@dataclass(frozen=True)
class MiningSettings:
    num_negatives: int = 3
    range_min: int = 3
    range_max: int = 50
    relative_margin: float = 0.05
    max_score: float | None = None
    batch_size: int = 64


def mine(
    pairs: Sequence[Pair],
    corpus: Sequence[str],
    model: Any,
    settings: MiningSettings,
    *,
    cache_dir: Path | None = None,
    model_id: str = "",
    rescorer: "RerankerScorer | None" = None,
) -> list[Pair]:
    """`pairs` with `settings.num_negatives` mined negatives each (queries with too few are dropped).

    `model` is a SentenceTransformer (see `training.st_model`). Queries are embedded as serving
    embeds them: each pair's instruction picks its query prompt (`prompt_for`), so pairs are
    mined in one group per instruction; a rescoring reranker gets that instruction too.
    Documents get no prompt.
    """
    if not pairs:
        raise InputError("no pairs to mine negatives for")
    if settings.range_max <= settings.range_min:
        raise InputError("range_max must be larger than range_min")
    full_corpus = list(dict.fromkeys([*corpus, *(p.positive for p in pairs)]))
    mined: list[Pair] = []
    for instruction, group in by_instruction(pairs, lambda p: p.instruction).items():
        scorer = rescorer.with_instruction(instruction) if rescorer is not None and instruction else rescorer
        mined += _mine_group(group, full_corpus, model, settings, prompt_for(model, instruction), cache_dir,
                             model_id, scorer)  # fmt: skip
    return mined


def _mine_group(
    pairs: list[Pair],
    corpus: list[str],
    model: Any,
    settings: MiningSettings,
    query_prompt: str | None,
    cache_dir: Path | None,
    model_id: str,
    rescorer: "RerankerScorer | None",
) -> list[Pair]:
    from sentence_transformers.util import mine_hard_negatives

    dataset = Dataset.from_dict({"query": [p.query for p in pairs], "positive": [p.positive for p in pairs]})
    mined = mine_hard_negatives(
        dataset,
        model,
        anchor_column_name="query",
        positive_column_name="positive",
        corpus=corpus,
        cross_encoder=rescorer,  # type: ignore[arg-type]  # duck-types the one method the miner calls
        range_min=settings.range_min,
        range_max=settings.range_max,
        max_score=settings.max_score,
        relative_margin=settings.relative_margin,
        num_negatives=settings.num_negatives,
        sampling_strategy="top",
        query_prompt=query_prompt,
        output_format="n-tuple",
        batch_size=settings.batch_size,
        verbose=False,
        cache_folder=str(embedding_cache(cache_dir, model_id)) if cache_dir else None,
    )
    instruction = pairs[0].instruction
    negative_columns = [c for c in mined.column_names if c.startswith("negative")]
    return [
        Pair(row["query"], row["positive"], tuple(row[c] for c in negative_columns), instruction)
        for row in mined
    ]


class RerankerScorer:
    """One of our rerankers behind `CrossEncoder.predict`, the one method `mine_hard_negatives`
    calls when it rescores candidates.

    Scoring goes through the serving code, so a Qwen3 yes/no reranker judges with its exact
    inference prompt and instruction (sentence-transformers' `CrossEncoder` cannot load it), and a
    fine-tuned cross-encoder scores exactly as it will at search time. The miner passes all
    candidates of one query together; they go to `score_many` as one request per query.
    """

    def __init__(self, reranker: Reranker, instruction: str | None = None) -> None:
        self.reranker = reranker
        self.instruction = instruction

    def with_instruction(self, instruction: str) -> "RerankerScorer":
        return RerankerScorer(self.reranker, instruction)

    def predict(self, sentences: Sequence[tuple[str, str]], convert_to_tensor: bool = False, **_: Any) -> Any:
        import torch

        positions: dict[str, list[int]] = {}
        for i, (query, _document) in enumerate(sentences):
            positions.setdefault(query, []).append(i)
        requests = [(q, [sentences[i][1] for i in where], self.instruction) for q, where in positions.items()]
        scores = [0.0] * len(sentences)
        for where, scored in zip(positions.values(), self.reranker.score_many(requests), strict=True):
            for i, score in zip(where, scored, strict=True):
                scores[i] = score
        tensor = torch.tensor(scores, dtype=torch.float32)
        return tensor if convert_to_tensor else tensor.numpy()


def with_negatives(
    pairs: list[Pair], mined: list[Pair], chunks: list[str], n: int, seed: int = 0
) -> tuple[list[Pair], int]:
    """Every pair with `n` negatives: its mined ones, else random chunks (never its positive).

    Mining drops a pair whose candidates all fail the false-negative guard, which happens a lot
    while the deployed embedder is weak; dropping them would shrink training exactly when it
    is needed most. Returns the pairs and how many got random negatives.
    """
    rng = random.Random(seed)
    found = {(p.query, p.positive): p for p in mined}
    out, filled = [], 0
    for pair in pairs:
        hit = found.get((pair.query, pair.positive))
        if hit is not None:
            out.append(hit)
            continue
        pool = [
            c for c in rng.sample(chunks, min(len(chunks), 4 * n + 4)) if c.strip() != pair.positive.strip()
        ]
        out.append(Pair(pair.query, pair.positive, tuple(pool[:n]), pair.instruction))
        filled += 1
    return out, filled


def embedding_cache(cache_dir: Path, model_id: str) -> Path:
    """One embedding cache folder per model identity (name@content-hash)."""
    if not model_id:
        raise InputError("an embedding cache needs the model identity")
    safe = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in model_id)
    return cache_dir / "mining-embeddings" / safe


def write_mined(pairs: Sequence[Pair], out: Path, provenance: dict[str, Any]) -> None:
    """The mined dataset (JSONL, the pairs format) and, next to it, the settings that produced it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for p in pairs:
            record = {"query": p.query, "positive": p.positive, "negatives": list(p.negatives)}
            if p.instruction:
                record["instruction"] = p.instruction
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    out.with_suffix(".settings.json").write_text(json.dumps(provenance, indent=2, ensure_ascii=False))


def provenance(settings: MiningSettings, **context: Any) -> dict[str, Any]:
    return {"mining": asdict(settings), **context}
