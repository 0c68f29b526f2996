"""What `twostage retrain` trains the reranker from, and with which objective.

Fine-tuning the deployed reranker is right when it is a reranker: a Qwen3-Reranker keeps the
Qwen3 yes/no objective (LoRA), a cross-encoder keeps its classification head. It is wrong for
the offline fallback, a general chat model used zero-shot (SmolLM2): it ranks no better than
chance, and on two CPU cores its yes/no training sees about one sequence a second, so hours
buy too few steps to learn ranking (measured: 50 LoRA steps left its dev loss at chance).
For an untrusted reranker next to an encoder embedder (MiniLM), a cross-encoder is trained
instead, initialised from the embedder's encoder (the candidate's, once trained): a one-logit
head on an encoder that already knows the domain, the configuration that beat fine-tuned
dense recall in `bench/quality.py` (nDCG@10 0.8131 vs 0.7881). With a Qwen3 embedder (a
decoder) there is no encoder to start from, and the yes/no objective is kept.
"""

from dataclasses import dataclass

from twostage.retrieval.deployments.registry import DeploymentRecord
from twostage.retrieval.models.cache import ModelCache
from twostage.retrieval.models.loading import detect_embedder_family
from twostage.retrieval.models.source import resolve_model
from twostage.retrieval.search.trust import judge_reranker
from twostage.training.settings import TrainingSettings

FROM_EMBEDDER = "cross-encoder from the embedder"


@dataclass(frozen=True)
class RerankerStart:
    """`base` is a model name, or None: the embedder the run ends up with (trained or deployed)."""

    base: str | None
    family: str  # "auto" (the base model's own family) or "cross-encoder"
    why: str


def reranker_start(
    settings: TrainingSettings, deployed: DeploymentRecord | None, reranker_base: str, models: ModelCache
) -> RerankerStart:
    """Train `reranker_base` as it is, unless it is an untrusted reranker beside an encoder embedder."""
    embedder = deployed.embedder if deployed else settings.embedder.model
    reranker = deployed.reranker if deployed else settings.reranker.model
    trust = judge_reranker(models.pair(embedder, reranker)[1], deployed.metrics if deployed else None)
    if trust.trusted:
        return RerankerStart(reranker_base, "auto", f"fine-tune {reranker_base} ({trust.why})")
    source = resolve_model(embedder, cache_dir=settings.cache_dir)
    if settings.reranker.family != "auto" or detect_embedder_family(source) == "last-token":
        return RerankerStart(
            reranker_base, "auto", f"fine-tune {reranker_base}, its own objective ({trust.why}; no encoder "
            "embedder to start a cross-encoder from)",
        )  # fmt: skip
    return RerankerStart(
        None, "cross-encoder", f"{FROM_EMBEDDER}'s encoder, not {reranker_base} ({trust.why})"
    )
