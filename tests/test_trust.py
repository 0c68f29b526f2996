"""Which rerankers `rerank: "auto"` applies (retrieval.trust), with real tiny models."""

from pathlib import Path

import pytest

from twostage.api.settings import Settings
from twostage.retrieval.models.cache import ModelCache
from twostage.retrieval.models.loading import load_reranker
from twostage.retrieval.models.reranker import Reranker
from twostage.retrieval.search.trust import judge_reranker
from twostage.training.reranker_choice import reranker_start


@pytest.fixture(scope="module")
def tiny_reranker(tiny_settings: Settings) -> Reranker:
    return load_reranker(tiny_settings)


def test_a_measurement_decides_when_there_is_one(tiny_reranker: Reranker) -> None:
    worse = {"dense": {"nDCG@10": 0.89}, "two-stage": {"nDCG@10": 0.48}}
    verdict = judge_reranker(tiny_reranker, worse)
    assert not verdict.trusted and "did not beat dense" in verdict.why and "0.4800 vs 0.8900" in verdict.why
    better = {"hybrid": {"nDCG@10": 0.80}, "hybrid+rerank": {"nDCG@10": 0.85}, "two-stage": {"nDCG@10": 0.7}}
    verdict = judge_reranker(tiny_reranker, better)
    assert verdict.trusted and "hybrid" in verdict.why  # the served first stage is compared first


def test_without_a_measurement_a_published_reranker_is_trusted_and_a_chat_model_is_not(
    tiny_settings: Settings, tiny_reranker: Reranker, tmp_path: Path
) -> None:
    assert "qwen3-reranker" in tiny_reranker.model_id  # the tiny stand-in's directory name
    assert judge_reranker(tiny_reranker).trusted and judge_reranker(tiny_reranker, {}).trusted
    chat = tmp_path / "SmolLM2-135M-Instruct"
    chat.symlink_to(Path(tiny_settings.reranker.model), target_is_directory=True)
    as_chat = tiny_settings.model_copy(deep=True)
    as_chat.reranker.model = str(chat)
    verdict = judge_reranker(load_reranker(as_chat))
    assert not verdict.trusted and "not trained to rank" in verdict.why
    assert not judge_reranker(None).trusted


def test_retrain_trains_a_cross_encoder_from_the_embedder_when_the_reranker_is_not_trusted(
    tiny_settings: Settings, minilm_settings: Settings, tmp_path: Path
) -> None:
    chat = tmp_path / "SmolLM2-135M-Instruct"
    chat.symlink_to(Path(tiny_settings.reranker.model), target_is_directory=True)
    published = tiny_settings.reranker.model

    def start(embedder: str, reranker: str):
        settings = minilm_settings.model_copy(deep=True)
        settings.embedder.model, settings.reranker.model = embedder, reranker
        return reranker_start(settings, None, reranker, ModelCache(settings))

    kept = start("pypi:all-MiniLM-L6-v2", published)
    assert (kept.base, kept.family) == (published, "auto") and "published as a reranker" in kept.why
    replaced = start("pypi:all-MiniLM-L6-v2", str(chat))
    assert (replaced.base, replaced.family) == (None, "cross-encoder")
    assert (
        "cross-encoder from the embedder's encoder" in replaced.why and "not trained to rank" in replaced.why
    )
    qwen3 = start(tiny_settings.embedder.model, str(chat))  # a decoder embedder: nothing to start from
    assert (qwen3.base, qwen3.family) == (str(chat), "auto") and "its own objective" in qwen3.why
