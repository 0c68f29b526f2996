"""Calibrated relevance: the fit on scores whose answer is known, and the whole path through a
real server (`POST /v1/calibrate`, `relevance` and `min_relevance` in `/v1/search`, the rerank
routes, `twostage versions`, the quality page in headless chromium).

The server's corpus is 150 debian-ir documents embedded by the real MiniLM; each judged query is
a document's own first line, judged relevant to that document. The reranker is the tiny random
Qwen3 one: the fitted map is then mostly flat, which is what a calibration of a reranker that
knows nothing should be, and the test checks the map against the judgements, not for skill.
"""

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import CHROMIUM, DEBIAN_IR, Served, page_dom, run_cli, sample_settings, serve

from twostage.api.settings import Settings
from twostage.retrieval.core.errors import InputError
from twostage.retrieval.models.tiny import TinyModelPaths
from twostage.retrieval.search.calibration import Calibration
from twostage.retrieval.search.two_stage import SearchPlan
from twostage.retrieval.store.sparse import Rrf
from twostage.training.calibration import Observation, fit_calibration, reliability

DOCS = 150


def _synthetic(n_queries: int, seed: int) -> list[Observation]:
    """Ten hits a query, scores uniform in [0, 1]; P(relevant) = s at rank 1 and s^2 / 2 below it."""
    rng = np.random.default_rng(seed)
    observed = []
    for q in range(n_queries):
        for rank in range(1, 11):
            s = float(rng.random())
            p = s if rank == 1 else s * s / 2
            observed.append(Observation(q, rank, 0.0, s, bool(rng.random() < p)))
    return observed


def test_the_fit_recovers_a_known_relevance_curve_and_holds_out() -> None:
    plan = SearchPlan("hybrid", True, Rrf(60), rerank_k=None)
    settings = Settings(_env_file=None)
    calibration = fit_calibration(_synthetic(3000, 0), plan, settings, "synthetic")
    assert (calibration.recall, calibration.rerank, calibration.fusion) == ("hybrid", True, "none")
    assert [m.first_rank for m in calibration.reranked] == [1, 2, 4] and calibration.recalled == []
    grid = np.linspace(0.05, 0.95, 19)
    top = [calibration.relevance(1, 0.0, s) for s in grid]
    below = [calibration.relevance(7, 0.0, s) for s in grid]
    # 3,000 rank-1 hits and 21,000 below: the isotonic fit is within a few points of the truth
    assert max(abs(p - s) for p, s in zip(top, grid, strict=True)) < 0.08  # type: ignore[operator]
    assert max(abs(p - s * s / 2) for p, s in zip(below, grid, strict=True)) < 0.05  # type: ignore[operator]
    # the held-out figures: calibrated, and the Brier score of the true curve within noise of it
    r = calibration.reliability
    assert r.judgements == 30000 and r.queries == 3000 and r.folds == 5 and r.ece < 0.02
    assert len(r.bins) == 10 and sum(b.count for b in r.bins) == 30000
    # fresh queries from the same distribution: still calibrated (what the bench checks on debian-ir)
    fresh = _synthetic(2000, 1)
    predicted = np.array([calibration.relevance(o.rank, 0.0, o.rerank_score) for o in fresh])
    held = reliability(predicted, np.array([o.relevant for o in fresh], dtype=float), queries=2000)
    assert held.ece < 0.02
    # the reranker-only map (the rerank routes) pools the ranks: between the two curves
    assert 0.05 < (calibration.rerank_relevance(0.5) or 0) < 0.5
    # a record's round trip keeps it exact
    again = Calibration.model_validate_json(calibration.model_dump_json())
    assert again.relevance(1, 0.0, 0.37) == calibration.relevance(1, 0.0, 0.37)


