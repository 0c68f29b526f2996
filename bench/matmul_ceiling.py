"""How much faster a numeric path can make a whole reranker on this CPU: Amdahl's bound from the
share of fp32 time spent in the Linear layers' matrix products and how much faster those products
run in bf16 or int8 here.

For each model it (1) profiles fp32 `score` calls (torch.profiler, self CPU time) to find the share
of time in `aten::mm`/`aten::addmm`, (2) times every Linear shape of the model at a batch of
`--tokens` rows in fp32, as `numerics.Bf16Linear` (bf16 weights, input rounded, fp32 out: the
CPU's bf16 path) and through `numerics.quantize_int8` (SmoothQuant-scaled dynamic int8, as the
int8 cross-encoder runs), and (3) prints the bound `1 / (share / r + 1 - share)`, r being the
products' speedup weighted by their fp32 time. Everything outside the products (attention,
norms, activations) is taken as unchanged, which is what the served paths do on this CPU.

    python bench/matmul_ceiling.py --cross-encoder DIR/reranker --causal pypi:SmolLM2-135M-Instruct
    python bench/matmul_ceiling.py --rows 64:2112:64    # the causal model's shapes over row counts

`--rows` instead times each Linear shape of the causal model, in fp32 and as `Bf16Linear`, at each
row count of a range: how fast a product runs depends on how many rows it has, which is why the
yes/no reranker packs its documents into long rows on a CPU (`retrieval/models/packed_attention.py`).

The last line is one JSON object with the figures, the commit, the CPU flags and the versions.
"""

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DATA, read_jsonl, run_info

GEMM_OPS = ("aten::mm", "aten::addmm")


def seconds(call: Callable[[], object], repeats: int) -> float:
    """Median wall time of `call` over `repeats` runs, after one warm-up."""
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def gemm_share(score: Callable[[], object]) -> float:
    """The fraction of the profiled self CPU time spent in matrix products."""
    from torch.profiler import ProfilerActivity, profile

    score()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        score()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS) / total


def shape_rates(model: torch.nn.Module, tokens: int, repeats: int) -> dict[str, object]:
    """Each distinct Linear shape timed in fp32, as Bf16Linear and as int8; the products' speedups
    weighted by each shape's count and fp32 time."""
    from twostage.retrieval.models import numerics

    counts: dict[tuple[int, int], int] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.out_features >= numerics.HEAD_OUTPUTS:
            key = (module.in_features, module.out_features)
            counts[key] = counts.get(key, 0) + 1
    totals = {"fp32": 0.0, "bf16": 0.0, "int8": 0.0}
    shapes = []
    torch.manual_seed(0)
    for (inputs, outputs), count in sorted(counts.items()):
        x = torch.randn(tokens, inputs)
        linear = torch.nn.Linear(inputs, outputs)
        bf16 = numerics.Bf16Linear(linear)
        int8 = torch.nn.Sequential(torch.nn.Linear(inputs, outputs))
        int8.load_state_dict({"0." + k: v for k, v in linear.state_dict().items()})
        numerics.quantize_int8(int8, calibrate=lambda m=int8, x=x: m(x[:64]), int8_down=True)
        row: dict[str, object] = {"in": inputs, "out": outputs, "count": count}
        with torch.inference_mode():
            for name, layer in (("fp32", linear), ("bf16", bf16), ("int8", int8)):
                t = seconds(lambda layer=layer, x=x: layer(x), repeats)
                row[f"{name}_gflops"] = round(2 * tokens * inputs * outputs / t / 1e9, 1)
                totals[name] += count * t
        shapes.append(row)
    speedups = {name: round(totals["fp32"] / totals[name], 3) for name in ("bf16", "int8")}
    return {"shapes": shapes, "gemm_speedup": speedups}


def row_sweep(model: torch.nn.Module, rows: range, repeats: int) -> dict[str, object]:
    """GFLOP/s of each distinct Linear shape of `model`, fp32 and `Bf16Linear`, at each row count."""
    from twostage.retrieval.models import numerics

    shapes = sorted(
        {(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    )
    out: dict[str, object] = {"rows": list(rows)}
    torch.manual_seed(0)
    with torch.inference_mode():
        for inputs, outputs in shapes:
            linear = torch.nn.Linear(inputs, outputs, bias=False)
            for name, layer in (("fp32", linear), ("bf16", numerics.Bf16Linear(linear))):
                rates = []
                for n in rows:
                    x = torch.randn(n, inputs)
                    t = seconds(lambda layer=layer, x=x: layer(x), repeats)
                    rates.append(round(2 * n * inputs * outputs / t / 1e9, 1))
                out[f"{inputs}x{outputs}_{name}_gflops"] = rates
    return out


def bound(share: float, speedup: float) -> float:
    return round(1.0 / (share / speedup + 1.0 - share), 3)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cross-encoder", help="a cross-encoder directory (its int8 path is bounded)")
    parser.add_argument("--causal", default="pypi:SmolLM2-135M-Instruct", help="a yes/no reranker (bf16)")
    parser.add_argument("--queries", type=int, default=10, help="dev queries profiled, 10 documents each")
    parser.add_argument("--tokens", type=int, default=2048, help="rows of each timed product")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cache-dir", default=".twostage/cache")
    parser.add_argument("--rows", help="START:STOP:STEP: time the causal model's shapes over row counts")
    args = parser.parse_args()

    from twostage.api.settings import Settings
    from twostage.retrieval.models.loading import load_reranker

    if args.rows:
        start, stop, step = (int(v) for v in args.rows.split(":"))
        settings = Settings(reranker={"model": args.causal}, dtype="float32", cache_dir=Path(args.cache_dir))
        decoder = load_reranker(settings).model.get_decoder()
        sweep = row_sweep(decoder, range(start, stop, step), args.repeats)
        print(json.dumps({"bench": "matmul_ceiling", "mode": "rows", "model": args.causal, **sweep,
                          **run_info("cpu")}))  # fmt: skip
        return
    dev = read_jsonl(DATA / "dev.jsonl")[: args.queries]
    corpus = [r["text"] for r in read_jsonl(DATA / "corpus.jsonl", 9 * args.queries)]
    calls = [(r["query"], [r["positive"], *corpus[9 * i : 9 * i + 9]]) for i, r in enumerate(dev)]
    models = {"causal": args.causal, "cross_encoder": args.cross_encoder}
    results: dict[str, object] = {}
    for role, model in models.items():
        if model is None:
            continue
        settings = Settings(reranker={"model": model}, dtype="float32", cache_dir=Path(args.cache_dir))
        reranker = load_reranker(settings)
        share = gemm_share(lambda r=reranker: [r.score(q, docs) for q, docs in calls])
        # a yes/no reranker reads its head's two rows, never the vocabulary-wide product
        layers = reranker.model.get_decoder() if role == "causal" else reranker.model  # type: ignore[attr-defined]
        rates = shape_rates(layers, args.tokens, args.repeats)
        path = "bf16" if role == "causal" else "int8"
        speedup = rates["gemm_speedup"][path]  # type: ignore[index]
        results[role] = {
            "model": model, "path": path, "gemm_share_fp32": round(share, 3), **rates,
            "bound_vs_fp32": bound(share, speedup),
        }  # fmt: skip
        print(role, json.dumps(results[role]), file=sys.stderr, flush=True)
    print(json.dumps({"bench": "matmul_ceiling", "tokens": args.tokens, "queries": len(calls),
                      "models": results, **run_info("cpu")}))  # fmt: skip


if __name__ == "__main__":
    main()
