"""`twostage train embedder` on the tiny Qwen3 embedder: LoRA trains, merges, and inference
loads the merged model with the same semantics (prompt, last token, norm)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import debian_rows

from twostage.api.settings import Settings
from twostage.retrieval.models.loading import load_embedder
from twostage.retrieval.models.tiny import TinyModelPaths
from twostage.training.st_model import load_st_embedder


def test_lora_training_merges_into_a_model_inference_serves(
    tmp_path: Path, tiny_models: TinyModelPaths, model_cache: Path
) -> None:
    rows = debian_rows("train.jsonl", 96)
    train = tmp_path / "train.jsonl"
    train.write_text(
        "".join(json.dumps({"query": r["query"], "positive": r["positive"]}) + "\n" for r in rows)
    )
    out = tmp_path / "run"
    env = {
        **os.environ,
        "TWOSTAGE_EMBEDDER__MODEL": str(tiny_models.embedder),
        "TWOSTAGE_CACHE_DIR": str(model_cache),
        "TWOSTAGE_DEVICE": "cpu",
    }
    command = [sys.executable, "-m", "twostage.api.cli", "train", "embedder", "--train", str(train), "--out", str(out),
               "--epochs", "2", "--batch-size", "16", "--eval-steps", "4", "--lr", "0.005", "--dev-fraction", "0.2"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    metric = report["primary_metric"]
    assert metric == "dev_cosine_ndcg@10" and report["steps"] > 0
    assert abs(report["merged"][metric] - report["best"][metric]) < 1e-4  # the merge kept the trained weights
    assert "base" in result.stdout and "merged, reloaded" in result.stdout
    assert list((out / "checkpoints").glob("checkpoint-*"))  # resumable

    settings = Settings(embedder={"model": str(out / "model")}, cache_dir=model_cache, device="cpu")
    served = load_embedder(settings)  # the inference path, on the merged directory
    trained = load_st_embedder(out / "model", settings)
    base = load_embedder(
        Settings(embedder={"model": str(tiny_models.embedder)}, cache_dir=model_cache, device="cpu")
    )
    queries = ["parser generator for Clojure", "ZooKeeper client"]
    np.testing.assert_allclose(
        served.embed_queries(queries),
        trained.encode(queries, prompt_name="query", convert_to_numpy=True),
        atol=1e-5,
    )
    assert not np.allclose(served.embed_queries(queries), base.embed_queries(queries), atol=1e-3)


def test_masking_false_negatives_is_mnrl_without_the_in_batch_duplicates(minilm_settings: Settings) -> None:
    """With nothing to mask the GIST loss is MNRL's; an in-batch negative that is really another
    right answer (here: the same passage) is left out instead of pushed away."""
    import torch

    from twostage.retrieval.models.source import resolve_model
    from twostage.training.embedder_training import EmbedderTrainSettings, contrastive_loss

    model = load_st_embedder(resolve_model("pypi:all-MiniLM-L6-v2", cache_dir=minilm_settings.cache_dir).path,
                             minilm_settings)  # fmt: skip
    plain = contrastive_loss(model, EmbedderTrainSettings())
    masked = contrastive_loss(
        model, EmbedderTrainSettings(mask_false_negatives=True, false_negative_margin=0.05)
    )

    def loss(fn, anchors: list[str], positives: list[str]) -> float:
        with torch.no_grad():
            return float(fn([model.tokenize(anchors), model.tokenize(positives)], None))

    anchors = ["play chess against the computer", "edit text files in a terminal", "rip audio CDs"]
    distinct = ["a chess engine with a graphical board", "a small console text editor", "a CD ripper"]
    assert loss(masked, anchors, distinct) == pytest.approx(loss(plain, anchors, distinct), abs=1e-5)
    same_answer = ["play chess against the computer", "a strong chess opponent", "rip audio CDs"]
    shared = ["a chess engine with a graphical board", "a chess engine with a graphical board", "a CD ripper"]
    assert loss(masked, same_answer, shared) < loss(plain, same_answer, shared) - 0.2
