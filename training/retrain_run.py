"""A retrain run as a sequence of steps over one `Run`: mine, train, evaluate and gate, store the
models, reindex, verify, calibrate, then serve (switch, or start a canary).

Each step is a function of the run: it reads what the steps before it left on the `Run`, adds
its own result, and records itself in the run's manifest (`RunManifest.step`: started, seconds,
done or failed with the error), so a crashed run leaves a readable record; training resumes from
its last checkpoint under the run directory. `retrain.py` prepares the run (checks, the plan,
the manifest) and cleans up after a failure.
"""

import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twostage.retrieval.core.errors import InputError
from twostage.retrieval.deployments.lifecycle import start_canary, switch
from twostage.retrieval.deployments.registry import DeploymentRecord, Registry
from twostage.retrieval.ingest.documents import embedded_text
from twostage.retrieval.models.cache import ModelCache, pair_keys
from twostage.retrieval.models.embedder import Embedder
from twostage.retrieval.models.source import resolve_model
from twostage.retrieval.search.trust import judge_reranker
from twostage.retrieval.search.two_stage import Deployment, served_fusion
from twostage.retrieval.store.collections import create_version
from twostage.retrieval.store.locks import write_json_atomic
from twostage.retrieval.store.sparse import RecallMode, Rrf, sparse_encoder
from twostage.retrieval.store.vector_store import CollectionManifest, Point, StoreError, VectorStore, now_iso
from twostage.training.calibration import describe, fit_calibration, judged_queries, served_observations
from twostage.training.data import Judgement, Pair
from twostage.training.reranker_choice import RerankerStart
from twostage.training.settings import RetrainSettings, TrainingSettings

if TYPE_CHECKING:
    from twostage.training.evaluation import EvalSet, PairRuns
    from twostage.training.gate import GateResult

Say = Callable[[str], None]
_REINDEX_BATCH = 256


@dataclass
class RetrainOptions:
    pairs: Path
    dev: Path | None = None
    from_base: bool = False
    skip_embedder: bool = False
    skip_reranker: bool = False
    promote: bool = True
    dry_run: bool = False
    source: str | None = None  # what the pairs are (e.g. "feedback+sample"); None: the file
    canary: float | None = None  # serve a promoted pair to this share first; feedback decides the switch
    interleave: bool = False  # the canary's share sees both rankings interleaved
    canary_events: int | None = None  # None: retrain.canary_events
    canary_seconds: float | None = None  # None: retrain.canary_seconds


class RunManifest:
    """The run's record, rewritten atomically after every step so a crash leaves it readable."""

    def __init__(self, run_dir: Path, data: dict[str, Any]) -> None:
        self.path = run_dir / "manifest.json"
        self.data = {"steps": {}, **data}
        run_dir.mkdir(parents=True, exist_ok=True)
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.data)

    @contextmanager
    def step(self, name: str, say: Say) -> Iterator[dict[str, Any]]:
        say(f"{name} ...")
        entry: dict[str, Any] = {"started_at": now_iso(), "status": "running"}
        self.data["steps"][name] = entry
        self.save()
        started = time.perf_counter()
        try:
            yield entry
        except BaseException as exc:
            entry.update(status="failed", error=str(exc) or type(exc).__name__)
            raise
        else:
            entry["status"] = "done"
        finally:
            entry["seconds"] = round(time.perf_counter() - started, 2)
            self.save()


def served_recall(settings: TrainingSettings, live: CollectionManifest) -> RecallMode:
    """The first stage the service runs for this collection by default (what the gate measures)."""
    return settings.recall.mode if live.sparse is not None and settings.recall.sparse else "dense"


def _system(settings: TrainingSettings, embedder: str, reranker: str) -> TrainingSettings:
    chosen = settings.model_copy(deep=True)
    chosen.embedder.model, chosen.reranker.model = embedder, reranker
    return chosen


def _train_embedder(
    settings: TrainingSettings, base: str, train: list[Pair], dev: list[Pair], out: Path
) -> Path:
    from twostage.retrieval.models.devices import resolve_device
    from twostage.training.embedder_training import EmbedderTrainSettings, train_embedder
    from twostage.training.st_model import load_st_embedder

    cfg = settings.retrain
    system = _system(settings, base, settings.reranker.model)
    source = resolve_model(base, cache_dir=settings.cache_dir)
    model = load_st_embedder(source.path, system, device=str(resolve_device(settings.device)))
    options = EmbedderTrainSettings(
        epochs=cfg.embedder_epochs, batch_size=cfg.embedder_batch_size, learning_rate=cfg.embedder_lr,
        lora=cfg.lora, eval_steps=cfg.eval_steps, mask_false_negatives=cfg.mask_false_negatives,
    )  # fmt: skip
    report = train_embedder(
        model,
        train,
        dev,
        out,
        options,
        app=system,
    )
    return Path(report["model_dir"])


