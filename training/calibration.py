"""Fitting a deployment's calibration (`retrieval.search.calibration`) on judged dev queries.

Each judged query goes through the search component exactly as `/v1/search` serves it by
default (the deployment's plan: its recall, rerank or not, fusion, `rerank_k`); the top
`calibration.depth` hits are labelled relevant when they belong to the judged document (or are
the judged chunk). Isotonic regression (scikit-learn's, the pool-adjacent-violators fit) then
maps each hit's served score to the share of relevant hits, per rank group.

The reliability figures are held out: the queries are split into `FOLDS` folds, each fold's
hits predicted by maps fitted on the other folds, and the expected calibration error (10
equal-width bins), the Brier score and the reliability diagram computed on those predictions.
The stored maps are then fitted on all judgements.
"""

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from twostage.retrieval.core.errors import InputError
from twostage.retrieval.deployments.follower import load_served
from twostage.retrieval.deployments.lifecycle import current_deployment
from twostage.retrieval.deployments.registry import DeploymentRecord, Registry
from twostage.retrieval.search.calibration import (
    RANK_GROUPS,
    Calibration,
    Reliability,
    ReliabilityBin,
    ScoreMap,
)
from twostage.retrieval.search.two_stage import (
    Deployment,
    ModelCalls,
    SearchPlan,
    SearchQuery,
    plan_search,
    run_plan,
)
from twostage.retrieval.store.collections import active_manifest
from twostage.retrieval.store.vector_store import VectorStore, now_iso
from twostage.retrieval.traffic.coordination import coordination_locks
from twostage.training.data import Judgement
from twostage.training.settings import TrainingSettings
from twostage.training.stored_chunks import StoredChunks

Say = Callable[[str], None]

FOLDS = 5
BINS = 10
MIN_GROUP = 100  # judged hits a rank group needs for a map of its own (else the pooled map serves it)


@dataclass(frozen=True)
class Judged:
    """A dev query and what answers it: document ids, or chunk ids."""

    query: str
    documents: frozenset[str]
    chunks: frozenset[str] = frozenset()
    instruction: str | None = None


@dataclass(frozen=True)
class Observation:
    """One served hit of a judged query."""

    query: int  # index of the judged query
    rank: int
    recall_score: float
    rerank_score: float | None
    relevant: bool


def served_observations(
    deployment: Deployment,
    store: VectorStore,
    settings: TrainingSettings,
    judged: Sequence[Judged],
    calls: ModelCalls | None = None,
) -> tuple[SearchPlan, list[Observation]]:
    """The top `calibration.depth` hits of each judged query, searched as served by default."""
    if not judged:
        raise InputError("no judged queries to calibrate with")
    depth = settings.calibration.depth
    plan: SearchPlan | None = None
    observed: list[Observation] = []
    for i, item in enumerate(judged):
        request = SearchQuery(item.query, top_k=max(depth, 50), top_n=depth, instruction=item.instruction)
        plan = plan or plan_search(deployment, settings, request)
        result = run_plan(deployment, store, request, plan, calls)
        observed += [
            Observation(
                i, hit.rank, hit.recall_score, hit.rerank_score,
                hit.doc_id in item.documents or hit.id in item.chunks,
            )
            for hit in result.hits
        ]  # fmt: skip
    assert plan is not None
    return plan, observed


