"""Canaries: a promoted pair serves a share of sessions (or is interleaved with the deployed one)
until feedback decides. The statistics on tallies whose answer is known, team-draft interleaving,
then `twostage retrain --canary` on the tiny models and a real server whose watcher promotes a
candidate users prefer and rolls back an interleaved one they do not; a replica follows.
"""

import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from helpers import debian_rows, run_cli, serve, write_jsonl
from numpy.typing import NDArray
from scipy.special import betaln
from scipy.stats import binom
from test_retrain import TRAINING

from twostage.api.runtime.service import Service
from twostage.api.settings import Settings
from twostage.retrieval.deployments.canary import (
    decide,
    evidence,
    in_share,
    log_evidence,
    sign_test,
    tallies,
    team_draft,
    two_proportions,
)
from twostage.retrieval.deployments.registry import Canary, Registry
from twostage.retrieval.models.tiny import TinyModelPaths
from twostage.retrieval.search.two_stage import SearchHit
from twostage.retrieval.traffic.log import Event, LoggedSearch, ShownHit, TrafficLog, new_search_id
from twostage.retrieval.traffic.settings import FeedbackSettings


def _hit(chunk: str) -> SearchHit:
    return SearchHit(chunk, "doc-" + chunk, 0, "", "", "", "", {}, 0, 0, None, None, [], 0.5, None, 0)


def test_team_draft_takes_turns_skips_taken_hits_and_credits_each_pick() -> None:
    control = [_hit(c) for c in "abcdef"]
    candidate = [_hit(c) for c in "bxaycz"]
    merged = team_draft(control, candidate, 6, seed="s1")
    ids = [h.id for h, _ in merged]
    assert len(set(ids)) == 6 and [h.rank for h, _ in merged] == [1, 2, 3, 4, 5, 6]
    teams = Counter(team for _, team in merged)
    assert teams == {"control": 3, "candidate": 3}  # turns: neither team ever leads by more than one
    for k in range(1, 7):
        picked = Counter(team for _, team in merged[:k])
        assert abs(picked["control"] - picked["candidate"]) <= 1
    for hit, team in merged:  # each pick is its team's best hit not taken before it
        ranking = [h.id for h in (control if team == "control" else candidate)]
        before = {h.id for h, _ in merged[: hit.rank - 1]}
        assert hit.id == next(c for c in ranking if c not in before)
    assert team_draft(control, candidate, 6, seed="s1") == merged  # the search id fixes the coin
    # a short list runs out: the other fills the rest
    short = team_draft([_hit("a")], candidate, 4, seed="s2")
    assert [h.id for h, _ in short].count("a") == 1 and len(short) == 4


def test_a_session_keeps_its_arm_and_the_share_has_its_size() -> None:
    arms = [in_share(7, f"session-{i}", 0.2) for i in range(20_000)]
    assert abs(sum(arms) / len(arms) - 0.2) < 0.01
    assert arms == [in_share(7, f"session-{i}", 0.2) for i in range(20_000)]
    other = [in_share(8, f"session-{i}", 0.2) for i in range(20_000)]  # a new canary draws afresh
    assert 0.1 < sum(a and b for a, b in zip(arms, other, strict=True)) / sum(arms) < 0.3


