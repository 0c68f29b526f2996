"""Shared fixtures: tiny Qwen3 models written once per session, and settings pointing at them."""

import os
from collections.abc import Iterator
from pathlib import Path

import hermetic  # first: the environment, before any library reads it
import pytest
from helpers import Served, model_server_settings, serve
from postgres import PostgresServer, remove, start_postgres

from twostage.api.settings import Settings
from twostage.retrieval.models.embedder import Embedder
from twostage.retrieval.models.loading import load_embedder
from twostage.retrieval.models.tiny import TinyModelPaths, write_tiny_models

# the files that take longest (minutes each), started first: under `--dist loadfile` a file runs on
# one worker, and one started last keeps the others idle while it finishes
LONGEST_FIRST = ("test_retrain.py", "test_quickstart.py", "test_training_end_to_end.py", "test_evaluation.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    names = {name: rank for rank, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: names.get(item.path.name, len(names)))  # stable: the rest keep their order


@pytest.fixture(scope="session", autouse=True)
def in_a_fresh_directory() -> Iterator[None]:
    """Every test runs in `hermetic.HOME`: relative defaults (`.twostage/...`) never reach the checkout."""
    previous = os.getcwd()
    os.chdir(hermetic.HOME)
    yield
    os.chdir(previous)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModelPaths:
    return write_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Converted models and fingerprints; shared so SmolLM2 is converted from GGUF once per run."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def tiny_settings(tiny_models: TinyModelPaths, model_cache: Path) -> Settings:
    return Settings(
        embedder={"model": str(tiny_models.embedder)},
        reranker={"model": str(tiny_models.reranker)},
        cache_dir=model_cache,
        device="cpu",
    )


@pytest.fixture(scope="session")
def minilm_settings(model_cache: Path) -> Settings:
    """The real all-MiniLM-L6-v2 (from PyPI) as the embedder; windows of 128 Qwen3 tokens."""
    return Settings(
        embedder={"model": "pypi:all-MiniLM-L6-v2"},
        chunker={"tokens": 128, "overlap": 16},
        cache_dir=model_cache,
        device="cpu",
    )


@pytest.fixture(scope="session")
def minilm_embedder(minilm_settings: Settings) -> Embedder:
    return load_embedder(minilm_settings)


@pytest.fixture(scope="session")
def cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    """MiniLM with a new one-logit head, saved as a CrossEncoder."""
    import torch
    from sentence_transformers import CrossEncoder

    from twostage.retrieval.models.source import resolve_model

    base = resolve_model("pypi:all-MiniLM-L6-v2", cache_dir=model_cache).path
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ce") / "ce"
    CrossEncoder(str(base), num_labels=1, device="cpu").save(str(out))
    return out


@pytest.fixture(scope="session")
def model_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModelPaths, model_cache: Path
) -> Iterator[Served]:
    """A second twostage serving the tiny Qwen3 pair: the model server of the remote backends."""
    yield from serve(model_server_settings(tmp_path_factory.mktemp("model-server"), tiny_models, model_cache))


@pytest.fixture(scope="session")
def postgres() -> Iterator["PostgresServer"]:
    """One PostgreSQL server per test process (`tests/postgres.py`)."""
    server = start_postgres()
    yield server
    remove(server)


@pytest.fixture()
def postgres_url(postgres: "PostgresServer") -> str:
    """A fresh database on the test process's PostgreSQL server."""
    return postgres.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """`feedback.database_url` for each engine the log runs on: None (SQLite in the data
    directory, the default) and a fresh PostgreSQL database."""
    return None if request.param == "sqlite" else str(request.getfixturevalue("postgres_url"))
