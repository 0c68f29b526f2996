"""The console script and the settings tree."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import debian_rows, free_port, run_cli, write_jsonl

from twostage.api.settings import Settings
from twostage.retrieval.models.tiny import QWEN3_TOKENIZER_JSON_SHA256, TinyModelPaths


def test_models_tiny_command_writes_loadable_models(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "twostage.api.cli", "models", "tiny", "--out", str(tmp_path / "m")],
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
    done = subprocess.run(
        [sys.executable, "-m", "twostage.api.cli", "models"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "usage:" in done.stderr


def test_defaults_name_the_real_qwen3_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TWOSTAGE_DTYPE", raising=False)  # conftest pins float32 for parity tests
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
    assert (s.search.rerank_k, s.reranker.fusion) == (5, "rrf")  # the measured defaults (README)
    monkeypatch.setenv("TWOSTAGE_SEARCH__RERANK_K", "null")  # rerank all of top_k
    monkeypatch.setenv("TWOSTAGE_RERANKER__FUSION", "none")
    assert (Settings().search.rerank_k, Settings().reranker.fusion) == (None, "none")


def test_auto_device_on_this_machine() -> None:
    import torch

    from twostage.retrieval.models.devices import resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_settings_saved_by_quickstart_apply_below_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TWOSTAGE_DATA_DIR", str(tmp_path))
    (tmp_path / "settings.env").write_text(
        # the name before the search section had its own place: a saved file keeps counting
        "TWOSTAGE_EMBEDDER__MODEL=pypi:all-MiniLM-L6-v2\nTWOSTAGE_API__RERANK=false\n"
    )
    saved = Settings()
    assert (saved.embedder.model, saved.search.rerank, saved.reranker.model) == (
        "pypi:all-MiniLM-L6-v2", False, "Qwen/Qwen3-Reranker-0.6B",
    )  # fmt: skip
    monkeypatch.setenv("TWOSTAGE_EMBEDDER__MODEL", "/models/e")
    assert Settings().embedder.model == "/models/e"


def test_a_library_error_in_training_is_one_line_and_exit_2(tmp_path: Path, tiny_models) -> None:
    """A model whose weights are corrupt fails inside transformers; the user sees one line."""
    import os
    import shutil

    broken = tmp_path / "broken-embedder"
    shutil.copytree(tiny_models.embedder, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(f'{{"query": "q{i}", "positive": "p{i}"}}\n' for i in range(40)))
    env = {**os.environ, "TWOSTAGE_EMBEDDER__MODEL": str(broken), "TWOSTAGE_DEVICE": "cpu",
           "TWOSTAGE_CACHE_DIR": str(tmp_path / "cache")}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "twostage.api.cli", "train", "embedder", "--train", str(pairs),
         "--out", str(tmp_path / "run"), "--batch-size", "8"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    (error,) = [ln for ln in done.stderr.splitlines() if ln.startswith("twostage: error:")]
    assert error.startswith("twostage: error: train failed: ") and "(traceback in " in error
    saved = Path(error.rsplit("(traceback in ", 1)[1].rstrip(")"))
    assert "Traceback" in saved.read_text()
    saved.unlink()


def test_installed_as_one_namespace(tmp_path: Path) -> None:
    """Nothing named api, training or retrieval is installed; the code imports as twostage.*.
    Probed from an empty directory, so the checkout (and its build metadata) is not on the path."""
    probe = (
        "import importlib.util as u, json; from importlib.metadata import distribution as d; t = d('twostage'); "
        "print(json.dumps([t.read_text('top_level.txt').split(), sorted({str(f).split('/')[0] for f in t.files}), "
        "[u.find_spec(n) is None for n in ('api', 'training', 'retrieval')]]))"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    top_level, installed, missing = json.loads(done.stdout)
    assert top_level == ["twostage"] and missing == [True, True, True]
    assert not set(installed) & {"api", "training", "retrieval"}, installed
    done = subprocess.run([sys.executable, "-m", "twostage.api.cli", "--help"], cwd=tmp_path,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0 and "quickstart" in done.stdout and "search" in done.stdout


def test_the_lock_check_fails_when_pyproject_changes(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    (tmp_path / ".ci").mkdir()
    for name in ("pyproject.toml", "constraints.txt", ".ci/check_lock.py"):
        (tmp_path / name).write_text((root / name).read_text())

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(tmp_path / ".ci" / "check_lock.py")],
                              capture_output=True, text=True)  # fmt: skip

    assert check().returncode == 0, check().stderr
    pyproject = (tmp_path / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(pyproject.replace('"peft>=', '"requests>=2", "peft>='))
    stale = check()
    assert stale.returncode == 1 and "out of date with pyproject.toml: run .ci/lock" in stale.stderr
    # a range the pinned version falls outside, with the hash brought up to date by hand
    sys.path.insert(0, str(tmp_path / ".ci"))
    try:
        import check_lock
    finally:
        sys.path.pop(0)
    (tmp_path / "pyproject.toml").write_text(pyproject.replace('"peft>=0.15', '"peft>=99'))
    lock = (tmp_path / "constraints.txt").read_text().splitlines()
    header = "# pyproject-dependencies-sha256: "
    lock = [header + check_lock.dependencies_hash(tmp_path / "pyproject.toml") if ln.startswith(header) else ln
            for ln in lock]  # fmt: skip
    (tmp_path / "constraints.txt").write_text("\n".join(lock) + "\n")
    outside = check()
    assert outside.returncode == 1 and "peft==" in outside.stderr and "outside >=99" in outside.stderr


@pytest.mark.parametrize("weights", ["[-1, 1]", "[0, 0]"])
def test_unusable_rrf_weights_are_one_line_naming_the_setting(tmp_path: Path, weights: str) -> None:
    env = {**os.environ, "TWOSTAGE_DATA_DIR": str(tmp_path), "TWOSTAGE_RECALL__RRF_WEIGHTS": weights}
    result = run_cli(["versions"], env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"twostage: error: invalid settings: TWOSTAGE_RECALL: recall.rrf_weights {list(map(float, json.loads(weights)))} "
        "must be non-negative and not all zero"
    ]


def test_search_loads_only_the_models_its_plan_uses(
    tmp_path: Path, tiny_models: TinyModelPaths, model_cache: Path
) -> None:
    """`twostage search` on the embedded store builds no service and loads what its plan runs: with
    rerank=false a reranker that does not even exist is never loaded; asked to rerank, it is one
    line naming it."""
    env = {
        **os.environ, "TWOSTAGE_DATA_DIR": str(tmp_path / "data"), "TWOSTAGE_CACHE_DIR": str(model_cache),
        "TWOSTAGE_DEVICE": "cpu", "TWOSTAGE_EMBEDDER__MODEL": str(tiny_models.embedder),
        "TWOSTAGE_RERANKER__MODEL": str(tmp_path / "no-such-reranker"), "TWOSTAGE_API__PORT": str(free_port()),
    }  # fmt: skip
    corpus = [{"_id": r["_id"], "text": r["text"]} for r in debian_rows("corpus.jsonl", 20)]
    ingested = run_cli(["ingest", str(write_jsonl(tmp_path / "corpus.jsonl", corpus)), "--quiet"], env)
    assert ingested.returncode == 0, ingested.stderr[-2000:]
    plain = run_cli(
        ["search", "a chess engine", "--json", "--top-n", "3"], env | {"TWOSTAGE_SEARCH__RERANK": "false"}
    )
    assert plain.returncode == 0, plain.stderr[-2000:]
    result = json.loads(plain.stdout)
    assert len(result["hits"]) == 3 and result["stages"] == ["embed", "recall"] and result["reranker"] is None
    assert "not reranked: TWOSTAGE_SEARCH__RERANK=false" in result["notes"]
    forced = run_cli(["search", "a chess engine", "--rerank"], env | {"TWOSTAGE_SEARCH__RERANK": "false"})
    assert forced.returncode == 2 and "no-such-reranker" in forced.stderr and "Traceback" not in forced.stderr
    listed = run_cli(
        ["search", "chess", "--filter", '{"source": [1, 2]}'], env | {"TWOSTAGE_SEARCH__RERANK": "false"}
    )
    assert listed.returncode == 2 and "the search is not valid: filter.source" in listed.stderr, (
        listed.stderr[-2000:]
    )


def test_ctrl_c_ends_a_command_whose_main_thread_is_stuck_in_native_code() -> None:
    """SIGINT reaches a command whose main thread cannot run Python (here: blocked on an event, with
    SIGINT masked, so the kernel hands the signal to another thread and the wait is never broken;
    a long forward pass keeps the main thread out of the interpreter the same way). Without the
    watcher the process would wait forever; with it, it ends at once, as the main thread would."""
    script = (
        "import signal, sys, threading\n"
        "from twostage.api.runtime.interrupts import exit_at_once\n"
        "exit_at_once()\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})\n"
        "print('ready', flush=True)\n"
        "threading.Event().wait()\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 130
    finally:
        if process.poll() is None:
            process.kill()
    assert process.stderr is not None and process.stderr.read().strip() == "twostage: interrupted"
