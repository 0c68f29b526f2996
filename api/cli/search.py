"""`twostage search "QUERY"`: one search from the shell, through a server or on the store itself.

Where it runs: `--server URL` when given; else the server that holds this data directory's
store (`DATA/server.json`, written while one serves) or one answering on the configured
host and port; else the embedded store directly, loading the deployment's models here. A
store a server holds is searched through that server and never opened a second time.
"""

import argparse
import json
import shutil
from typing import Any

import httpx

from twostage.api.cli.training import positive_int
from twostage.api.settings import Settings
from twostage.retrieval.core.errors import InputError

MAX_TOP_K = 1000  # as the API's bound


def _request(args: argparse.Namespace) -> dict[str, Any]:
    """The `/v1/search` body the arguments describe (the same on both paths)."""
    if not args.query.strip():
        raise InputError("the query is empty")
    if args.top_k > MAX_TOP_K or args.top_n > args.top_k:
        raise InputError(f"need --top-n <= --top-k <= {MAX_TOP_K} (got {args.top_n} and {args.top_k})")
    body: dict[str, Any] = {"query": args.query, "top_k": args.top_k, "top_n": args.top_n}
    if args.instruction:
        body["instruction"] = args.instruction
    if args.no_rerank:
        body["rerank"] = False
    elif args.rerank:
        body["rerank"] = True
    if args.recall:
        body["recall"] = args.recall
    if args.rerank_k is not None:
        if args.rerank_k > args.top_k:
            raise InputError(f"need --rerank-k <= --top-k (got {args.rerank_k} and {args.top_k})")
        body["rerank_k"] = args.rerank_k
    if args.rerank_fusion is not None:
        body["rerank_fusion"] = args.rerank_fusion
    if args.collection:
        body["collection"] = args.collection
    if args.session:
        body["session"] = args.session
    if args.min_relevance is not None:
        if not 0 <= args.min_relevance <= 1:
            raise InputError(f"--min-relevance must be within [0, 1], got {args.min_relevance}")
        body["min_relevance"] = args.min_relevance
    if args.filter:
        try:
            body["filter"] = json.loads(args.filter)
        except ValueError as exc:
            raise InputError(f"--filter is not JSON: {exc}") from None
        if not isinstance(body["filter"], dict):
            raise InputError('--filter must be a JSON object, e.g. {"section": "games"}')
    return body


def _answering(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def find_server(settings: Settings) -> str | None:
    """The server to search through when none is named, or None (search the store here)."""
    from twostage.api.http.serving import public_url, running_server

    holder = running_server(settings)
    if holder is not None:
        return holder  # it holds the store: never open it twice, even if it does not answer yet
    configured = public_url(settings.api.host, settings.api.port)
    return configured if _answering(configured) else None


def _via_server(url: str, body: dict[str, Any], api_key: str | None) -> dict[str, Any]:
    from twostage.api.cli.client import request_json

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=300) as client:
        return request_json(client, "POST", "/v1/search", body)


def _embedded(settings: Settings, body: dict[str, Any]) -> dict[str, Any]:
    """The search the service would run, on this process's own store, loading only the models its
    plan uses (no `Service`: no batchers, refresher or job runner for one query)."""
    from dataclasses import asdict
    from functools import partial

    from pydantic import ValidationError

    from twostage.api.http.schemas import SearchRequest
    from twostage.retrieval.access.caller import OPERATOR, visible_filter
    from twostage.retrieval.core.errors import DatabaseUnavailable
    from twostage.retrieval.deployments.follower import load_served
    from twostage.retrieval.search.two_stage import needs_reranker, search
    from twostage.retrieval.store.collections import open_store
    from twostage.retrieval.traffic.log import TrafficLog, new_search_id

    try:
        request = SearchRequest.model_validate(body)
    except ValidationError as exc:  # what /v1/search would answer with 422, as one line
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InputError(f"the search is not valid: {problems}") from None
    store = open_store(settings)
    try:
        collection = request.collection or settings.collection
        # rerank=false (asked or configured) loads no reranker
        deployment = load_served(
            settings, store, collection, reranker=needs_reranker(settings, request.rerank)
        )
        # the data directory's own user: every document (what a server's admin key sees)
        visible = partial(visible_filter, OPERATOR, default_public=False)
        result = search(deployment, store, request.search_query(deployment, visible), settings)
        search_id = new_search_id()
        traffic = TrafficLog(settings.data_dir, settings.feedback)
        try:  # logged as the server logs it, so feedback may name it
            traffic.log_search(request.logged(search_id, result, deployment, OPERATOR))
        except DatabaseUnavailable as exc:  # as the server answers: the hits, without a search id
            result.notes.append(f"not logged: {exc}; feedback cannot name this search")
            return {"search_id": None, **asdict(result)}
        finally:
            traffic.close()
        return {"search_id": search_id, **asdict(result)}
    finally:
        store.close()


