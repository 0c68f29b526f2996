"""Dependencies routes declare: the service, and the API-key checks."""

import hmac
from typing import Annotated

from fastapi import Depends, Request

from twostage.api.http.errors import Forbidden, Unauthorized
from twostage.api.runtime.service import Service


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


def presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _key_matches(presented: str, service: Service) -> bool:
    """Constant-time comparison against every configured key (no early exit on a match)."""
    matched = False
    for key in service.settings.api.api_keys:
        matched |= hmac.compare_digest(presented.encode(), key.get_secret_value().encode())
    return matched


def require_read_key(request: Request, service: ServiceDep) -> None:
    """Reads need a key only when `api.keys_for_reads` is set."""
    if service.settings.api.keys_for_reads:
        _check(request, service)


def require_write_key(request: Request, service: ServiceDep) -> None:
    """Writes always need a key; with none configured, write routes are disabled."""
    if not service.settings.api.api_keys:
        raise Forbidden("write routes are disabled: configure TWOSTAGE_API__API_KEYS")
    _check(request, service)


def _check(request: Request, service: ServiceDep) -> None:
    presented = presented_key(request)
    if presented is None or not _key_matches(presented, service):
        raise Unauthorized("missing or invalid API key")


ReadAccess = Depends(require_read_key)
WriteAccess = Depends(require_write_key)
