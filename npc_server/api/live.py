"""WebSocket /v1/live: moves messages between the socket and a LiveSession (docs/live.md).

Three tasks per connection: receive (with the idle timeout), send (drains the session's bounded outbox, so a
slow client only ever blocks itself), and the session's own close request. Whichever ends first ends the
connection; the session is then closed, which cuts off a reply in flight and frees what it held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import APIRouter, WebSocket

from npc_server.api.turns import to_response
from npc_server.live.flow import LiveHub, Outbox
from npc_server.live.protocol import ErrorEvent
from npc_server.live.session import LiveSession
from npc_server.state import AppState

log = logging.getLogger(__name__)
router = APIRouter(tags=["live"])

CLOSE_TRY_AGAIN = 1013  # models loading, or the connection limit reached


@router.websocket("/v1/live")
async def live(websocket: WebSocket) -> None:
    state: AppState = websocket.app.state.npc
    hub: LiveHub = websocket.app.state.live
    await websocket.accept()
    if state.service is None:
        await _refuse(websocket, "not_ready", "models are still loading; retry when /readyz answers 200")
        return
    if not hub.enter():
        await _refuse(websocket, "server_busy", "too many live connections; retry later")
        return
    session = LiveSession(state.service, state.settings, hub, to_response)
    sender = asyncio.create_task(_send(websocket, session.outbox))
    receiver = asyncio.create_task(_receive(websocket, session, state.settings.live_idle_timeout_s))
    closing = asyncio.create_task(session.closing.wait())
    try:
        await asyncio.wait({sender, receiver, closing}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        receiver.cancel()
        closing.cancel()
        await session.close()  # also closes the outbox: the sender drains it, then stops
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sender, timeout=2.0)
        if session.close_code is not None:
            code, reason = session.close_code
            with contextlib.suppress(Exception):  # the client may be gone already
                await websocket.close(code, reason)
        hub.leave()


async def _receive(websocket: WebSocket, session: LiveSession, idle_timeout_s: float) -> None:
    try:
        while True:
            try:
                message = await asyncio.wait_for(websocket.receive(), timeout=idle_timeout_s)
            except TimeoutError:
                session.idle_timeout()
                return
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await session.handle_text(message["text"])
            elif message.get("bytes") is not None:
                await session.handle_bytes(message["bytes"])
    except Exception:
        log.exception("live session failed")
        session.fail()


async def _send(websocket: WebSocket, outbox: Outbox) -> None:
    try:
        while (text := await outbox.get()) is not None:
            await websocket.send_text(text)
    except Exception:  # the client went away; the receiver sees the disconnect
        log.debug("live send stopped", exc_info=True)


async def _refuse(websocket: WebSocket, code: str, message: str) -> None:
    await websocket.send_text(ErrorEvent(session_id=None, code=code, message=message).model_dump_json())
    await websocket.close(CLOSE_TRY_AGAIN, code)
