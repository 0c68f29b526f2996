"""schemathesis over the app's own OpenAPI: every route, the write routes included (an API key
is configured and a collection ingested), with bounded examples; no request may get a 5xx.
Readiness (`/readyz`) answers 503 by design while not ready, so there only 200/503 are fine."""

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from helpers import Served, sample_settings, serve
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from twostage.retrieval.models.tiny import TinyModelPaths

pytestmark = pytest.mark.slow
KEY = {"Authorization": "Bearer secret-key"}


@pytest.fixture(scope="module")
def fuzzed(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: TinyModelPaths, model_cache: Path
) -> Iterator[Served]:
    yield from serve(sample_settings(tmp_path_factory.mktemp("fuzz-data"), tiny_models, model_cache, 30))


def test_no_route_answers_a_server_error(fuzzed: Served) -> None:
    """Each operation of the schema, driven by schemathesis' own case strategies (its pytest
    plugin is not used: it does not run on this pytest)."""
    api = schemathesis.openapi.from_url(fuzzed.url + "/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    routes = {f"{op.method.upper()} {op.path}" for op in operations}
    assert {"POST /v1/search", "POST /v1/documents", "DELETE /v1/documents/{doc_id}", "POST /v1/retrain",
            "POST /v1/embeddings", "POST /v2/rerank", "POST /rerank", "POST /embed", "GET /info",
            "GET /readyz", "POST /v1/feedback", "GET /v1/feedback/stats"} <= routes, routes  # fmt: skip
    calls: dict[str, int] = {}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def call(case: schemathesis.Case) -> None:
            calls[case.path] = calls.get(case.path, 0) + 1
            if case.path == "/readyz":
                assert case.call(headers=KEY).status_code in {200, 503}
                return
            case.call_and_validate(headers=KEY, checks=[not_a_server_error])

        call()
    assert len(calls) == len({op.path for op in operations}) and sum(calls.values()) >= 5 * len(operations), (
        calls
    )


def test_the_fuzzed_server_still_serves(fuzzed: Served) -> None:
    response = httpx.post(fuzzed.url + "/v1/search", json={"query": "a terminal program"}, timeout=60)
    assert response.status_code == 200 and response.json()["hits"]