def _train_reranker(
    settings: TrainingSettings,
    base: str,
    family: str,
    train: list[Pair],
    dev: list[Pair],
    out: Path,
    max_length: int,
) -> Path:
    from twostage.retrieval.models.devices import resolve_device
    from twostage.retrieval.models.loading import reranker_family
    from twostage.training.reranker_families import fine_tune_reranker
    from twostage.training.reranker_training import RerankerTrainSettings

    cfg = settings.retrain
    source = resolve_model(base, cache_dir=settings.cache_dir)
    family = reranker_family(source, settings.reranker.family) if family == "auto" else family
    options = RerankerTrainSettings(
        epochs=cfg.reranker_epochs, batch_size=cfg.reranker_batch_size, learning_rate=cfg.reranker_lr,
        mode="lora" if cfg.lora else "full", eval_steps=cfg.eval_steps,
    )  # fmt: skip
    report = fine_tune_reranker(
        source.path, family, list(train), list(dev), out, options,
        instruction=settings.reranker.instruction, max_length=max_length,
        device=str(resolve_device(settings.device)),
    )  # fmt: skip
    return Path(report["model_dir"])


def copy_model(source: Path, target: Path) -> None:
    """Copy a trained model into the registry; a failed copy (disk full) leaves nothing behind."""
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        shutil.copytree(source, partial)
        partial.rename(target)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise StoreError(f"could not store the model in {target.parent}: {exc}") from exc


def reindex(store: VectorStore, source: str, target: str, embedder: Embedder, say: Say) -> int:
    """Every chunk of `source` re-embedded into `target`: same ids and payloads, new vectors
    (BM25 ones too when `target` has them, encoded as `target`'s manifest says)."""
    encoder = sparse_encoder(store.read_manifest(target).sparse)
    total = store.count(source)
    done = 0
    batch: list[Any] = []

    def flush() -> None:
        nonlocal done
        texts = [embedded_text(r.payload) for r in batch]
        vectors = embedder.embed_documents(texts)
        sparse = encoder.embed_documents(texts) if encoder else [None] * len(texts)
        points = [Point(r.id, v, r.payload, sv) for r, v, sv in zip(batch, vectors, sparse, strict=True)]
        store.upsert(target, points)
        done += len(batch)
        say(f"reindex: {done}/{total} chunks")
        batch.clear()

    for record in store.scroll(source):
        batch.append(record)
        if len(batch) >= _REINDEX_BATCH:
            flush()
    if batch:
        flush()
    store.optimize(target)
    return done


@dataclass
class Run:
    """One retrain run: what it was given, and what each step adds for the next. The steps below
    are functions of this object, run in order by `run_steps`; each records itself in the manifest."""

    settings: TrainingSettings
    store: VectorStore
    options: RetrainOptions
    registry: Registry
    deployed: DeploymentRecord
    manifest: RunManifest
    chunks: list[str]  # the live collection's chunk texts: negatives, distractors
    documents: dict[str, str]  # a positive's text key -> its document id (for judging)
    train: list[Pair]
    dev: list[Pair]
    embedder_base: str
    start: RerankerStart
    say: Say
    models: ModelCache
    mined: list[Pair] = field(default_factory=list)  # mine: train pairs with hard negatives
    mined_dev: list[Pair] = field(default_factory=list)
    candidate: tuple[str, str] = ("", "")  # train: the candidate (embedder, reranker)
    served: RecallMode = "dense"  # evaluate: the recall the service runs
    rrf: Rrf | None = None
    runs: "PairRuns | None" = None
    data: "EvalSet | None" = None
    decision: "GateResult | None" = None
    results: dict[str, Any] = field(default_factory=dict)
    record: DeploymentRecord | None = None  # store_models: the new deployment, as it will be served
    new_pair: Deployment | None = None  # reindex: the new deployment on its index
    relevant: list[str] = field(default_factory=list)  # verify: each dev pair's document

    @property
    def cfg(self) -> "RetrainSettings":
        return self.settings.retrain

    @property
    def run_dir(self) -> Path:
        return self.manifest.path.parent

    def step(self, name: str) -> AbstractContextManager[dict[str, Any]]:
        return self.manifest.step(name, self.say)


