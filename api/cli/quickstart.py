"""`twostage quickstart [PATH]`: models chosen, a corpus ingested, the service up, in one command.

1. Bind the API port (a port in use fails at once, naming it).
2. Choose the models: the configured ones when they load (a local directory, the hub cache,
   or the hub within a short timeout); otherwise, for a model left at its default, the
   offline models that install from PyPI. Two lines say which and why. A model the user
   named explicitly that does not load is an error, never silently replaced.
3. Save the choices in `DATA/settings.env`, so later commands on this data directory (serve,
   search, ingest, retrain) use the models that built its index; and, where no key is
   configured, make the data directory's admin key (`twostage keys`), printed, and saved for the
   CLI here (`DATA/cli.key`), so the server takes feedback and retrains from whoever holds it.
4. Ingest PATH, or the Debian sample shipped in the package; unchanged documents are skipped,
   so a second run is quick.
5. Serve, printing the search page's URL, a `curl` and a `twostage search` to try.

A general chat model used zero-shot as a yes/no reranker (the offline SmolLM2 fallback)
ranks worse than the first stage (the debian-ir data README measured MRR@10 0.557 -> 0.174),
so with it `rerank: "auto"` (the default) does not rerank: searches are reranked when a
request asks (`rerank: true`) or once `twostage retrain` has trained a reranker that measured
better than recall. The output says so.
"""

import argparse
import os
import shlex
from dataclasses import dataclass
from importlib.resources import as_file, files
from pathlib import Path

from twostage.api.settings import Settings
from twostage.retrieval.core.errors import InputError, ModelLoadError
from twostage.retrieval.core.settings import saved_settings_file

OFFLINE = {"embedder": "pypi:all-MiniLM-L6-v2", "reranker": "pypi:SmolLM2-135M-Instruct"}
# Offline models that are not trained to rank: rerank=auto does not apply them (`retrieval.search.trust`).
UNTRAINED_RERANKERS = {"pypi:SmolLM2-135M-Instruct"}
SAMPLE = "debian-sample.jsonl.gz"
EXAMPLE_QUERY = "play chess against the computer"
HUB_TIMEOUT_S = "5"


@dataclass(frozen=True)
class ModelChoice:
    """The model a role gets, and the sentence that says why."""

    role: str
    name: str
    why: str
    fell_back: bool


def _why_unavailable(exc: ModelLoadError) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    text = str(exc)
    if "unreachable" in text:
        return (
            "hub disabled (HF_HUB_OFFLINE), nothing cached" if offline else "hub unreachable, nothing cached"
        )
    return text.split(". ")[0]


def choose_model(
    role: str, configured: str, *, explicit: bool, revision: str | None, cache_dir: Path
) -> ModelChoice:
    """The configured model when it resolves; the offline one when a default model does not."""
    from twostage.retrieval.models.source import resolve_model

    try:
        source = resolve_model(configured, cache_dir=cache_dir, revision=revision)
    except ModelLoadError as exc:
        if explicit:
            raise
        fallback = OFFLINE[role]
        why = _why_unavailable(exc)
        try:
            resolve_model(fallback, cache_dir=cache_dir)
        except ModelLoadError as missing:
            raise ModelLoadError(f"{role} {configured}: {why}; offline fallback: {missing}") from exc
        return ModelChoice(role, fallback, f"{configured}: {why}", True)
    if configured.startswith("pypi:"):
        where = "offline model from PyPI"
    elif Path(configured).expanduser().exists():
        where = f"local directory {source.path}"
    else:
        where = f"hub model, revision {(source.revision or '?')[:12]} (cached)"
    return ModelChoice(role, configured, f"{configured}: {where}", False)