def test_reliability_figures_by_hand_and_too_few_judgements_are_refused() -> None:
    # all predicted 0.8, half relevant: one bin, ECE 0.3, Brier (0.8^2 + 0.2^2) / 2 = 0.34
    r = reliability(np.full(10, 0.8), np.array([1.0, 0.0] * 5), queries=1)
    assert (r.ece, r.brier, r.positives) == (0.3, 0.34, 5)
    assert [b.count for b in r.bins] == [0] * 8 + [10, 0] and r.bins[8].observed == 0.5
    plan = SearchPlan("dense", False, Rrf(60))
    with pytest.raises(InputError, match=r"at least 200 judged hits .* judge at least 20 queries"):
        fit_calibration(_synthetic(15, 2), plan, Settings(_env_file=None), "too few")


def test_a_calibration_holds_only_for_the_search_it_was_fitted_on() -> None:
    plan = SearchPlan("hybrid", False, Rrf(60))
    calibration = fit_calibration(_synthetic(100, 3), plan, Settings(_env_file=None), "x")
    assert calibration.mismatch("hybrid", False, None) is None
    assert "fitted on hybrid recall, not reranked" in (calibration.mismatch("dense", False, None) or "")
    assert "this search ran hybrid recall, reranked (fusion rrf)" in (
        calibration.mismatch("hybrid", True, "rrf") or ""
    )


# -- through the server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModelPaths, model_cache: Path
) -> Iterator[Served]:
    settings = sample_settings(tmp_path_factory.mktemp("calibration-data"), tiny_models, model_cache, DOCS)
    yield from serve(settings)


def _judgements() -> list[dict[str, str]]:
    with (DEBIAN_IR / "corpus.jsonl").open() as handle:
        rows = [json.loads(next(handle)) for _ in range(DOCS)]
    return [{"query": r["text"].split("\n")[0][:200], "doc_id": r["_id"]} for r in rows]


def _post(served: Served, path: str, body: object, key: str | None = "secret-key") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(served.url + path, json=body, headers=headers, timeout=300)