def test_the_tests_and_the_decision_on_known_tallies(tmp_path: Path, database_url: str | None) -> None:
    assert sign_test(10, 0) == pytest.approx(2 / 1024) and sign_test(5, 5) == 1.0 and sign_test(0, 0) is None
    # 30/100 vs 45/100: pooled 0.375, z = 0.15 / sqrt(0.375 * 0.625 * 0.02) = 2.191, p = 0.0285
    assert two_proportions(30, 100, 45, 100) == pytest.approx(0.02846, abs=1e-4)
    # the mixture statistic in closed form against the integral it stands for (Beta(4, 4) cut to p > 1/2)
    grid = np.linspace(0.5, 1.0, 200_001)
    density = 2 * grid**3 * (1 - grid) ** 3 / math.exp(betaln(4, 4))
    for wins, losses in [(11, 1), (3, 5), (40, 22)]:
        ratio = grid**wins * (1 - grid) ** losses / 0.5 ** (wins + losses)
        assert evidence(wins, losses)["better"] == pytest.approx(
            np.trapezoid(ratio * density, grid), rel=1e-6
        )
    assert evidence(0, 0) == {"better": 1.0, "worse": 1.0}
    log = TrafficLog(tmp_path, FeedbackSettings(database_url=database_url))
    now = time.time()
    canary = Canary(deployment=2, control=1, share=0.5, interleave=True, max_events=20, max_seconds=3600,
                    alpha=0.05, started_ts=now - 60)  # fmt: skip
    events = []
    for i in range(15):  # the user clicks the candidate's pick in 14 searches, the control's in one
        search_id = new_search_id(now - 30)
        hits = (
            ShownHit("a", "da", 1, 0.1, None, None, "control"),
            ShownHit("b", "db", 2, 0.1, None, None, "candidate"),
        )
        log.log_search(
            LoggedSearch(
                search_id, now - 30, "q", "h", None, None, "docs__v1", 2, hits, f"s{i}", "interleaved"
            )
        )
        events.append(Event(f"e{i}", search_id, "b" if i else "a", None, "click", None, now - 20))
    log.record(events[:12], now=now)
    counted = tallies(log, canary, now=now)
    assert (
        (counted.wins, counted.losses, counted.events) == (11, 1, 12) == (11, 1, log.canary_events(now - 60))
    )
    # 11 to 1 (a fixed-horizon sign test's p = 0.006): evidence 19.5, short of 1/alpha = 20; wait
    assert counted.evidence is not None and counted.evidence["better"] == pytest.approx(19.5367, rel=1e-4)
    assert decide(canary, counted)[0] == "wait"
    log.record(events[12:], now=now)
    counted = tallies(log, canary, now=now)
    decision, why = decide(canary, counted)  # 14 to 1: decided before the budget (20 events) is spent
    assert (counted.wins, counted.losses) == (14, 1) and counted.p_value == pytest.approx(
        1 / 69.5308, rel=1e-4
    )
    assert decision == "promote" and "won 14, lost 1" in why and ">= 1/alpha = 20" in why
    late = canary.model_copy(update={"alpha": 0.001})  # not yet at 1/0.001: waits for more
    assert decide(late, counted)[0] == "wait"
    spent = late.model_copy(update={"max_events": 15})  # ... and the budget ends it: kept
    assert decide(spent, counted) == ("rollback", f"the candidate is not shown better within the budget: "
                                      f"{counted.summary()}")  # fmt: skip
    log.close()


def test_the_sequential_test_may_be_looked_at_after_every_event() -> None:
    """Under the null (the candidate wins half its decided searches) 1,000 canaries of up to 1,000
    searches, looked at after each: the sequential test promotes at most alpha of them, where the
    fixed-horizon sign test looked at as often promotes several times that; a clear win (70%) is
    decided within a few dozen searches."""
    rng = np.random.default_rng(7)
    looks = np.arange(1, 1001)

    def first_crossing(win_rate: float) -> tuple[NDArray[np.bool_], NDArray[np.float64]]:
        wins = np.cumsum(rng.random((1000, looks.size)) < win_rate, axis=1)
        crossed = log_evidence(wins, looks - wins) >= math.log(1 / 0.05)
        return wins, np.where(crossed.any(axis=1), crossed.argmax(axis=1) + 1.0, np.inf)

    wins, promoted = first_crossing(0.5)
    assert np.isfinite(promoted).mean() <= 0.05
    peeked = 2 * binom.cdf(np.minimum(wins, looks - wins), looks, 0.5) < 0.05  # the sign test, each look
    assert (peeked & (wins > looks - wins)).any(axis=1).mean() > 0.15
    _, clear = first_crossing(0.7)
    assert np.isfinite(clear).all() and np.median(clear) < 60


# -- a real retrain, a real server --------------------------------------------------------------


def _env(data: Path, tiny_models: TinyModelPaths, model_cache: Path) -> dict[str, str]:
    return {
        **os.environ, **TRAINING, "TWOSTAGE_DATA_DIR": str(data), "TWOSTAGE_CACHE_DIR": str(model_cache),
        "TWOSTAGE_DEVICE": "cpu", "TWOSTAGE_EMBEDDER__MODEL": str(tiny_models.embedder),
        "TWOSTAGE_RERANKER__MODEL": str(tiny_models.reranker),
    }  # fmt: skip


def _until(what: str, check: Callable[[], Any], seconds: float = 90) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    pytest.fail(f"waited {seconds} s for {what}")


