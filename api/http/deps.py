"""Dependencies routes declare: the service, and the caller with the scope a route needs.

The caller is resolved once per request, here (`get_caller`: the bearer key through the service's
`KeyRing`), and handed to the route; nothing below reads headers. Every route names its scope
with one of the `*Access` dependencies or takes `CallerDep` and checks what it reads itself.
"""

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request

from twostage.api.runtime.service import Service
from twostage.retrieval.access.caller import Caller, Scope


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


def presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def get_caller(request: Request, service: ServiceDep) -> Caller:
    """The request's caller (401 for an unknown or revoked key), resolved once per request."""
    cached: Caller | None = getattr(request.state, "caller", None)
    if cached is None:
        cached = service.caller(presented_key(request))
        request.state.caller = cached
    return cached


CallerDep = Annotated[Caller, Depends(get_caller)]


def _scope(scope: Scope) -> Callable[[Caller], Caller]:
    def check(caller: CallerDep) -> Caller:
        caller.require(scope)
        return caller

    return check


SearchAccess = Depends(_scope("search"))
FeedbackAccess = Depends(_scope("feedback"))
IngestAccess = Depends(_scope("ingest"))
AdminAccess = Depends(_scope("admin"))
