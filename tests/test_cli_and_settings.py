"""The console script and the settings tree."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from retrieval.settings import Settings
from retrieval.tiny_models import QWEN3_TOKENIZER_JSON_SHA256


def test_models_tiny_command_writes_loadable_models(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "api.cli", "models", "tiny", "--out", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    reranker_dir = tmp_path / "m" / "qwen3-reranker-tiny"
    assert f"reranker: {reranker_dir}" in done.stdout
    assert (
        hashlib.sha256((reranker_dir / "tokenizer.json").read_bytes()).hexdigest()
        == QWEN3_TOKENIZER_JSON_SHA256
    )
    assert (tmp_path / "m" / "qwen3-embedding-tiny" / "model.safetensors").exists()


def test_cli_usage_error_exits_2() -> None:
    done = subprocess.run([sys.executable, "-m", "api.cli", "models"], capture_output=True, text=True)
    assert done.returncode == 2 and "usage:" in done.stderr


def test_defaults_name_the_real_qwen3_models() -> None:
    s = Settings(_env_file=None)
    assert s.embedder.model == "Qwen/Qwen3-Embedding-0.6B"
    assert s.reranker.model == "Qwen/Qwen3-Reranker-0.6B"
    assert (s.device, s.dtype, s.embedder.max_length) == ("auto", "auto", 8192)


def test_nested_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWOSTAGE_RERANKER__MODEL", "/models/r")
    monkeypatch.setenv("TWOSTAGE_EMBEDDER__DIM", "256")
    monkeypatch.setenv("TWOSTAGE_DEVICE", "cpu")
    s = Settings()
    assert (s.reranker.model, s.embedder.dim, s.device) == ("/models/r", 256, "cpu")


def test_auto_device_and_dtype_on_this_machine() -> None:
    import torch

    from retrieval.devices import resolve_device, resolve_dtype

    device = resolve_device("auto")
    expected = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    assert resolve_dtype("auto", device) == expected
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