def run_steps(run: Run) -> dict[str, Any]:
    """The steps in order (module doc); nothing served changes before the last one."""
    for step in (mine_negatives, train_embedder_step, train_reranker_step, evaluate_and_gate):
        step(run)
    assert run.decision is not None
    if not run.decision.promote or not run.options.promote:
        why = "neither model is better enough" if not run.decision.promote else "--no-promote"
        return _finish(run, "kept", f"deployment d{run.deployed.id} kept: {why}")
    for step in (store_models, reindex_step, verify, calibrate):
        step(run)
    return serve_canary(run) if run.options.canary is not None else serve_switch(run)


def mine_negatives(run: Run) -> None:
    """Hard negatives for train and dev pairs from the live chunks, with the deployed embedder."""
    from twostage.training.mining import MiningSettings, mine, with_negatives
    from twostage.training.st_model import load_st_embedder

    settings, deployed, cfg = run.settings, run.deployed, run.cfg
    with run.step("mine") as step:
        deployed_system = _system(settings, deployed.embedder, deployed.reranker)
        source = resolve_model(deployed.embedder, cache_dir=settings.cache_dir)
        st = load_st_embedder(source.path, deployed_system)
        mining = MiningSettings(num_negatives=cfg.negatives)
        mined, mined_dev = (
            mine(part, run.chunks, st, mining, cache_dir=settings.cache_dir, model_id=deployed.embedder_id)
            for part in (run.train, run.dev)
        )
        run.mined, filled = with_negatives(run.train, mined, run.chunks, cfg.negatives)
        run.mined_dev, filled_dev = with_negatives(run.dev, mined_dev, run.chunks, cfg.negatives)
        step.update(train=len(run.mined), dev=len(run.mined_dev), random_negatives=filled + filled_dev)
        if filled + filled_dev:
            run.say(f"{filled + filled_dev} pairs had too few hard negatives past the false-negative guard; "
                    "they got random indexed chunks instead")  # fmt: skip
    run.candidate = (run.deployed.embedder, run.deployed.reranker)


def train_embedder_step(run: Run) -> None:
    if run.options.skip_embedder:
        return
    with run.step("train_embedder"):
        trained = _train_embedder(
            run.settings, run.embedder_base, run.mined, run.dev, run.run_dir / "embedder"
        )
        run.candidate = (str(trained), run.candidate[1])


def train_reranker_step(run: Run) -> None:
    if run.options.skip_reranker:
        return
    with run.step("train_reranker") as step:
        base, max_length = run.start.base, run.cfg.reranker_max_length
        if base is None:  # a cross-encoder from the embedder: it reads what the embedder reads
            base = run.candidate[0]
            max_length = min(max_length, run.models.pair(base, run.deployed.reranker)[0].max_length)
        step.update(base=base, family=run.start.family, why=run.start.why)
        trained = _train_reranker(
            run.settings,
            base,
            run.start.family,
            run.mined,
            run.mined_dev,
            run.run_dir / "reranker",
            max_length,
        )
        run.candidate = (run.candidate[0], str(trained))


def evaluate_and_gate(run: Run) -> None:
    """Deployed vs candidate on the dev pairs, in the served recall and reranked; the gate decides."""
    from twostage.training.evaluation import PairRuns, from_pairs, table, write_report
    from twostage.training.gate import decide

    settings, cfg, deployed = run.settings, run.cfg, run.deployed
    run.served = served_recall(settings, run.store.read_manifest(deployed.collection))
    run.rrf = Rrf(settings.recall.rrf_k, settings.recall.rrf_weights)
    with run.step("evaluate") as step:
        run.data = data = from_pairs(run.dev, run.chunks[: cfg.max_distractors])
        recalls: list[RecallMode] = ["dense"] if run.served == "dense" else ["dense", run.served]
        run.runs = runs = PairRuns(
            data, run.models.pair, recalls=recalls, served=run.served, top_k=cfg.top_k, rrf=run.rrf,
            bm25=settings.recall.bm25, fusion=served_fusion(settings), rerank_k=settings.search.rerank_k,
        )  # fmt: skip
        deployed_pair = (deployed.embedder, deployed.reranker)
        run.decision = decision = decide(
            lambda e, r, mode: runs.per_query(e, r, mode, cfg.gate_metric), len(data.queries), run.served,
            deployed_pair, run.candidate, cfg,
        )  # fmt: skip
        results = {"deployed": runs.metrics(*deployed_pair), "candidate": runs.metrics(*run.candidate)}
        if decision.promote and decision.pair != run.candidate:
            results["promoted"] = runs.metrics(*decision.pair)  # a mixed pair: its own measurement
        step.update(served_recall=run.served, queries=len(data.queries))
        # the run directory's copies are done with: promoted models are served from the registry's
        run.models.release(*(pair_keys([run.candidate]) - pair_keys([deployed_pair])))
        about = {"run": run_id_of(run.manifest), "queries": len(data.queries), "corpus": len(data.corpus),
                 "top_k": cfg.top_k, "served_recall": run.served, "gate": decision.as_dict()}  # fmt: skip
        write_report(results, run.run_dir, about)
        run.say(table(results))
    run.results = results
    run.manifest.data.update(metrics=results, gate=decision.as_dict())
    run.manifest.save()


