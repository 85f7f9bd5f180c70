from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from npc_server.api.deps import StateDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive (models may still be loading)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: StateDep) -> JSONResponse:
    """200 once every model is loaded and warm; 503 before."""
    if state.service is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ready", "model": state.service.runner.engine.name, "startup_ms": state.startup_ms})