def fit_calibration(
    observed: Sequence[Observation],
    plan: SearchPlan,
    settings: TrainingSettings,
    source: str,
) -> Calibration:
    """The maps for a deployment served as `plan`, with held-out reliability figures.

    Refused (`InputError`, one line) below `calibration.min_judgements` judged hits."""
    needed = settings.calibration.min_judgements
    if len(observed) < needed:
        queries = len({o.query for o in observed})
        raise InputError(
            f"calibration needs at least {needed} judged hits (calibration.min_judgements), these "
            f"{queries} queries gave {len(observed)}: judge at least "
            f"{-(-needed // settings.calibration.depth)} queries"
        )
    fitted = _maps(observed)
    predicted, labels = [], []
    for fold in range(FOLDS):
        held_out = [o for o in observed if o.query % FOLDS == fold]
        if not held_out:
            continue
        maps = _maps([o for o in observed if o.query % FOLDS != fold])
        for o in held_out:
            p = maps.relevance(o.rank, o.recall_score, o.rerank_score)
            predicted.append(0.0 if p is None else p)
            labels.append(float(o.relevant))
    fusion = ("rrf" if plan.fusion else "none") if plan.rerank else None
    return fitted.model_copy(
        update={
            "recall": plan.recall,
            "rerank": plan.rerank,
            "fusion": fusion,
            "depth": settings.calibration.depth,
            "reliability": reliability(
                np.array(predicted), np.array(labels), queries=len({o.query for o in observed})
            ),
            "source": source,
        }
    )


def reliability(predicted: np.ndarray, labels: np.ndarray, queries: int, bins: int = BINS) -> Reliability:
    """ECE over `bins` equal-width bins, the Brier score and the diagram's bins."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(predicted, edges[1:-1]), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        count = int(inside.sum())
        mean_p = float(predicted[inside].mean()) if count else None
        mean_y = float(labels[inside].mean()) if count else None
        if count:
            ece += count / len(labels) * abs(mean_p - mean_y)  # type: ignore[operator]
        rows.append(
            ReliabilityBin(
                low=round(float(edges[b]), 3), high=round(float(edges[b + 1]), 3), count=count,
                predicted=None if mean_p is None else round(mean_p, 4),
                observed=None if mean_y is None else round(mean_y, 4),
            )
        )  # fmt: skip
    return Reliability(
        ece=round(ece, 4),
        brier=round(float(np.mean((predicted - labels) ** 2)), 4),
        judgements=len(labels),
        queries=queries,
        positives=int(labels.sum()),
        folds=FOLDS,
        bins=rows,
    )


def _maps(observed: Sequence[Observation]) -> Calibration:
    """Maps fitted on `observed` (the plan and figures are filled in by the caller)."""
    reranked = [o for o in observed if o.rerank_score is not None]
    recalled = [o for o in observed if o.rerank_score is None]
    empty = Reliability(ece=0, brier=0, judgements=0, queries=0, positives=0, folds=0, bins=[])
    return Calibration(
        recall="", rerank=False, depth=0, reliability=empty, source="", fitted_at=now_iso(),
        reranked=_by_rank(reranked, lambda o: o.rerank_score or 0.0),
        recalled=_by_rank(recalled, lambda o: o.recall_score),
        reranker=isotonic([o.rerank_score or 0.0 for o in reranked], [o.relevant for o in reranked])
        if reranked else None,
    )  # fmt: skip


def _by_rank(observed: Sequence[Observation], score: Callable[[Observation], float]) -> list[ScoreMap]:
    """One map per rank group with enough hits, the pooled map for the others."""
    if not observed:
        return []
    pooled = isotonic([score(o) for o in observed], [o.relevant for o in observed])
    bounds = [*RANK_GROUPS, 1 << 30]
    maps = []
    for first, stop in itertools.pairwise(bounds):
        group = [o for o in observed if first <= o.rank < stop]
        if not group:
            continue
        if len(group) < MIN_GROUP:
            maps.append(pooled.model_copy(update={"first_rank": first}))
        else:
            maps.append(isotonic([score(o) for o in group], [o.relevant for o in group], first))
    return maps


def isotonic(scores: Sequence[float], relevant: Sequence[bool], first_rank: int = 1) -> ScoreMap:
    """scikit-learn's isotonic fit of relevance on score, kept as its steps."""
    from sklearn.isotonic import IsotonicRegression

    fit = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    fit.fit(np.asarray(scores, dtype=np.float64), np.asarray(relevant, dtype=np.float64))
    return ScoreMap(
        first_rank=first_rank,
        x=[float(v) for v in fit.X_thresholds_],
        y=[round(float(v), 6) for v in fit.y_thresholds_],
    )


