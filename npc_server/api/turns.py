"""POST /v1/npcs/{npc_id}/turns: one JSON answer, or server-sent events with `Accept: text/event-stream`."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from npc_server.api.deps import ServiceDep, StateDep
from npc_server.api.schemas import ErrorResponse, Reply, TurnRequest, TurnResponse, Usage
from npc_server.dialogue.service import ReplyDelta, TurnInput, TurnResult
from npc_server.errors import InvalidInput, NpcError

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/npcs", tags=["turns"])

ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (404, 409, 413, 422, 503)
}


def to_response(result: TurnResult) -> TurnResponse:
    return TurnResponse(
        session_id=result.session_id,
        npc_id=result.npc_id,
        reply=Reply(text=result.text, fallback=result.fallback, regenerated=result.regenerated),
        usage=Usage(**result.usage),
        timings_ms=result.timings_ms,
    )


@router.post(
    "/{npc_id}/turns",
    response_model=TurnResponse,
    responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}},
)
async def create_turn(
    npc_id: str, body: TurnRequest, request: Request, state: StateDep, service: ServiceDep
) -> TurnResponse | StreamingResponse:
    """The player says something; the NPC answers in character.

    With `Accept: text/event-stream` the reply streams as `reply.delta` events (whole sentences, in
    order), then one `turn.done` event holding the same object the JSON answer has.
    """
    if len(body.text) > state.settings.max_text_chars:
        raise InvalidInput(f"text: at most {state.settings.max_text_chars} characters", code="invalid_request")
    service.persona(npc_id)  # unknown NPC: 404 before any streaming starts
    turn = TurnInput(npc_id=npc_id, player_id=body.player_id, session_id=body.session_id, text=body.text)
    if "text/event-stream" in request.headers.get("accept", ""):
        return StreamingResponse(
            _sse(service.run(turn)), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )
    async for event in service.run(turn):
        if isinstance(event, TurnResult):
            return to_response(event)
    raise RuntimeError("turn ended without a result")


async def _sse(events: AsyncIterator[ReplyDelta | TurnResult]) -> AsyncIterator[str]:
    try:
        async for event in events:
            if isinstance(event, ReplyDelta):
                yield _frame("reply.delta", {"text": event.text})
            else:
                yield _frame("turn.done", to_response(event).model_dump())
    except NpcError as exc:
        yield _frame("error", {"error": {"code": exc.code, "message": exc.message}})
    except Exception:
        log.exception("turn failed while streaming")
        yield _frame("error", {"error": {"code": "internal_error", "message": "the turn failed"}})


def _frame(event: str, data: object) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"
