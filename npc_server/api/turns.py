"""POST /v1/npcs/{npc_id}/turns: JSON, or multipart with face frames and a voice clip.

One JSON answer, or server-sent events with `Accept: text/event-stream`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from npc_server.api.affect import npc_state, player_affect
from npc_server.api.deps import ServiceDep, StateDep
from npc_server.api.schemas import ErrorResponse, Reply, TurnForm, TurnRequest, TurnResponse, Usage
from npc_server.dialogue.service import ReplyDelta, TurnInput, TurnResult
from npc_server.errors import InvalidInput, NpcError, PayloadTooLarge
from npc_server.perception.service import Upload
from npc_server.settings import Settings

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/npcs", tags=["turns"])

MAX_FORM_FILES = 64  # parsing stops here; the per-field limits below are checked first
FORM_FIELDS = {"player_id", "session_id", "text", "face", "voice"}
REQUEST_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": TurnRequest.model_json_schema()},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["player_id"],
                "properties": {
                    "player_id": {"type": "string"},
                    "session_id": {"type": "string"},
                    "text": {"type": "string", "description": "optional when a voice clip is sent"},
                    "face": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "webcam frames: JPEG, PNG or WebP",
                    },
                    "voice": {"type": "string", "format": "binary", "description": "WAV, FLAC, OGG or MP3"},
                },
            }
        },
    },
}


def to_response(result: TurnResult, typed: bool) -> TurnResponse:
    return TurnResponse(
        session_id=result.session_id,
        npc_id=result.npc_id,
        player_text=result.player_text,
        reply=Reply(text=result.text, fallback=result.fallback, regenerated=result.regenerated),
        player_affect=player_affect(result.perceived, typed, result.affect),
        npc=npc_state(result.npc_emotion),
        usage=Usage(**result.usage),
        timings_ms=result.timings_ms,
    )


@router.post(
    "/{npc_id}/turns",
    response_model=TurnResponse,
    responses={
        **{code: {"model": ErrorResponse} for code in (404, 409, 413, 415, 422, 503)},
        200: {"content": {"text/event-stream": {}}},
    },
    openapi_extra={"requestBody": REQUEST_BODY},
)
async def create_turn(
    npc_id: str, request: Request, state: StateDep, service: ServiceDep
) -> TurnResponse | StreamingResponse:
    """The player speaks, types, or shows their face; the NPC answers in character.

    With `Accept: text/event-stream` the reply streams as `reply.delta` events (whole sentences, in
    order), then one `turn.done` event holding the same object the JSON answer has.
    """
    service.persona(npc_id)  # unknown NPC: 404 before reading uploads or streaming
    if request.headers.get("content-type", "").startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        turn = await _from_form(request, npc_id, state.settings)
    else:
        turn = await _from_json(request, npc_id, state.settings)
    typed = turn.text is not None
    prepared = await service.prepare(turn)
    if "text/event-stream" in request.headers.get("accept", ""):
        return StreamingResponse(
            _sse(service.respond(prepared), typed),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store"},
        )
    async for event in service.respond(prepared):
        if isinstance(event, TurnResult):
            return to_response(event, typed)
    raise RuntimeError("turn ended without a result")


async def _from_json(request: Request, npc_id: str, settings: Settings) -> TurnInput:
    try:
        body = TurnRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_input=False)) from None
    _check_text(body.text, settings)
    return TurnInput(npc_id=npc_id, player_id=body.player_id, session_id=body.session_id, text=body.text)


async def _from_form(request: Request, npc_id: str, settings: Settings) -> TurnInput:
    try:
        form = await request.form(max_files=MAX_FORM_FILES, max_fields=16, max_part_size=64 * 1024)
    except HTTPException as exc:  # Starlette's multipart limits and parse errors
        raise InvalidInput(f"form: {exc.detail}") from None
    unknown = sorted(set(form.keys()) - FORM_FIELDS)
    if unknown:
        raise InvalidInput(f"unknown form field '{unknown[0][:40]}'; expected {sorted(FORM_FIELDS)}")
    fields: dict[str, Any] = {}
    for name in ("player_id", "session_id", "text"):
        values = form.getlist(name)
        if len(values) > 1 or any(not isinstance(v, str) for v in values):
            raise InvalidInput(f"{name}: send one plain form value")
        if values:
            fields[name] = values[0]
    try:
        body = TurnForm.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_input=False)) from None
    faces = form.getlist("face")
    voices = form.getlist("voice")
    if len(faces) > settings.max_face_frames:
        raise InvalidInput(f"face: at most {settings.max_face_frames} images per turn (got {len(faces)})")
    if len(voices) > 1:
        raise InvalidInput(f"voice: send one clip per turn (got {len(voices)})")
    if body.text is None and not voices:
        raise InvalidInput("send text, a voice clip, or both")
    if body.text is not None:
        _check_text(body.text, settings)
    face_uploads = [await _read(f, "face", settings.max_image_bytes) for f in faces]
    voice = await _read(voices[0], "voice", settings.max_audio_bytes) if voices else None
    return TurnInput(
        npc_id=npc_id,
        player_id=body.player_id,
        session_id=body.session_id,
        text=body.text,
        faces=face_uploads,
        voice=voice,
    )


async def _read(item: UploadFile | str, field: str, limit: int) -> Upload:
    """The upload's bytes, refused by its size before it is read into memory."""
    if not isinstance(item, UploadFile):
        raise InvalidInput(f"{field}: must be a file upload")
    if item.size is not None and item.size > limit:
        raise PayloadTooLarge(f"{field}: file is {item.size} bytes; the limit is {limit}")
    data = await item.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"{field}: file is over the limit of {limit} bytes")
    return Upload(data=data, filename=None)


def _check_text(text: str, settings: Settings) -> None:
    if len(text) > settings.max_text_chars:
        raise InvalidInput(f"text: at most {settings.max_text_chars} characters", code="invalid_request")


async def _sse(events: AsyncIterator[ReplyDelta | TurnResult], typed: bool) -> AsyncIterator[str]:
    try:
        async for event in events:
            if isinstance(event, ReplyDelta):
                yield _frame("reply.delta", {"text": event.text})
            else:
                yield _frame("turn.done", to_response(event, typed).model_dump())
    except NpcError as exc:
        yield _frame("error", {"error": {"code": exc.code, "message": exc.message}})
    except Exception:
        log.exception("turn failed while streaming")
        yield _frame("error", {"error": {"code": "internal_error", "message": "the turn failed"}})


def _frame(event: str, data: object) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"