def store_models(run: Run) -> None:
    """The promoted models copied into the registry, and the new deployment's record."""
    assert run.decision is not None and run.runs is not None and run.data is not None
    decision, deployed, registry = run.decision, run.deployed, run.registry
    new_id = registry.next_id()
    stored = registry.models_dir(new_id)
    shutil.rmtree(stored, ignore_errors=True)  # left by a run that crashed before recording d{new_id}
    stored.mkdir(parents=True)
    record = deployed.model_copy(update={
        "id": new_id, "parent": deployed.id, "run": run_id_of(run.manifest),
        "metrics": run.results.get("promoted", run.results["candidate"]),
        "gate": {role: {"promote": d.promote, "reasons": d.reasons, "tests": d.tests}
                 for role, d in (("embedder", decision.embedder), ("reranker", decision.reranker))},
        "comparison": _comparison(run.runs, run.data, deployed, decision.pair, run.served,
                                  decision.reranker.promote, run.cfg.gate_metric),
        "created_at": now_iso(),
    })  # fmt: skip
    promoted_embedder, promoted_reranker = decision.pair
    with run.step("store_models"):
        if promoted_embedder != deployed.embedder:
            copy_model(Path(promoted_embedder), stored / "embedder")
            record.embedder = str((stored / "embedder").resolve())
        if promoted_reranker != deployed.reranker:
            copy_model(Path(promoted_reranker), stored / "reranker")
            record.reranker = str((stored / "reranker").resolve())
    run.record = record


def reindex_step(run: Run) -> None:
    """A new collection version embedded by the promoted embedder (skipped when it did not change)."""
    assert run.record is not None
    record, deployed, store, registry = run.record, run.deployed, run.store, run.registry
    new_embedder, new_reranker = run.models.pair(record.embedder, record.reranker)  # what will be served
    if record.embedder != deployed.embedder:
        with run.step("reindex") as step:
            system = _system(run.settings, record.embedder, record.reranker)
            old = store.read_manifest(deployed.collection)
            version = create_version(store, registry.name, new_embedder, system, old.payload_indexes)
            registry.set_pending(version.collection, run_id_of(run.manifest))
            step["chunks"] = reindex(store, deployed.collection, version.collection, new_embedder, run.say)
            update = {
                "status": "ready",
                "documents": old.documents,
                "chunks": step["chunks"],
                "updated_at": now_iso(),
            }
            store.write_manifest(version.model_copy(update=update))
        record.collection, record.embedder_id = version.collection, new_embedder.model_id
    run.new_pair = Deployment(store.read_manifest(record.collection), new_embedder, new_reranker)


def verify(run: Run) -> None:
    """The gate's metrics again, end to end through the indexes, as /v1/search will answer."""
    from twostage.training.evaluation import evaluate_index, reranked_mode

    assert run.new_pair is not None and run.decision is not None
    cfg, deployed, store = run.cfg, run.deployed, run.store
    with run.step("verify") as step:
        run.relevant = relevant = [run.documents[p.positive.strip()[:200]] for p in run.dev]
        old_pair = Deployment(
            store.read_manifest(deployed.collection), *run.models.pair(deployed.embedder, deployed.reranker)
        )
        fusion, rerank_k = served_fusion(run.settings), run.settings.search.rerank_k
        before, after = (
            evaluate_index(
                run.dev,
                relevant,
                d,
                store,
                top_k=cfg.top_k,
                recall=run.served,
                rrf=run.rrf,
                fusion=fusion,
                rerank_k=rerank_k,
            )
            for d in (old_pair, run.new_pair)
        )
        step["end_to_end"] = {"deployed": before, "candidate": after}
        metric = cfg.gate_metric
        mode = reranked_mode(run.served) if run.decision.reranker.promote else run.served
        if after[mode][metric] < before[mode][metric] - cfg.tolerance:
            raise StoreError(
                f"through the new index {mode}/{metric} is {after[mode][metric]:.4f}, below the "
                f"deployed index's {before[mode][metric]:.4f}; not switching"
            )


