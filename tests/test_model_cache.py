"""The model cache: one load per model however many callers ask at once; dropped entries go."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from twostage.api.settings import Settings
from twostage.retrieval.core.errors import ModelLoadError
from twostage.retrieval.models.cache import ModelCache, pair_keys


def test_concurrent_callers_share_one_load_and_released_models_are_loaded_again(
    tiny_settings: Settings,
) -> None:
    cache = ModelCache(tiny_settings)
    name = tiny_settings.embedder.model
    with ThreadPoolExecutor(4) as pool:
        loaded = list(pool.map(lambda _: cache.embedder(name), range(4)))
    assert all(model is loaded[0] for model in loaded)
    assert cache.loaded() == {("embedder", name)}
    pair = cache.pair(name, tiny_settings.reranker.model)
    assert pair[0] is loaded[0] and cache.loaded() == pair_keys([(name, tiny_settings.reranker.model)])
    cache.keep_only({("reranker", tiny_settings.reranker.model)})
    assert cache.loaded() == {("reranker", tiny_settings.reranker.model)}
    assert cache.embedder(name) is not loaded[0]  # dropped, so loaded anew


def test_a_failed_load_is_not_cached(tiny_settings: Settings) -> None:
    cache = ModelCache(tiny_settings)
    for _ in range(2):  # the second call tries again rather than replaying a stored failure forever
        with pytest.raises(ModelLoadError, match="not found"):
            cache.reranker("/nonexistent/reranker")
    assert cache.loaded() == set()
