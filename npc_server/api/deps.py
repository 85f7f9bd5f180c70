"""What routes need, taken from the app state that the lifespan fills."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from npc_server.dialogue.service import TurnService
from npc_server.errors import NotReady
from npc_server.state import AppState


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.npc
    return state


def get_service(request: Request) -> TurnService:
    state = get_state(request)
    if state.service is None:
        raise NotReady("models are still loading; retry when /readyz answers 200")
    return state.service


StateDep = Annotated[AppState, Depends(get_state)]
ServiceDep = Annotated[TurnService, Depends(get_service)]