def calibrate(run: Run) -> None:
    """P(relevant) of what the new deployment will serve, fitted on the dev pairs."""
    assert run.record is not None and run.new_pair is not None
    record = run.record
    with run.step("calibrate") as step:
        served_pair = replace(run.new_pair, trust=judge_reranker(run.new_pair.reranker, record.metrics))
        judgements = [
            Judgement(p.query, doc_id=d, instruction=p.instruction)
            for p, d in zip(run.dev, run.relevant, strict=True)
        ]
        try:
            judged = judged_queries(run.store, record.collection, judgements, run.say)
            plan, observed = served_observations(served_pair, run.store, run.settings, judged)
            record.calibration = fit_calibration(
                observed, plan, run.settings, f"retrain run {run_id_of(run.manifest)} dev pairs"
            )
            step["reliability"] = record.calibration.reliability.model_dump(exclude={"bins"})
            run.say(describe(record.calibration, f"deployment d{record.id}"))
        except InputError as exc:
            step["skipped"] = str(exc)
            run.say(f"deployment d{record.id} stays uncalibrated: {exc}")


def serve_canary(run: Run) -> dict[str, Any]:
    """The new deployment serves a share of sessions beside the deployed one; feedback decides."""
    record, deployed, cfg, options, share = run.record, run.deployed, run.cfg, run.options, run.options.canary
    assert record is not None and share is not None
    with run.step("canary") as step:
        canary = start_canary(
            run.registry, record, deployed, share=share, interleave=options.interleave,
            max_events=options.canary_events or cfg.canary_events,
            max_seconds=options.canary_seconds or cfg.canary_seconds, alpha=cfg.alpha,
        )  # fmt: skip
        step["canary"] = canary.model_dump(mode="json")
    run.manifest.data["deployment"] = record.model_dump(mode="json")
    how = "both rankings interleaved" if canary.interleave else "its ranking"
    return _finish(run, "canary", f"canary: deployment d{record.id} ({record.collection}) serves "
                   f"{canary.share:.0%} of sessions ({how}) beside d{deployed.id}; the feedback of "
                   f"{canary.max_events} events (or {canary.max_seconds:g} s) decides: promote if it is "
                   f"better at p < {canary.alpha}, else roll back")  # fmt: skip


def serve_switch(run: Run) -> dict[str, Any]:
    """The new deployment replaces the deployed one (one pointer write, then the alias)."""
    assert run.record is not None
    record = run.record
    with run.step("switch"):
        run.registry.add(record)
        switch(run.registry, run.store, record)
        run.registry.set_pending(None)
    run.manifest.data["deployment"] = record.model_dump(mode="json")
    return _finish(run, "promoted", f"promoted: deployment d{record.id} ({record.collection}) "
                   f"replaces d{run.deployed.id}")  # fmt: skip


def _comparison(
    runs: "PairRuns",
    data: "EvalSet",
    deployed: DeploymentRecord,
    pair: tuple[str, str],
    served: RecallMode,
    reranked: bool,
    metric: str,
) -> dict[str, Any]:
    """Per-query `metric` of the promoted pair and the deployed one on the dev set, in the mode the
    new deployment serves (the quality page's wins and losses)."""
    from twostage.training.evaluation import reranked_mode

    mode = reranked_mode(served) if reranked else served
    parent = runs.per_query(deployed.embedder, deployed.reranker, mode, metric)
    this = runs.per_query(*pair, mode, metric)
    return {"metric": metric, "mode": mode, "parent": deployed.id, "queries": [
        {"query": data.queries[q], "parent": round(parent.get(q, 0.0), 4), "this": round(this.get(q, 0.0), 4)}
        for q in data.queries]}  # fmt: skip


def run_id_of(manifest: RunManifest) -> str:
    return str(manifest.data["run"])


def _finish(run: Run, decision: str, summary: str) -> dict[str, Any]:
    manifest = run.manifest
    manifest.data.update(decision=decision, summary=summary, finished_at=now_iso())
    manifest.save()
    run_dir = manifest.path.parent
    # relative to the data directory: this line reaches API clients, the server's paths do not
    shown = next(
        (run_dir.relative_to(p.parent) for p in run_dir.parents if p.name == "registry"), run_dir.name
    )
    assert run.decision is not None
    run.say(
        summary + "\n  " + "\n  ".join(run.decision.reasons) + f"\n  run: {shown} (in the data directory)"
    )
    return manifest.data
