"""Peak memory of the service while a retrain runs inside it (`POST /v1/retrain`).

Starts `twostage serve` (a subprocess) on debian-ir documents ingested first, sends a
retrain of train pairs whose positives are indexed, samples the server's resident memory
(VmRSS, and VmHWM for the peak) until the job ends, and reports the peak over the serving
baseline, and the most models the service's model cache held at once (`/metrics`
`twostage_models_resident`: inference copies; a training step's own copy is working memory).
`--code DIR` runs the server from another checkout of this repository (for a
before/after comparison from one script). Last line: one JSON object.

    python bench/retrain_memory.py                                   # tiny Qwen3 pair
    python bench/retrain_memory.py --embedder pypi:all-MiniLM-L6-v2 --reranker pypi:SmolLM2-135M-Instruct \
        --env TWOSTAGE_RERANKER__FAMILY=yes-no       # real models, the same yes/no training before and after
    git worktree add /tmp/before HEAD~1 && python bench/retrain_memory.py --code /tmp/before
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DATA, read_jsonl, run_info
from bench.search_load import free_port, start_server


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            name, value = line.split(":")
            out[name] = int(value.split()[0])
    return out


def models_resident(url: str) -> int | None:
    """Embedders + rerankers loaded in the service's model cache (`/metrics`), None without one."""
    try:
        text = httpx.get(url + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    counts = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("twostage_models_resident{")]  # fmt: skip
    return int(sum(counts)) if counts else None


def code_path(checkout: Path, scratch: Path) -> str:
    """A PYTHONPATH entry under which `twostage` is the given checkout's code: that checkout installed
    from its own build files into a folder of its own (no dependencies: they are this environment's)."""
    target = scratch / "code"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(checkout.resolve())], check=True)  # fmt: skip
    return str(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedder", default="tiny")
    parser.add_argument("--reranker", default="tiny")
    parser.add_argument("--pairs", type=int, default=120)
    parser.add_argument("--distractors", type=int, default=300)
    parser.add_argument("--code", help="run the server from this checkout instead of the installed one")
    parser.add_argument("--cache-dir", default=".twostage/cache")
    parser.add_argument(
        "--env", action="append", default=[], metavar="TWOSTAGE_X=VALUE",
        help="a setting for the ingest and the server (repeatable), e.g. TWOSTAGE_RERANKER__FAMILY=yes-no",
    )  # fmt: skip
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.env)

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        embedder, reranker = args.embedder, args.reranker
        if "tiny" in (embedder, reranker):
            from twostage.retrieval.models.tiny import write_tiny_models

            tiny = write_tiny_models(base / "tiny")
            embedder = str(tiny.embedder) if embedder == "tiny" else embedder
            reranker = str(tiny.reranker) if reranker == "tiny" else reranker
        train = read_jsonl(DATA / "train.jsonl", args.pairs)
        docs = [{"_id": r["package"], "text": r["positive"]} for r in train]
        docs += [
            {"_id": r["_id"], "text": r["text"]} for r in read_jsonl(DATA / "corpus.jsonl", args.distractors)
        ]
        (base / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TWOSTAGE_")},
            "TWOSTAGE_DATA_DIR": str(base / "data"),
            "TWOSTAGE_CACHE_DIR": str(Path(args.cache_dir).resolve()),
            "TWOSTAGE_EMBEDDER__MODEL": embedder, "TWOSTAGE_RERANKER__MODEL": reranker,
            "TWOSTAGE_API__API_KEYS": '["bench"]', "TWOSTAGE_API__PORT": str(free_port()),
            "TWOSTAGE_RETRAIN__EMBEDDER_EPOCHS": "1", "TWOSTAGE_RETRAIN__RERANKER_EPOCHS": "1",
            "TWOSTAGE_RETRAIN__NEGATIVES": "1", "TWOSTAGE_RETRAIN__EMBEDDER_BATCH_SIZE": "16",
            "TWOSTAGE_RETRAIN__MIN_GAIN": "0", "TWOSTAGE_RETRAIN__TOLERANCE": "1", "HF_HUB_OFFLINE": "1",
            **extra,
        }  # fmt: skip
        if args.code:
            env["PYTHONPATH"] = code_path(Path(args.code), base)
        subprocess.run(
            [sys.executable, "-m", "twostage.api.cli", "ingest", str(base / "corpus.jsonl"), "--quiet"],
            env=env, check=True,
        )  # fmt: skip
        server, url = start_server(env, base / "server.log")
        samples: list[int] = []
        resident: list[int] = []  # models in the service's model cache (a checkout with one reports it)
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.2):
                samples.append(memory_kb(server.pid)["VmRSS"])
                if (count := models_resident(url)) is not None:
                    resident.append(count)

        try:
            idle = memory_kb(server.pid)
            pairs = [{"query": r["query"], "positive": r["positive"]} for r in train]
            key = {"Authorization": "Bearer bench"}
            job = httpx.post(url + "/v1/retrain", json={"pairs": pairs}, headers=key, timeout=120).json()
            watcher = threading.Thread(target=sample, daemon=True)
            watcher.start()
            started = time.perf_counter()
            while (state := httpx.get(f"{url}/v1/jobs/{job['job_id']}", headers=key).json())["status"] in {
                "queued", "running",
            }:  # fmt: skip
                time.sleep(1)
            time.sleep(5)  # the service follows the switch and drops the old pair
            after = memory_kb(server.pid)
            stop.set()
            report = state.get("report") or {}
            result: dict[str, Any] = {
                "bench": "retrain_memory", "code": args.code or "installed", "embedder": embedder,
                "reranker": reranker, "settings": extra, "pairs": args.pairs, "status": state["status"],
                "decision": report.get("decision"),
                "error": state.get("error"), "retrain_s": round(time.perf_counter() - started, 1),
                "serving_rss_mb": round(idle["VmRSS"] / 1024, 1),
                "peak_rss_mb": round(max([*samples, after["VmHWM"]]) / 1024, 1),
                "peak_over_serving_mb": round((after["VmHWM"] - idle["VmRSS"]) / 1024, 1),
                "rss_after_switch_mb": round(after["VmRSS"] / 1024, 1),
                "models_resident": {"serving": resident[0], "max": max(resident), "after": resident[-1]}
                if resident else None,
            }  # fmt: skip
        finally:
            server.terminate()
            server.wait(timeout=120)
    print(json.dumps({**result, **run_info("cpu")}))


if __name__ == "__main__":
    main()
