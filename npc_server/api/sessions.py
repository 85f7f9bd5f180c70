from __future__ import annotations

import asyncio

from fastapi import APIRouter, Path
from fastapi.responses import Response

from npc_server.api.deps import StateDep
from npc_server.api.schemas import HistoryTurn, SessionView
from npc_server.errors import NotFound

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])
SessionId = Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


@router.get("/{session_id}")
async def get_session(state: StateDep, session_id: str = SessionId) -> SessionView:
    """The session and its whole history, oldest turn first."""
    row = await asyncio.to_thread(state.store.get_session, session_id)
    if row is None:
        raise NotFound(f"no session with id '{session_id}'", code="session_not_found")
    turns = await asyncio.to_thread(state.store.turns, session_id)
    return SessionView(
        session_id=row.id,
        player_id=row.player_id,
        npc_id=row.npc_id,
        created_at=row.created_at,
        updated_at=row.updated_at,
        turns=[HistoryTurn(role=t.role, text=t.text, created_at=t.created_at, meta=t.meta) for t in turns],
    )


@router.delete("/{session_id}", status_code=204)
async def delete_session(state: StateDep, session_id: str = SessionId) -> Response:
    """Forget the session and its history."""
    if not await asyncio.to_thread(state.store.delete_session, session_id):
        raise NotFound(f"no session with id '{session_id}'", code="session_not_found")
    return Response(status_code=204)