def citation(hit: dict[str, Any]) -> str:
    """Where a hit comes from, as a reader cites it: 'manual.pdf, p. 12-13 · Guide > Install'."""
    where = hit.get("source") or hit.get("doc_id", "")
    page, last = hit.get("page"), hit.get("page_end")
    if page is not None:
        where += f", p. {page}" + (f"-{last}" if last not in (None, page) else "")
    headings = " > ".join(hit.get("headings") or [])
    return f"{where} · {headings}" if headings else where


def _table(result: dict[str, Any]) -> str:
    """Rank, doc id, recall and rerank scores, the first line of text; then timings and notes."""
    width = max(shutil.get_terminal_size((120, 20)).columns, 80)
    lines = [f"{'rank':>4}  {'doc id':<28}  {'recall':>7}  {'rerank':>7}  {'relev.':>6}  text"]
    for hit in result["hits"]:
        rerank = "-" if hit["rerank_score"] is None else f"{hit['rerank_score']:.4f}"
        relevance = "-" if hit.get("relevance") is None else f"{hit['relevance']:.3f}"
        first = (hit["text"].strip().splitlines() or [""])[0]
        text = first[: width - 64] + ("…" if len(first) > width - 64 else "")
        lines.append(
            f"{hit['rank']:>4}  {hit['doc_id'][:28]:<28}  {hit['recall_score']:>7.4f}  {rerank:>7}  "
            f"{relevance:>6}  {text}"
        )
        if hit.get("page") is not None or hit.get("headings"):
            lines.append(f"{'':>6}{citation(hit)}")
    if not result["hits"]:
        lines.append("   (no hits)")
    timings = ", ".join(f"{k} {v:.1f} ms" for k, v in result["timings_ms"].items())
    recall = f"recall ({result.get('recall', 'dense')})"
    stages = " → ".join(result.get("stages", [])).replace("recall", recall)
    lines.append(f"{result['collection']} · {stages} · {timings}")
    lines += [f"note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines)


def search_command(args: argparse.Namespace) -> int:
    settings = Settings()
    body = _request(args)
    url = args.server or find_server(settings)
    if url:
        from twostage.api.http.serving import api_key

        result = _via_server(url, body, api_key(args.api_key, settings))
    else:
        result = _embedded(settings, body)
    print(json.dumps(result, indent=2) if args.json else _table(result))
    return 0


def add_search_command(commands: Any) -> None:
    search = commands.add_parser(
        "search", help="search the index: through a running server, or the store here"
    )
    search.add_argument("query", help="the query text")
    search.add_argument("--server", help="search through the service at this URL (default: see --help)")
    search.add_argument("--api-key", help="bearer key for the server (default: $TWOSTAGE_API_KEY)")
    search.add_argument("--collection", help="collection (alias) to search; default TWOSTAGE_COLLECTION")
    search.add_argument("--top-k", type=positive_int, default=50, help="chunks recalled by ANN (50)")
    search.add_argument("--top-n", type=positive_int, default=10, help="hits shown (10)")
    search.add_argument("--instruction", help="task instruction for the query prompt and the reranker")
    rerank = search.add_mutually_exclusive_group()
    rerank.add_argument("--no-rerank", action="store_true", help="first stage only")
    rerank.add_argument("--rerank", action="store_true", help="rerank even where the service would not")
    search.add_argument(
        "--recall", choices=("dense", "sparse", "hybrid"), help="first stage (default: the service's)"
    )
    search.add_argument(
        "--rerank-k", type=positive_int, help="recalled chunks the reranker sees (default: all)"
    )
    search.add_argument(
        "--rerank-fusion", choices=("rrf", "none"),
        help="order reranked hits by the reranker's rank fused with the recall rank (rrf) or by the "
        "reranker alone (none); default: the service's (TWOSTAGE_RERANKER__FUSION, rrf)",
    )  # fmt: skip
    search.add_argument("--filter", help='payload filter as JSON, e.g. \'{"source": {"any": ["a", "b"]}}\'')
    search.add_argument(
        "--min-relevance", type=float, metavar="P",
        help="drop hits whose calibrated relevance (0-1) is below P (a calibrated deployment only)",
    )  # fmt: skip
    search.add_argument("--session", help="the session this search belongs to (kept in the search log)")
    search.add_argument("--json", action="store_true", help="print the response as JSON (with its search_id)")
    search.set_defaults(handler=search_command)
