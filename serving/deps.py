"""FastAPI dependencies: the service of this app, and API-key authentication.

Both are ``async`` so FastAPI calls them inline instead of hopping to its thread pool per request.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from serving.service import EngageService

_bearer = HTTPBearer(auto_error=False, description="an API key from ENGAGE_API_KEYS")


async def get_service(request: Request) -> EngageService:
    return request.app.state.service


async def require_api_key(request: Request,
                    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """401 unless the bearer token is one of the configured keys (compared in constant time)."""
    supplied = credentials.credentials.encode() if credentials else b""
    keys: list[bytes] = request.app.state.api_keys
    # Compare against every key, whatever matched, so timing says nothing about which key is close.
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(supplied, key)
    if not ok:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or invalid API key (Authorization: Bearer <key>)",
                            headers={"WWW-Authenticate": "Bearer"})


ServiceDep = Annotated[EngageService, Depends(get_service)]
