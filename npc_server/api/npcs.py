from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from npc_server.api.deps import StateDep
from npc_server.api.schemas import NpcSummary
from npc_server.errors import NotFound

router = APIRouter(prefix="/v1/npcs", tags=["npcs"])


@router.get("")
async def list_npcs(state: StateDep) -> dict[str, list[NpcSummary]]:
    """Every NPC whose persona file loaded."""
    return {
        "npcs": [NpcSummary(id=p.id, name=p.name, role=p.role, greeting=p.greeting) for p in state.personas.values()]
    }


@router.get("/{npc_id}")
async def get_npc(npc_id: str, state: StateDep) -> dict[str, Any]:
    """The whole persona, as its file defines it."""
    persona = state.personas.get(npc_id)
    if persona is None:
        raise NotFound(f"no NPC with id '{npc_id[:64]}'", code="npc_not_found")
    return persona.model_dump()
