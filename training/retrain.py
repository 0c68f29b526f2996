"""`twostage retrain`: mine, fine-tune both models, evaluate, and promote only a better pair.

The cycle, each step timed in the run's manifest (`registry/NAME/runs/RUN/manifest.json`):

  mine       hard negatives for the pairs against the live index's chunks, with the deployed
             embedder (the mistakes it makes now)
  train      the embedder and/or the reranker, starting from the deployed models (or the
             configured base models with `from_base`), LoRA merged into standalone models
  evaluate   deployed vs candidate on held-out pairs: dense and the served recall (hybrid by
             default), and that recall reranked (report.json/.png)
  gate       paired tests over per-query nDCG@10, the embedder and the reranker decided
             separately (`training.gate`); the deployed pair becomes the promoted models
  reindex    a new collection version embedded by the candidate, from the stored chunk text
             (the original files are not needed); skipped when the embedder did not change
  verify     the same metrics end to end through the new index, as `/v1/search` runs them
  switch     the registry pointer (collection + embedder + reranker in one rename), then the
             store's alias; the old version and models stay for `twostage rollback`

Nothing the API serves changes before `switch`: any failure or crash earlier leaves the
deployed pair serving. A version left half-built by a crash is recorded in `pending.json`
and removed by the next run.
"""

import hashlib
import platform
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twostage.retrieval.core.errors import InputError
from twostage.retrieval.deployments.lifecycle import clean_pending, current_deployment, switch
from twostage.retrieval.deployments.registry import Canary, DeploymentRecord, Registry
from twostage.retrieval.ingest.documents import embedded_text
from twostage.retrieval.models.cache import ModelCache, pair_keys
from twostage.retrieval.models.embedder import Embedder
from twostage.retrieval.models.source import resolve_model
from twostage.retrieval.search.trust import judge_reranker
from twostage.retrieval.search.two_stage import Deployment, served_fusion
from twostage.retrieval.store.collections import active_manifest, create_version
from twostage.retrieval.store.locks import write_json_atomic
from twostage.retrieval.store.sparse import RecallMode, Rrf, sparse_encoder
from twostage.retrieval.store.vector_store import CollectionManifest, Point, StoreError, VectorStore, now_iso
from twostage.training.calibration import describe, fit_calibration, judged_queries, served_observations
from twostage.training.data import Judgement, Pair, load_examples, split_by_query
from twostage.training.reranker_choice import RerankerStart, reranker_start
from twostage.training.settings import TrainingSettings
from twostage.training.stored_chunks import StoredChunks, text_key

if TYPE_CHECKING:
    from twostage.training.evaluation import EvalSet, PairRuns

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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_pairs(path: Path, say: Say) -> list[Pair | Judgement]:
    """The pairs of a file: by text, or by id (resolved against the collection by `StoredChunks`)."""
    loaded = load_examples(path)
    for bad in loaded.bad:
        say(f"skipped {bad}")
    pairs = list(dict.fromkeys(e for e in loaded.examples if isinstance(e, Pair | Judgement)))
    if not pairs:
        raise InputError(f"{path} has no usable {{query, positive}} or {{query, doc_id | id}} pairs")
    return pairs


def split_dev(
    pairs: list[Pair], dev_path: Path | None, fraction: float, stored: StoredChunks, say: Say
) -> tuple[list[Pair], list[Pair]]:
    """Train/dev pairs; a dev query that also appears in training is dropped from training. Dev
    pairs by id are resolved against the collection; dev pairs by text are kept as they are."""
    if dev_path is None:
        return split_by_query(pairs, fraction)
    records = load_pairs(dev_path, say)
    by_id = [r for r in records if isinstance(r, Judgement)]
    dev = [r for r in records if isinstance(r, Pair)] + (stored.pairs(by_id, say) if by_id else [])
    dev_queries = {p.query for p in dev}
    train = [p for p in pairs if p.query not in dev_queries]
    if len(train) < len(pairs):
        say(f"warning: {len(pairs) - len(train)} training pairs share a query with the dev set; "
            "they are left out of training")  # fmt: skip
    return train, dev


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