def _save_choices(choices: list[ModelChoice], settings: Settings) -> Path:
    """Record fallbacks in DATA/settings.env (kept lines of other keys stay), owner-only."""
    path = saved_settings_file()
    lines = path.read_text().splitlines() if path.exists() else []
    values = {f"TWOSTAGE_{c.role.upper()}__MODEL": c.name for c in choices if c.fell_back}
    kept = [ln for ln in lines if ln.split("=", 1)[0].strip() not in values]
    if values:
        path.parent.mkdir(parents=True, exist_ok=True)
        header = [] if kept else ["# written by twostage quickstart; environment variables override these"]
        path.write_text("\n".join(header + kept + [f"{k}={v}" for k, v in values.items()]) + "\n")
        path.chmod(0o600)
    return path


def quickstart(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", HUB_TIMEOUT_S)  # read when huggingface_hub is imported
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", HUB_TIMEOUT_S)
    from twostage.api.cli.ingest import ingest_local
    from twostage.api.http.serving import bind, data_dir_key, public_url, serve
    from twostage.retrieval.ingest.readers import CorpusReader

    settings = Settings()
    settings.api.host = args.host or settings.api.host
    settings.api.port = args.port or settings.api.port
    sock = bind(settings.api.host, settings.api.port)
    try:
        choices = [
            choose_model(
                role, part.model, explicit="model" in part.model_fields_set, revision=part.revision,
                cache_dir=settings.cache_dir,
            )
            for role, part in (("embedder", settings.embedder), ("reranker", settings.reranker))
        ]  # fmt: skip
        settings.embedder.model, settings.reranker.model = choices[0].name, choices[1].name
        rerank_line = ""
        untrained = settings.reranker.model in UNTRAINED_RERANKERS
        if untrained and settings.search.rerank == "auto":
            rerank_line = (
                "; a chat model used zero-shot, not trained to rank (it makes results worse): "
                "rerank=auto skips it, so searches are not reranked unless a request asks (rerank=true) "
                "or `twostage retrain` trains a reranker that measures better"
            )
        print(f"embedder: {choices[0].name} ({choices[0].why})", flush=True)
        print(f"reranker: {choices[1].name} ({choices[1].why}){rerank_line}", flush=True)
        saved = _save_choices(choices, settings)
        if saved.exists():
            print(f"saved in {saved}: later commands on this data directory use the same models",
                  flush=True)  # fmt: skip
        admin_key = None if settings.api.api_keys else data_dir_key(settings)
        if not args.path:  # the sample's records carry their Debian section: make it filterable
            settings.store.payload_indexes.setdefault("metadata.section", "keyword")
        with as_file(files("twostage.api.cli") / "samples" / SAMPLE) as sample:
            path = args.path or str(sample)
            reader = CorpusReader(path, settings.ingest.max_document_chars, workers=settings.ingest.workers)
            if reader.bytes_total == 0:
                raise InputError(f"corpus path {path!r} is empty (no JSONL lines, no documents we read)")
            print(f"ingesting {'the Debian sample (3,000 package descriptions)' if not args.path else path} "
                  f"into {settings.collection}", flush=True)  # fmt: skip
            report = ingest_local(settings, reader, settings.collection, quiet=args.quiet)
        print(report.summary(), flush=True)
        url = public_url(settings.api.host, sock.getsockname()[1])
        body = '{"query": "' + EXAMPLE_QUERY + '"}'
        announce = [
            f"twostage: serving {settings.collection} on {url}",
            f"  search page:  {url}/",
            f"  curl:         curl -s {url}/v1/search -H 'content-type: application/json' -d '{body}'",
            f"  CLI:          twostage search {shlex.quote(EXAMPLE_QUERY)}"
            + ("" if args.path else """ --filter '{"metadata.section": "games"}'"""),
            "  learn:        twostage retrain --pairs-from sample   (the sample's labelled queries; the gate "
            "decides, a promoted pair serves at once)",
            *(
                [
                    f"  admin key:    {admin_key}   (saved for the CLI here in the data directory's cli.key; "
                    "clients send it as a bearer token; twostage keys add makes narrower ones)"
                ]
                if admin_key
                else []
            ),
            "  stop with Ctrl-C",
        ]
        serve(settings, sock, announce=announce)
    finally:
        sock.close()
    return 0
