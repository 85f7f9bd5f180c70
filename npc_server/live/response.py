"""One response of a live session: a turn through the TurnService, as a task that can be cut off.

    response = Response(host, "audio", samples=utterance, utterance_id="utt_3", faces=frames)
    response.task = spawn(response.run(previous))       # previous: the response this one follows, if any
    response.cancel("barge_in")                          # -> response.cancelled once generation has stopped

Cancelling the task while it is inside the TurnService's reply stream closes that stream: the service records
the partial reply as interrupted and generation stops at the model's next decoding step.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import asdict, is_dataclass
from typing import Any, Literal, Protocol, cast

import numpy as np
from pydantic import BaseModel

from npc_server.api.schemas import TurnResponse
from npc_server.dialogue.service import ReplyDelta, TurnEvent, TurnInput, TurnResult, TurnService
from npc_server.errors import NpcError
from npc_server.live import protocol as p
from npc_server.live.vad import SAMPLE_RATE
from npc_server.perception.service import Perceived, Upload

log = logging.getLogger(__name__)

Kind = Literal["text", "audio", "none"]  # what ended the player's turn: typed text, speech, response.create
Reason = Literal["client", "barge_in", "disconnect"]
Render = Callable[[TurnResult, bool], TurnResponse]  # the HTTP answer object, built the same way here


class Host(Protocol):
    """What a response needs from its session."""

    service: TurnService
    render: Render
    session_id: str | None
    npc_id: str
    player_id: str

    def send(self, event: p.ServerEvent, *, droppable: bool = False) -> None: ...

    def error(self, code: str, message: str, *, response_id: str | None = None) -> None: ...

    def faces_failed(self) -> None: ...

    def perceived(self, perceived: Perceived, kind: Kind, response_id: str) -> None: ...


class Response:
    def __init__(
        self,
        host: Host,
        kind: Kind,
        *,
        text: str | None = None,
        samples: np.ndarray | None = None,
        utterance_id: str | None = None,
        faces: list[Upload] | None = None,
    ) -> None:
        self.host = host
        self.id = f"resp_{uuid.uuid4().hex[:16]}"
        self.kind = kind
        self.text = text
        self.samples = samples
        self.utterance_id = utterance_id
        self.faces = faces or []
        self.began = time.perf_counter()  # the end of the player's turn: speech end, text, or response.create
        self.task: asyncio.Task[None] | None = None
        self.started = False  # response.started was sent
        self.sent: list[str] = []
        self.cancel_reason: Reason | None = None
        self.cancel_at = 0.0

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    @property
    def cancellable(self) -> bool:
        return self.running and self.cancel_reason is None

    def cancel(self, reason: Reason) -> None:
        if self.cancellable:
            assert self.task is not None
            self.cancel_reason, self.cancel_at = reason, time.perf_counter()
            self.task.cancel()

    async def run(self, previous: Response | None) -> None:
        host, rid = self.host, self.id
        try:
            if previous is not None and previous.task is not None:
                await asyncio.wait([previous.task])  # its cut-off reply is stored before this turn reads history
            voice = None
            if self.samples is not None:
                voice = Upload(await asyncio.to_thread(_wav, self.samples), filename="utterance.wav")
            turn = TurnInput(host.npc_id, host.player_id, self.text, host.session_id, self.faces, voice)
            try:
                prepared = await host.service.prepare(turn)
            except NpcError as exc:
                if not turn.faces:
                    raise
                host.faces_failed()  # a bad frame must not sink the turn: answer without the face
                host.error("invalid_image_frame", f"face frames ignored: {exc.message}")
                turn.faces = []
                prepared = await host.service.prepare(turn)
            perceived = prepared.perceived
            if self.kind == "audio":
                heard = perceived.voice.transcript if perceived and perceived.voice else ""
                host.send(
                    p.InputTranscript(
                        session_id=host.session_id,
                        response_id=rid if heard else None,
                        utterance_id=self.utterance_id or "",
                        text=heard,
                        final=True,
                    )
                )
                if not heard:
                    return  # noise, not speech: no response
            if perceived is not None:
                host.perceived(perceived, self.kind, rid)
            await self._stream(prepared)
        except asyncio.CancelledError:
            if self.cancel_reason is None:
                raise
            carried = self.samples is not None and not self.started and self.cancel_reason == "barge_in"
            if not carried:  # a carried utterance is not lost: the session hears it again with the next one
                host.send(
                    p.ResponseCancelled(
                        session_id=host.session_id,
                        response_id=rid,
                        reason=self.cancel_reason,
                        partial_text="".join(self.sent),
                        cancel_ms=_ms(self.cancel_at),
                    )
                )
        except NpcError as exc:
            host.error(exc.code, exc.message, response_id=rid)
        except Exception:
            log.exception("live turn failed")
            host.error("internal_error", "the turn failed", response_id=rid)

    async def _stream(self, prepared: Any) -> None:
        host, rid = self.host, self.id
        timings: dict[str, float] = {}
        self.started = True
        host.send(
            p.ResponseStarted(
                session_id=host.session_id,
                response_id=rid,
                input=self.kind,
                player_text=prepared.player_text,
                utterance_id=self.utterance_id,
            )
        )
        timings["live_to_started_ms"] = _ms(self.began)
        result: TurnResult | None = None
        events = cast(AsyncGenerator[TurnEvent, None], host.service.respond(prepared))
        try:
            async for event in events:
                if isinstance(event, ReplyDelta):
                    timings.setdefault("live_to_first_delta_ms", _ms(self.began))
                    self.sent.append(event.text)
                    host.send(p.ResponseTextDelta(session_id=host.session_id, response_id=rid, text=event.text))
                else:
                    result = event
        finally:
            await events.aclose()
        assert result is not None
        timings["live_to_done_ms"] = _ms(self.began)
        emotion = _as_dict(getattr(result, "npc_emotion", None))
        if emotion is not None:
            host.send(p.NpcEmotion(session_id=host.session_id, response_id=rid, emotion=emotion))
        wire = host.render(result, self.kind == "text")
        timings = {**wire.timings_ms, **timings}
        host.send(
            p.ResponseDone(session_id=host.session_id, response_id=rid, text=result.text, turn=wire, timings_ms=timings)
        )


def _wav(samples: np.ndarray) -> bytes:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, samples, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _as_dict(value: object) -> dict[str, Any] | None:
    """The NPC's emotion as a JSON object, whatever the turn service reports it as."""
    if value is None:
        return None
    if isinstance(value, BaseModel):
        return value.model_dump()
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return dict(value) if isinstance(value, dict) else {"value": value}


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 1)