def retrain(
    settings: TrainingSettings,
    store: VectorStore,
    options: RetrainOptions,
    say: Say = print,
    models: ModelCache | None = None,
) -> dict[str, Any]:
    """Run the whole cycle (see the module doc); returns the run manifest's data.

    `models` is the service's model cache when the retrain runs inside the server: the
    deployed pair it evaluates and verifies is then the one already serving, not a copy.
    """
    remote = [role for role in ("embedder", "reranker") if getattr(settings, role).backend == "remote"]
    if remote:  # training needs the weights here; a model server only answers
        raise InputError(
            f"twostage retrain trains local models, but the {' and '.join(remote)} run on a model server "
            f"(TWOSTAGE_{remote[0].upper()}__BACKEND=remote): retrain where the weights are, then serve the "
            "promoted models from your model servers"
        )
    registry = Registry(settings, store=store)
    with registry.lock():
        return _retrain_locked(settings, store, options, registry, say, models or ModelCache(settings))


def _retrain_locked(
    settings: TrainingSettings,
    store: VectorStore,
    options: RetrainOptions,
    registry: Registry,
    say: Say,
    models: ModelCache,
) -> dict[str, Any]:
    cfg = settings.retrain
    if not options.pairs.exists():
        raise InputError(f"pairs file {str(options.pairs)!r} does not exist")
    if options.skip_embedder and options.skip_reranker:
        raise InputError("--skip-embedder and --skip-reranker together leave nothing to retrain")
    if options.canary is not None and not 0 < options.canary <= 1:
        raise InputError(
            f"--canary is the share of sessions the candidate serves, in (0, 1]: {options.canary}"
        )
    running = registry.canary()
    if running is not None:
        raise InputError(
            f"the canary of deployment d{running.deployment} is still being measured; wait "
            "for its decision (twostage versions shows its tallies), or twostage rollback"
        )
    records = load_pairs(options.pairs, say)
    deployed = registry.current()  # None before the first retrain: recorded once the inputs are valid
    live = deployed.collection if deployed else active_manifest(store, registry.name).collection
    stored = StoredChunks.read(store, live)
    chunks = list(stored.texts.values())
    # a positive's document, for judging
    documents = {text_key(text): stored.documents[chunk] for chunk, text in stored.texts.items()}
    train, dev = split_dev(stored.pairs(records, say), options.dev, cfg.dev_fraction, stored, say)
    if not train or not dev:
        raise InputError(f"need training and dev pairs (have {len(train)} and {len(dev)}); add pairs")
    embedder_base = settings.embedder.model if options.from_base or not deployed else deployed.embedder
    reranker_base = settings.reranker.model if options.from_base or not deployed else deployed.reranker
    start = reranker_start(settings, deployed, reranker_base, models)
    plan = [
        f"collection {registry.name}: live version {live} ({len(chunks)} chunks), deployment "
        + (f"d{deployed.id}" if deployed else "(first retrain: recorded as the first deployment)"),
        f"pairs: {len(train)} train / {len(dev)} dev (from {options.source or options.pairs})",
        "gate's dev set: " + (f"the labelled dev file {options.dev}" if options.dev else
                              f"held-out queries of the same source ({cfg.dev_fraction:.0%}, split by hash)"),
        f"mine {cfg.negatives} hard negatives per pair from the live chunks",
        "train embedder from " + ("(skipped)" if options.skip_embedder else embedder_base),
        "train reranker: " + ("(skipped)" if options.skip_reranker else start.why),
        f"evaluate deployed vs candidate (recall, reranked top-{cfg.top_k}); gate: paired tests of per-query "
        f"{cfg.gate_metric}, gain >= +{cfg.min_gain} at p < {cfg.alpha}, embedder and reranker decided apart",
        "no promotion (--no-promote)" if not options.promote else (
            "reindex into a new version, verify, switch the alias" if not options.skip_embedder
            else "no reindex (same embedder), switch the reranker") + (
            "" if options.canary is None else f" only after a canary: {options.canary:.0%} of sessions"
            + (" see both rankings interleaved" if options.interleave else " see the candidate")
            + ", and feedback decides"),
    ]  # fmt: skip
    say("plan:\n  " + "\n  ".join(plan))  # a real run says what it is about to do, as --dry-run does
    if options.dry_run:
        return {"plan": plan, "dry_run": True}
    clean_pending(registry, store, say)
    deployed = current_deployment(registry, store, settings)

    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    run_dir = registry.runs_dir() / run_id
    inputs: dict[str, Any] = {"pairs": {"path": str(options.pairs), "sha256": file_sha256(options.pairs),
                                        "source": options.source or options.pairs.name}}  # fmt: skip
    if options.dev:
        inputs["dev"] = {"path": str(options.dev), "sha256": file_sha256(options.dev)}
    manifest = RunManifest(run_dir, {
        "run": run_id, "started_at": now_iso(), "collection": registry.name, "deployed": deployed.id,
        "inputs": inputs, "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},  # noqa: E501
        "settings": settings.retrain.model_dump(), "sizes": {"train": len(train), "dev": len(dev), "chunks": len(chunks)},  # noqa: E501
        "machine": {"platform": platform.platform()}, "plan": plan,
    })  # fmt: skip
    try:
        return _cycle(settings, store, options, registry, deployed, manifest, run_dir, chunks, documents,
                      train, dev, embedder_base, start, say, models)  # fmt: skip
    except BaseException as exc:
        manifest.data.update(decision="failed", error=str(exc) or type(exc).__name__, finished_at=now_iso())
        manifest.save()
        say(f"retrain failed, deployment d{deployed.id} still serving: {manifest.data['error']}")
        try:  # drop what this run half-built; if the store is unreachable, the next run does it
            clean_pending(registry, store, say)
            if not any(r.run == run_id for r in registry.records()):
                shutil.rmtree(registry.models_dir(registry.next_id()), ignore_errors=True)
        except Exception as cleanup:  # the original error is the one to report
            say(f"cleanup postponed to the next run: {cleanup}")
        raise
    finally:
        for part in ("embedder", "reranker"):  # checkpoints are only for resuming a crashed run
            shutil.rmtree(run_dir / part / "checkpoints", ignore_errors=True)