def test_calibrate_through_the_server_then_relevance_thresholds_and_rerank_routes(
    served: Served, tmp_path: Path
) -> None:
    query = _judgements()[3]["query"]
    before = _post(served, "/v1/search", {"query": query}).json()
    assert all(h["relevance"] is None for h in before["hits"]) and not before["notes"]
    ignored = _post(served, "/v1/search", {"query": query, "min_relevance": 0.5}).json()
    assert len(ignored["hits"]) == 10 and "min_relevance 0.5 not applied" in ignored["notes"][0]
    assert "no calibration" in ignored["notes"][0]
    for bad in (-0.1, 1.5, "high"):
        response = _post(served, "/v1/search", {"query": query, "min_relevance": bad})
        assert response.status_code == 422 and "min_relevance" in response.text, response.text

    # bad judgement files: a write key is needed, too few judgements are refused in one line
    assert _post(served, "/v1/calibrate", {"judgements": _judgements()}, key=None).status_code == 401
    few = _post(served, "/v1/calibrate", {"judgements": _judgements()[:10]})
    assert few.status_code == 400 and "at least 200 judged hits" in few.json()["detail"], few.text
    bad = _post(served, "/v1/calibrate", {"judgements": [{"query": "x"}, {"doc_id": "y"}]})
    assert bad.status_code == 400 and "no usable judgements" in bad.json()["detail"]

    # the CLI through the server it finds (the one holding the data directory)
    judgements = [*_judgements(), {"query": "lost", "doc_id": "not-in-the-corpus"}, {"query": 3}]
    path = tmp_path / "judged.jsonl"
    path.write_text("".join(json.dumps(j) + "\n" for j in judgements) + "not json\n")
    env = {**os.environ, "TWOSTAGE_DATA_DIR": str(served.settings.data_dir), "TWOSTAGE_API_KEY": "secret-key"}
    server = ["--server", served.url]  # served in this process: no server.json to find it by
    result = run_cli(["calibrate", "--pairs", str(path), "--json", *server], env)
    assert result.returncode == 0, result.stderr
    assert "skipped judged.jsonl:152" in result.stderr and "skipped judged.jsonl:153" in result.stderr
    assert "1 of 151 judgements name a document" in result.stderr
    assert "calibrated deployment d1 (docs__v1) on hybrid recall, reranked (fusion rrf)" in result.stderr
    calibration = Calibration.model_validate(json.loads(result.stdout))
    assert calibration.reliability.queries == DOCS and calibration.reliability.judgements == DOCS * 10

    after = _post(served, "/v1/search", {"query": query}).json()
    expected = [calibration.relevance(h["rank"], h["recall_score"], h["rerank_score"]) for h in after["hits"]]
    assert [h["relevance"] for h in after["hits"]] == expected and None not in expected
    assert not after["notes"]
    keep = sorted(expected)[5]
    kept = _post(served, "/v1/search", {"query": query, "min_relevance": keep}).json()
    assert [h["relevance"] for h in kept["hits"]] == [p for p in expected if p >= keep]
    # above the best hit: "nothing relevant", said in the notes (the map of a random reranker stays
    # well below 1; a threshold of 1 would otherwise be the one to try)
    above = round(min(1.0, max(expected) + 0.001), 3) if max(expected) < 1 else 1.0
    none = _post(served, "/v1/search", {"query": query, "min_relevance": above}).json()
    if max(expected) < 1:
        assert (
            none["hits"] == []
            and f"nothing relevant: no hit reaches min_relevance {above}" in none["notes"][0]
        )
    other = _post(served, "/v1/search", {"query": query, "recall": "dense", "rerank": False}).json()
    assert all(h["relevance"] is None for h in other["hits"])
    assert "fitted on hybrid recall, reranked (fusion rrf), this search ran dense recall" in other["notes"][0]

    # the rerank routes: calibrated relevance_score by default, the reranker's own with raw_scores
    documents = [j["query"] for j in _judgements()[:6]]
    raw = served.service.reranker.score("chess", documents)  # type: ignore[union-attr]
    cohere = _post(served, "/v2/rerank", {"query": "chess", "documents": documents, "top_n": None}).json()
    assert sorted(r["index"] for r in cohere["results"]) == list(range(6))
    for r in cohere["results"]:
        assert r["relevance_score"] == calibration.rerank_relevance(raw[r["index"]])
    jina = _post(
        served, "/v1/rerank", {"query": "chess", "documents": documents, "top_n": 99, "raw_scores": True}
    )
    assert [r["relevance_score"] for r in jina.json()["results"]] == pytest.approx(sorted(raw, reverse=True))
    tei = _post(served, "/rerank", {"query": "chess", "texts": documents}).json()
    assert {r["index"]: r["score"] for r in tei} == {
        i: calibration.rerank_relevance(s) for i, s in enumerate(raw)
    }

    # `twostage search --min-relevance` and `twostage versions` say it too
    shown = run_cli(["search", query, "--min-relevance", str(above), *server], env)
    assert shown.returncode == 0 and ("nothing relevant" in shown.stdout) == (max(expected) < 1), shown.stderr
    out_of_range = run_cli(["search", query, "--min-relevance", "2", *server], env)
    assert out_of_range.returncode == 2 and "--min-relevance must be within [0, 1]" in out_of_range.stderr
    versions = run_cli(["versions"], env)  # the registry is files in the data directory
    assert f"relevance: calibrated on {DOCS * 10} judged hits of {DOCS} queries" in versions.stdout

    # the quality page, in a real browser: the deployment, its calibration and reliability diagram
    if CHROMIUM is not None:  # .ci/run installs it
        dom = page_dom(f"{served.url}/quality#key=secret-key", tmp_path / "profile")  # an admin key
        assert "1 deployments of docs" in dom and "d1 (current)" in dom
        assert f"calibrated: ECE {calibration.reliability.ece:.4f}" in dom
        assert 'id="reliability"' in dom and dom.count('class="bin"') == sum(
            1 for b in calibration.reliability.bins if b.count
        )
        assert "first deployment: nothing to compare" in dom and "has no previous one" in dom
        assert str(served.settings.data_dir) not in dom  # no server path reaches the page
