"""One real `twostage retrain` on debian-ir with the offline real models, end to end.

What a user does, through the CLI in subprocesses: ingest a corpus into the embedded store with
all-MiniLM-L6-v2 (reranker SmolLM2-135M-Instruct on the Qwen3 yes/no objective), then
`twostage retrain --pairs --dev`: mine against the live index, LoRA-fine-tune both models,
evaluate deployed vs candidate, gate, reindex every chunk into a new collection version,
verify end to end, switch. The corpus is the training pairs' own packages (so every pair is
about an indexed document), the dev packages, and corpus.jsonl documents as distractors,
subsampled to fit the 2-core CPU (sizes are flags and appear in the JSON). TWOSTAGE_* settings
in the environment pass through (the retrain ones are echoed in the JSON).
Last line: one JSON object with the decision, the gate's reasons, deployed/candidate metrics,
each step's seconds and wall_s.

    python bench/retrain.py                                   # ~20 min on 2 cores
    python bench/retrain.py --pairs 64 --dev 16 --distractors 200   # smoke
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DATA, EMBEDDER, REPO, RERANKER, read_jsonl, run_info, write_jsonl


def _twostage(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run the CLI, relaying its progress lines to stderr; (result, seconds)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "twostage.api.cli", *args], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None and proc.stdout is not None
    err = []
    for line in proc.stderr:
        err.append(line)
        print(line, end="", file=sys.stderr)
    out = proc.stdout.read()
    proc.wait()
    seconds = time.perf_counter() - started
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "".join(err)), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=600, help="training pairs given to retrain")
    parser.add_argument("--dev", type=int, default=100, help="held-out dev pairs given to retrain")
    parser.add_argument("--distractors", type=int, default=3000, help="corpus.jsonl documents indexed")
    parser.add_argument("--work-dir", help="keep the data dir here (default: a temporary one)")
    parser.add_argument("--cache-dir", default=str(REPO / ".twostage" / "cache"))
    args = parser.parse_args()

    train = read_jsonl(DATA / "train.jsonl", args.pairs)
    dev = read_jsonl(DATA / "dev.jsonl", args.dev)
    distractors = read_jsonl(DATA / "corpus.jsonl", args.distractors)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        corpus = [{"id": r["package"], "text": r["positive"]} for r in train + dev]
        corpus += [{"id": r["_id"], "text": r["text"]} for r in distractors]
        write_jsonl(work / "corpus.jsonl", corpus)
        write_jsonl(work / "pairs.jsonl", [{"query": r["query"], "positive": r["positive"]} for r in train])
        write_jsonl(work / "dev.jsonl", [{"query": r["query"], "positive": r["positive"]} for r in dev])
        env = {
            **os.environ, "TWOSTAGE_DATA_DIR": str(work / "data"), "TWOSTAGE_CACHE_DIR": args.cache_dir,
            "TWOSTAGE_EMBEDDER__MODEL": EMBEDDER, "TWOSTAGE_RERANKER__MODEL": RERANKER,
        }  # fmt: skip
        started = time.perf_counter()
        ingest, ingest_s = _twostage(["ingest", str(work / "corpus.jsonl"), "--quiet"], env)
        if ingest.returncode != 0:
            sys.exit(f"ingest failed ({ingest.returncode})")
        retrain, retrain_s = _twostage(
            ["retrain", "--pairs", str(work / "pairs.jsonl"), "--dev", str(work / "dev.jsonl"), "--json"], env
        )
        if retrain.returncode != 0 or not retrain.stdout.strip():
            sys.exit(f"retrain failed ({retrain.returncode})")
        run = json.loads(retrain.stdout)
        versions, _ = _twostage(["versions", "--json"], env)
    print(json.dumps({
        "bench": "retrain", "embedder": EMBEDDER, "reranker": RERANKER,
        "decision": run["decision"], "gate": run.get("gate"), "metrics": run.get("metrics"),
        "end_to_end": run["steps"].get("verify", {}).get("end_to_end"), "run_sizes": run.get("sizes"),
        "steps_s": {name: step.get("seconds") for name, step in run["steps"].items()},
        "deployments": json.loads(versions.stdout) if versions.returncode == 0 else None,
        "sizes": {"pairs": len(train), "dev": len(dev), "documents": len(corpus)},
        "retrain_settings": {k: v for k, v in os.environ.items() if k.startswith("TWOSTAGE_RETRAIN__")},
        "ingest_s": round(ingest_s, 1), "retrain_s": round(retrain_s, 1),
        "wall_s": round(time.perf_counter() - started, 1), **run_info("cpu"),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