def _cycle(
    settings: TrainingSettings,
    store: VectorStore,
    options: RetrainOptions,
    registry: Registry,
    deployed: DeploymentRecord,
    manifest: RunManifest,
    run_dir: Path,
    chunks: list[str],
    documents: dict[str, str],
    train: list[Pair],
    dev: list[Pair],
    embedder_base: str,
    start: RerankerStart,
    say: Say,
    models: ModelCache,
) -> dict[str, Any]:
    from twostage.training.evaluation import (
        PairRuns,
        evaluate_index,
        from_pairs,
        reranked_mode,
        table,
        write_report,
    )
    from twostage.training.gate import decide
    from twostage.training.mining import MiningSettings, mine, with_negatives
    from twostage.training.st_model import load_st_embedder

    cfg = settings.retrain
    with manifest.step("mine", say) as step:
        deployed_system = _system(settings, deployed.embedder, deployed.reranker)
        source = resolve_model(deployed.embedder, cache_dir=settings.cache_dir)
        st = load_st_embedder(source.path, deployed_system)
        mining = MiningSettings(num_negatives=cfg.negatives)
        mined, mined_dev = (
            mine(part, chunks, st, mining, cache_dir=settings.cache_dir, model_id=deployed.embedder_id)
            for part in (train, dev)
        )
        mined, filled = with_negatives(train, mined, chunks, cfg.negatives)
        mined_dev, filled_dev = with_negatives(dev, mined_dev, chunks, cfg.negatives)
        step.update(train=len(mined), dev=len(mined_dev), random_negatives=filled + filled_dev)
        if filled + filled_dev:
            say(f"{filled + filled_dev} pairs had too few hard negatives past the false-negative guard; "
                "they got random indexed chunks instead")  # fmt: skip
        del st

    candidate_embedder, candidate_reranker = deployed.embedder, deployed.reranker
    if not options.skip_embedder:
        with manifest.step("train_embedder", say):
            candidate_embedder = str(
                _train_embedder(settings, embedder_base, mined, dev, run_dir / "embedder")
            )
    if not options.skip_reranker:
        with manifest.step("train_reranker", say) as step:
            base, max_length = start.base, cfg.reranker_max_length
            if base is None:  # a cross-encoder from the embedder: it reads what the embedder reads
                base = candidate_embedder
                max_length = min(max_length, models.pair(base, deployed.reranker)[0].max_length)
            step.update(base=base, family=start.family, why=start.why)
            candidate_reranker = str(
                _train_reranker(
                    settings, base, start.family, mined, mined_dev, run_dir / "reranker", max_length
                )
            )

    served = served_recall(settings, store.read_manifest(deployed.collection))
    rrf = Rrf(settings.recall.rrf_k, settings.recall.rrf_weights)
    candidate_pair = (candidate_embedder, candidate_reranker)
    with manifest.step("evaluate", say) as step:
        data = from_pairs(dev, chunks[: cfg.max_distractors])
        recalls: list[RecallMode] = ["dense"] if served == "dense" else ["dense", served]
        runs = PairRuns(data, models.pair, recalls=recalls, served=served, top_k=cfg.top_k, rrf=rrf,
                        bm25=settings.recall.bm25, fusion=served_fusion(settings),
                        rerank_k=settings.search.rerank_k)  # fmt: skip
        deployed_pair = (deployed.embedder, deployed.reranker)
        decision = decide(
            lambda e, r, mode: runs.per_query(e, r, mode, cfg.gate_metric), len(data.queries), served,
            deployed_pair, (candidate_embedder, candidate_reranker), cfg,
        )  # fmt: skip
        results = {"deployed": runs.metrics(*deployed_pair), "candidate": runs.metrics(*candidate_pair)}
        if decision.promote and decision.pair != (candidate_embedder, candidate_reranker):
            results["promoted"] = runs.metrics(*decision.pair)  # a mixed pair: its own measurement
        step.update(served_recall=served, queries=len(data.queries))
        # the run directory's copies are done with: promoted models are served from the registry's
        models.release(*(pair_keys([candidate_pair]) - pair_keys([deployed_pair])))
        write_report(results, run_dir, {"run": run_id_of(manifest), "queries": len(data.queries),
                                        "corpus": len(data.corpus), "top_k": cfg.top_k,
                                        "served_recall": served, "gate": decision.as_dict()})  # fmt: skip
        say(table(results))
    promote, reasons = decision.promote, decision.reasons
    manifest.data.update(metrics=results, gate=decision.as_dict())
    manifest.save()
    if not promote or not options.promote:
        why = "neither model is better enough" if not promote else "--no-promote"
        return _finish(manifest, "kept", f"deployment d{deployed.id} kept: {why}", reasons, say)

    new_id = registry.next_id()
    stored = registry.models_dir(new_id)
    shutil.rmtree(stored, ignore_errors=True)  # left by a run that crashed before recording d{new_id}
    stored.mkdir(parents=True)
    record = deployed.model_copy(update={
        "id": new_id, "parent": deployed.id, "run": run_id_of(manifest),
        "metrics": results.get("promoted", results["candidate"]),
        "gate": {role: {"promote": d.promote, "reasons": d.reasons, "tests": d.tests}
                 for role, d in (("embedder", decision.embedder), ("reranker", decision.reranker))},
        "comparison": _comparison(runs, data, deployed, decision.pair, served, decision.reranker.promote,
                                  cfg.gate_metric),
        "created_at": now_iso(),
    })  # fmt: skip
    promoted_embedder, promoted_reranker = decision.pair
    with manifest.step("store_models", say):
        if promoted_embedder != deployed.embedder:
            copy_model(Path(promoted_embedder), stored / "embedder")
            record.embedder = str((stored / "embedder").resolve())
        if promoted_reranker != deployed.reranker:
            copy_model(Path(promoted_reranker), stored / "reranker")
            record.reranker = str((stored / "reranker").resolve())
    system = _system(settings, record.embedder, record.reranker)
    new_embedder, new_reranker = models.pair(record.embedder, record.reranker)  # what the service will load
    if record.embedder != deployed.embedder:
        with manifest.step("reindex", say) as step:
            version = create_version(
                store,
                registry.name,
                new_embedder,
                system,
                store.read_manifest(deployed.collection).payload_indexes,
            )
            registry.set_pending(version.collection, run_id_of(manifest))
            step["chunks"] = reindex(store, deployed.collection, version.collection, new_embedder, say)
            old = store.read_manifest(deployed.collection)
            update = {
                "status": "ready",
                "documents": old.documents,
                "chunks": step["chunks"],
                "updated_at": now_iso(),
            }
            version = version.model_copy(update=update)
            store.write_manifest(version)
        record.collection, record.embedder_id = version.collection, new_embedder.model_id
    with manifest.step("verify", say) as step:  # through the indexes, as /v1/search will answer
        relevant = [documents[p.positive.strip()[:200]] for p in dev]
        old_pair = Deployment(
            store.read_manifest(deployed.collection), *models.pair(deployed.embedder, deployed.reranker)
        )
        new_pair = Deployment(store.read_manifest(record.collection), new_embedder, new_reranker)
        fusion = served_fusion(settings)
        before, after = (
            evaluate_index(
                dev,
                relevant,
                d,
                store,
                top_k=cfg.top_k,
                recall=served,
                rrf=rrf,
                fusion=fusion,
                rerank_k=settings.search.rerank_k,
            )
            for d in (old_pair, new_pair)
        )
        step["end_to_end"] = {"deployed": before, "candidate": after}
        metric = cfg.gate_metric
        mode = reranked_mode(served) if decision.reranker.promote else served
        if after[mode][metric] < before[mode][metric] - cfg.tolerance:
            raise StoreError(
                f"through the new index {mode}/{metric} is {after[mode][metric]:.4f}, below the "
                f"deployed index's {before[mode][metric]:.4f}; not switching"
            )
    with manifest.step("calibrate", say) as step:  # P(relevant) of what the new deployment will serve
        served_pair = replace(new_pair, trust=judge_reranker(new_reranker, record.metrics))
        judgements = [
            Judgement(p.query, doc_id=d, instruction=p.instruction)
            for p, d in zip(dev, relevant, strict=True)
        ]
        try:
            judged = judged_queries(store, record.collection, judgements, say)
            plan, observed = served_observations(served_pair, store, settings, judged)
            record.calibration = fit_calibration(
                observed, plan, settings, f"retrain run {run_id_of(manifest)} dev pairs"
            )
            step["reliability"] = record.calibration.reliability.model_dump(exclude={"bins"})
            say(describe(record.calibration, f"deployment d{record.id}"))
        except InputError as exc:
            step["skipped"] = str(exc)
            say(f"deployment d{record.id} stays uncalibrated: {exc}")
    if options.canary is not None:
        with manifest.step("canary", say) as step:
            registry.add(record)
            canary = Canary(
                deployment=record.id, control=deployed.id, share=options.canary,
                interleave=options.interleave,
                max_events=options.canary_events or cfg.canary_events,
                max_seconds=options.canary_seconds or cfg.canary_seconds, alpha=cfg.alpha,
            )  # fmt: skip
            registry.set_canary(canary)
            registry.set_pending(None)
            step["canary"] = canary.model_dump(mode="json")
        manifest.data["deployment"] = record.model_dump(mode="json")
        how = "both rankings interleaved" if canary.interleave else "its ranking"
        return _finish(manifest, "canary", f"canary: deployment d{record.id} ({record.collection}) serves "
                       f"{canary.share:.0%} of sessions ({how}) beside d{deployed.id}; the feedback of "
                       f"{canary.max_events} events (or {canary.max_seconds:g} s) decides: promote if it is "
                       f"better at p < {canary.alpha}, else roll back", reasons, say)  # fmt: skip
    with manifest.step("switch", say):
        registry.add(record)
        switch(registry, store, record)
        registry.set_pending(None)
    manifest.data["deployment"] = record.model_dump(mode="json")
    return _finish(manifest, "promoted", f"promoted: deployment d{record.id} ({record.collection}) "
                   f"replaces d{deployed.id}", reasons, say)  # fmt: skip


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


def _finish(
    manifest: RunManifest, decision: str, summary: str, reasons: list[str], say: Say
) -> dict[str, Any]:
    manifest.data.update(decision=decision, summary=summary, finished_at=now_iso())
    manifest.save()
    run_dir = manifest.path.parent
    # relative to the data directory: this line reaches API clients, the server's paths do not
    shown = next(
        (run_dir.relative_to(p.parent) for p in run_dir.parents if p.name == "registry"), run_dir.name
    )
    say(summary + "\n  " + "\n  ".join(reasons) + f"\n  run: {shown} (in the data directory)")
    return manifest.data
