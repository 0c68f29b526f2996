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

The steps are `retrain_run.py`'s; this module checks the inputs, says the plan, opens the run's
manifest and runs them. Nothing the API serves changes before `switch`: any failure or crash
earlier leaves the deployed pair serving. A version left half-built by a crash is recorded in `pending.json`
and removed by the next run.
"""

import hashlib
import platform
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twostage.retrieval.core.errors import InputError
from twostage.retrieval.deployments.lifecycle import clean_pending, current_deployment
from twostage.retrieval.deployments.registry import Registry
from twostage.retrieval.models.cache import ModelCache
from twostage.retrieval.store.collections import active_manifest
from twostage.retrieval.store.vector_store import VectorStore, now_iso
from twostage.retrieval.traffic.coordination import coordination_locks
from twostage.training.data import Judgement, Pair, load_examples, split_by_query
from twostage.training.reranker_choice import reranker_start
from twostage.training.retrain_run import RetrainOptions, Run, RunManifest, run_steps
from twostage.training.settings import TrainingSettings
from twostage.training.stored_chunks import StoredChunks, text_key

if TYPE_CHECKING:
    pass

Say = Callable[[str], None]


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
    registry = Registry(settings, store=store, locks=coordination_locks(settings.feedback, settings.data_dir))
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
        return run_steps(Run(settings, store, options, registry, deployed, manifest, chunks, documents,
                          train, dev, embedder_base, start, say, models))  # fmt: skip
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