def test_retrain_canary_feedback_promotes_then_an_interleaved_canary_is_rolled_back(
    tmp_path: Path, tiny_models: TinyModelPaths, model_cache: Path
) -> None:
    pairs = debian_rows("train.jsonl", 160)
    corpus = [{"id": r["package"], "text": r["positive"]} for r in pairs]
    corpus += [{"id": r["_id"], "text": r["text"]} for r in debian_rows("corpus.jsonl", 300)]
    write_jsonl(tmp_path / "corpus.jsonl", corpus)
    write_jsonl(
        tmp_path / "train.jsonl", [{"query": r["query"], "positive": r["positive"]} for r in pairs[:120]]
    )
    write_jsonl(
        tmp_path / "dev.jsonl", [{"query": r["query"] + " .", "positive": r["positive"]} for r in pairs[:40]]
    )
    env = _env(tmp_path / "data", tiny_models, model_cache)
    assert run_cli(["ingest", str(tmp_path / "corpus.jsonl"), "--quiet"], env).returncode == 0
    bad = run_cli(["retrain", "--pairs", str(tmp_path / "train.jsonl"), "--interleave"], env)
    assert bad.returncode == 2 and "give --canary SHARE too" in bad.stderr
    result = run_cli(["retrain", "--pairs", str(tmp_path / "train.jsonl"), "--dev", str(tmp_path / "dev.jsonl"),
                      "--skip-reranker", "--canary", "0.5", "--canary-events", "10", "--json"], env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads(result.stdout)
    assert run["decision"] == "canary" and "serves 50% of sessions (its ranking) beside d1" in result.stderr
    settings = Settings(
        data_dir=tmp_path / "data", cache_dir=model_cache, device="cpu", embedder={"model": str(tiny_models.embedder)},
        reranker={"model": str(tiny_models.reranker)}, retrain={"canary_check_s": 0.3},
        api={"alias_refresh_s": 0.2, "batch_wait_ms": 1},
    )  # fmt: skip
    registry = Registry(settings)
    assert registry.current().id == 1 and registry.canary().deployment == 2  # type: ignore[union-attr]
    again = run_cli(["retrain", "--pairs", str(tmp_path / "train.jsonl"), "--dry-run"], env)
    assert again.returncode == 2 and "the canary of deployment d2 is still being measured" in again.stderr
    listing = run_cli(["versions"], env).stdout
    assert "canary since" in listing and "50% of sessions see its ranking beside d1" in listing, listing
    queries = [r["query"] for r in pairs[:60]]

    with contextmanager(serve)(settings) as served:
        service = served.service
        assert service.served is not None and service.traffic is not None
        _until("the canary's models", lambda: service.served.canary("docs"))  # type: ignore[union-attr]
        replica = Service(settings, store=service.store)  # another replica of the same registry follows it
        replica.start()
        try:
            _until("the replica's canary", lambda: replica.served.canary("docs"))  # type: ignore[union-attr]
        finally:
            replica.close()

        def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
            response = httpx.post(served.url + path, json=body, timeout=120)
            assert response.status_code == 200, response.text
            return dict(response.json())

        answers = [post("/v1/search", {"query": q, "session": f"s{i}"}) for i, q in enumerate(queries)]
        arms = [in_share(2, f"s{i}", 0.5) for i in range(len(queries))]
        assert [a["collection"] for a in answers] == ["docs__v2" if arm else "docs__v1" for arm in arms]
        assert 10 < sum(arms) < 50
        assert post("/v1/search", {"query": "x", "session": "s0"})["collection"] == answers[0]["collection"]
        # the users click the candidate's top hit and never the control's: 10 events spend the budget
        clicks = [{"search_id": a["search_id"], "id": a["hits"][0]["id"], "event": "click"}
                  for a, arm in zip(answers, arms, strict=True) if arm]  # fmt: skip
        post("/v1/feedback", {"events": clicks})
        _until("the promotion", lambda: Registry(settings).current().id == 2)  # type: ignore[union-attr]
        outcome = Registry(settings).canary_outcomes()[2]
        assert outcome["decision"] == "promote" and Registry(settings).canary() is None
        assert outcome["tallies"]["successes"] == {"control": 0, "candidate": sum(arms)}
        _until(
            "the switch",
            lambda: post("/v1/search", {"query": "x", "session": "s0"})["collection"] == "docs__v2",
        )

        # an interleaved canary of the old deployment, whose picks the users never take: rolled back
        Registry(settings).set_canary(Canary(deployment=1, control=2, share=1.0, interleave=True, max_events=8,
                                             max_seconds=3600, alpha=0.05))  # fmt: skip
        _until("the interleaved canary", lambda: service.served.canary("docs"))  # type: ignore[union-attr]
        clicks = []
        for i, query in enumerate(queries[:12]):
            answer = post("/v1/search", {"query": query, "session": f"t{i}"})
            assert (
                answer["stages"][-1] == "interleave"
                and "interleaved with the canary deployment d1" in answer["notes"][-1]
            )
            shown = service.traffic.search(answer["search_id"])
            assert shown is not None and shown.arm == "interleaved"
            assert {h.team for h in shown.hits} == {"control", "candidate"}
            ours = next(h for h in shown.hits if h.team == "control")
            clicks.append({"search_id": answer["search_id"], "id": ours.id, "event": "click"})
        post("/v1/feedback", {"events": clicks})
        _until("the rollback", lambda: Registry(settings).canary() is None)
        outcome = Registry(settings).canary_outcomes()[1]
        assert outcome["decision"] == "rollback" and outcome["tallies"]["losses"] == 12, outcome
        assert Registry(settings).current().id == 2  # type: ignore[union-attr]
    table = run_cli(["versions"], env).stdout
    assert (
        "canary promote: the candidate is better" in table
        and "canary rollback: the candidate is worse" in table
    )
