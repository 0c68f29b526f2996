"""The training commands chained as a user runs them, an interrupted run resumed, memory checked
before training, and the CrossEncoderTrainer path for sequence-classification rerankers."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import DEBIAN_IR

from twostage.api.settings import Settings
from twostage.retrieval.core.errors import InputError
from twostage.retrieval.models.loading import load_reranker
from twostage.retrieval.models.source import resolve_model
from twostage.retrieval.models.tiny import TinyModelPaths

DATA = DEBIAN_IR


def _rows(name: str, n: int, skip: int = 0) -> list[dict[str, Any]]:
    with (DATA / name).open() as handle:
        lines = [next(handle) for _ in range(skip + n)]
    return [json.loads(line) for line in lines[skip:]]


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "twostage.api.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _env(tiny_models: TinyModelPaths, model_cache: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ, "TWOSTAGE_CACHE_DIR": str(model_cache), "TWOSTAGE_DEVICE": "cpu",
        "TWOSTAGE_EMBEDDER__MODEL": str(tiny_models.embedder), "TWOSTAGE_RERANKER__MODEL": str(tiny_models.reranker),
        **extra,
    }  # fmt: skip


def test_mine_train_both_merge_evaluate(
    tmp_path: Path, tiny_models: TinyModelPaths, model_cache: Path
) -> None:
    train = _rows("train.jsonl", 64)
    pairs = _write(
        tmp_path / "pairs.jsonl", [{"query": r["query"], "positive": r["positive"]} for r in train]
    )
    corpus = _write(
        tmp_path / "corpus.jsonl", [{"id": r["_id"], "text": r["text"]} for r in _rows("corpus.jsonl", 300)]
    )
    dev = _write(
        tmp_path / "dev.jsonl",
        [{"query": r["query"], "positive": r["positive"]} for r in _rows("dev.jsonl", 20)],
    )
    env = _env(tiny_models, model_cache)
    mined = tmp_path / "mined.jsonl"
    _run(["mine", "--pairs", str(pairs), "--corpus", str(corpus), "--out", str(mined), "--negatives", "2",
          "--range-min", "0", "--keep-all"], env)  # fmt: skip
    assert sum(1 for _ in mined.open()) == 64 and (tmp_path / "mined.settings.json").exists()
    common = ["--train", str(mined), "--epochs", "1", "--batch-size", "8", "--eval-steps", "3"]
    _run(["train", "embedder", *common, "--out", str(tmp_path / "emb")], env)  # LoRA by default
    _run(["train", "reranker", *common, "--out", str(tmp_path / "rr"), "--max-length", "256"], env)
    for run in ("emb", "rr"):
        report = json.loads((tmp_path / run / "report.json").read_text())
        assert Path(report["model_dir"]).is_dir() and report["steps"] > 0
    out = tmp_path / "eval"
    result = _run(["evaluate", "--pairs", str(dev), "--distractors", str(corpus), "--top-k", "20",
                   "--candidate-embedder", str(tmp_path / "emb" / "model"),
                   "--candidate-reranker", str(tmp_path / "rr" / "model"), "--out", str(out)], env)  # fmt: skip
    assert "candidate" in result.stdout and "two-stage" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.png").stat().st_size > 0 and report["queries"] == 20
    values = [v for system in report["results"].values() for mode in system.values() for v in mode.values()]
    assert (
        set(report["results"]) == {"base", "candidate"} and len(values) == 2 * 6 * 5
    )  # 3 recalls, each reranked
    assert all(math.isfinite(v) and 0 <= v <= 1 for v in values)


def test_an_interrupted_run_resumes_from_its_last_checkpoint(
    tmp_path: Path, tiny_models: TinyModelPaths, model_cache: Path
) -> None:
    rows = _rows("train.jsonl", 60)
    records = [{"query": r["query"], "positive": r["positive"], "negatives": [rows[(i + 7) % 60]["positive"]]}
               for i, r in enumerate(rows)]  # fmt: skip
    train, dev = _write(tmp_path / "t.jsonl", records[:50]), _write(tmp_path / "d.jsonl", records[50:])
    out = tmp_path / "run"
    args = ["train", "reranker", "--train", str(train), "--dev", str(dev), "--out", str(out), "--epochs", "4",
            "--batch-size", "4", "--eval-steps", "5", "--max-length", "256", "--patience", "100"]  # fmt: skip
    env = _env(tiny_models, model_cache)
    process = subprocess.Popen([sys.executable, "-m", "twostage.api.cli", *args], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while not list(out.glob("checkpoints/checkpoint-*/trainer_state.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "training finished before it could be interrupted"
    assert not (out / "report.json").exists()
    done = sorted(
        int(p.parent.name.split("-")[1]) for p in out.glob("checkpoints/checkpoint-*/trainer_state.json")
    )

    _run(args, env)
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_from"] is not None
    assert int(report["resumed_from"].rsplit("-", 1)[1]) >= done[-1]
    assert report["steps"] == 4 * math.ceil(100 / 4)  # all steps of all epochs, not restarted
    assert report["best_dev_loss"] <= report["base_dev_loss"]


def test_impossible_batch_is_refused_before_training(tmp_path: Path, tiny_models: TinyModelPaths) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from twostage.training.data import Pair
    from twostage.training.reranker_training import RerankerTrainSettings, train_reranker

    long_doc = " ".join(["package"] * 6000)
    pairs = [Pair(f"query {i}", long_doc + f" {i}", (long_doc + f" other {i}",)) for i in range(300)]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models.reranker))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models.reranker))
    with pytest.raises(
        InputError, match=r"needs about [\d.]+ GiB, but cpu has [\d.]+ GiB free: lower --batch-size"
    ):
        train_reranker(model, tokenizer, pairs, pairs[:4], tmp_path / "run", RerankerTrainSettings(batch_size=512),
                       instruction="i", max_length=8192)  # fmt: skip
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cross_encoder_reranker_trains_with_cross_encoder_trainer(tmp_path: Path, model_cache: Path) -> None:
    """A seq-cls model (MiniLM with a new one-logit head) goes through CrossEncoderTrainer, and the
    served reranker (`load_reranker`) gives exactly the trained model's scores."""
    from sentence_transformers.cross_encoder import CrossEncoder

    rows = _rows("train.jsonl", 72)
    records = [{"query": r["query"], "positive": r["positive"], "negatives": [rows[(i + 5) % 72]["positive"]]}
               for i, r in enumerate(rows)]  # fmt: skip
    train, dev = _write(tmp_path / "t.jsonl", records[:60]), _write(tmp_path / "d.jsonl", records[60:])
    base = resolve_model("pypi:all-MiniLM-L6-v2", cache_dir=model_cache).path
    env = {**os.environ, "TWOSTAGE_CACHE_DIR": str(model_cache), "TWOSTAGE_DEVICE": "cpu",
           "TWOSTAGE_RERANKER__MODEL": str(base)}  # fmt: skip
    out = tmp_path / "ce"
    _run(["train", "reranker", "--train", str(train), "--dev", str(dev), "--out", str(out), "--epochs", "2",
          "--batch-size", "8", "--eval-steps", "5", "--lr", "3e-4", "--max-length", "128"], env)  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["family"] == "cross-encoder" and report["best_dev_loss"] < report["base_dev_loss"]
    served = load_reranker(
        Settings(reranker={"model": report["model_dir"]}, cache_dir=model_cache, device="cpu")
    )
    docs = [records[60]["positive"], records[61]["positive"], records[62]["positive"]]
    expected = CrossEncoder(report["model_dir"], device="cpu").predict(
        [(records[60]["query"], d) for d in docs]
    )
    got = served.score(records[60]["query"], docs)
    assert max(abs(float(a) - float(b)) for a, b in zip(got, expected, strict=True)) < 1e-5