def judged_queries(
    store: VectorStore, collection: str, judgements: Sequence[Judgement], say: Say
) -> list[Judged]:
    """`judgements` resolved against the collection: a positive by its text (as retrain matches
    pairs), a chunk id to itself and its document. One naming nothing stored is left out, said."""
    stored = StoredChunks.read(store, collection)
    documents = set(stored.documents.values())
    judged: dict[tuple[str, str | None], Judged] = {}
    missing = 0
    for j in judgements:
        found: tuple[frozenset[str], frozenset[str]]
        if j.positive is not None:
            chunk = stored.positive(j)
            found = (frozenset({stored.documents[chunk]}) if chunk is not None else frozenset(), frozenset())
        elif j.chunk_id is not None:
            doc = stored.documents.get(j.chunk_id)
            found = (frozenset({doc}) if doc is not None else frozenset(), frozenset({j.chunk_id}))
        else:
            found = (frozenset({j.doc_id}) if j.doc_id in documents else frozenset(), frozenset())
        if not found[0]:
            missing += 1
            continue
        key = (j.query, j.instruction)  # one query judged twice: both answers count as relevant
        before = judged.get(key, Judged(j.query, frozenset(), frozenset(), j.instruction))
        judged[key] = Judged(j.query, before.documents | found[0], before.chunks | found[1], j.instruction)
    if missing:
        say(f"warning: {missing} of {len(judgements)} judgements name a document, chunk or passage "
            f"that is not in {collection}; they are left out")  # fmt: skip
    if not judged:
        raise InputError(f"none of the {len(judgements)} judgements names anything stored in {collection}")
    return list(judged.values())


def calibrate(
    settings: TrainingSettings,
    store: VectorStore,
    judgements: Sequence[Judgement],
    source: str,
    say: Say = print,
    served: Callable[[DeploymentRecord | None], Deployment] | None = None,
    calls: ModelCalls | None = None,
) -> DeploymentRecord:
    """`twostage calibrate`: fit the current deployment's calibration and store it in its record.

    `served` gives the deployment as it is served (the service's own, with its micro-batched
    `calls`); by default its models are loaded here. Holds the registry lock, as a retrain or a
    rollback does, so the record calibrated is the one still current when it is written."""
    registry = Registry(settings, store=store, locks=coordination_locks(settings.feedback, settings.data_dir))
    with registry.lock():
        current = registry.current()
        collection = current.collection if current else active_manifest(store, registry.name).collection
        judged = judged_queries(store, collection, judgements, say)
        deployment = served(current) if served else load_served(settings, store, registry.name)
        if deployment.collection != collection:
            raise InputError(f"the service still serves {deployment.collection}, not the current "
                             f"{collection}; try again in a moment")  # fmt: skip
        plan, observed = served_observations(deployment, store, settings, judged, calls)
        calibration = fit_calibration(observed, plan, settings, source)
        # before the first retrain the deployment is recorded now (as retrain does), once it fitted
        record = registry.set_calibration(current_deployment(registry, store, settings).id, calibration)
    say(describe(calibration, f"deployment d{record.id} ({record.collection})"))
    return record


def describe(calibration: Calibration, what: str) -> str:
    """One line on a calibration and how well it held out."""
    r = calibration.reliability
    planned = f"{calibration.recall} recall" + (
        f", reranked (fusion {calibration.fusion})" if calibration.rerank else ""
    )
    return (
        f"calibrated {what} on {planned}: ECE {r.ece:.4f}, Brier {r.brier:.4f} held out "
        f"({r.folds}-fold by query) over {r.judgements} judged hits of {r.queries} queries "
        f"({r.positives} relevant); source {calibration.source}"
    )
