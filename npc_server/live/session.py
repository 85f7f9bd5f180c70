"""One live connection's state machine: limits, audio and turn detection, face frames, and the response task.

Transport-free: the router feeds it client messages (`handle_text`, `handle_bytes`) and sends what it puts
in its Outbox. Turns run through the same TurnService as HTTP (perception, prompting, memory); this module
only decides when a turn starts, what media it carries, and when it is cut off.

    session.start -> session.started
    input.text | end of speech (VAD) | response.create -> [input.transcript] player.affect response.started
        -> response.text.delta ... [npc.emotion] response.done
    response.cancel | player speech (barge-in) | text during a reply -> response.cancelled
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections import deque
from typing import Any, Literal

import numpy as np
from pydantic import ValidationError

from npc_server.api.affect import player_affect
from npc_server.dialogue.service import TurnService
from npc_server.errors import NpcError
from npc_server.live import protocol as p
from npc_server.live.flow import LiveHub, Outbox, TokenBucket
from npc_server.live.response import Kind, Render, Response
from npc_server.live.vad import SAMPLE_RATE, SpeechEnd, SpeechStart, TurnDetector, VadEvent
from npc_server.perception.audio import pcm16_to_float
from npc_server.perception.service import Perceived, Upload
from npc_server.settings import Settings
from npc_server.store.sqlite import SessionMismatch

log = logging.getLogger(__name__)


MAX_CHUNK_SECONDS = 1.0  # one audio frame; 20-100 ms is what clients should send
AUDIO_RATE, AUDIO_BURST_S = 1.25, 4.0  # audio may arrive at most this much faster than real time
AUDIO_QUEUE = 64  # chunks waiting for the VAD
TURN_FACES, FACE_WINDOW_S = 3, 10.0  # a turn uses the latest frames received in the window before it
AFFECT_INTERVAL_S = 1.0  # face-only player.affect updates between turns, at most this often
PARTIAL_INTERVAL_MS = 1000.0
THROTTLE_S = 1.0  # the same throttled error code is sent at most once per this many seconds
JPEG_MAGIC = b"\xff\xd8\xff"


class LiveSession:
    def __init__(self, service: TurnService, settings: Settings, hub: LiveHub, render: Render) -> None:
        self.service = service
        self.perception = service.perception
        self.settings = settings
        self.hub = hub
        self.render = render
        self.outbox = Outbox(settings.live_send_queue, lambda: self.request_close(4429, "client too slow"))
        self.session_id: str | None = None
        self.player_id = ""
        self.npc_id = ""
        self.options = p.SessionOptions()
        self.close_code: tuple[int, str] | None = None
        self.closing = asyncio.Event()

        self._messages = TokenBucket(settings.live_max_messages_per_s, settings.live_max_messages_per_s)
        self._frames = TokenBucket(settings.live_max_fps, max(1.0, settings.live_max_fps))
        self._audio_rate = TokenBucket(AUDIO_RATE, AUDIO_BURST_S)
        self._audio_seconds = 0.0
        self._throttled: dict[str, float] = {}
        self._faces: deque[tuple[float, bytes]] = deque(maxlen=TURN_FACES)
        self._latest = Perceived()  # the latest reading per modality, for player.affect
        self._typed = False  # whether the latest text reading is of typed text (else of a transcript)
        self._last_face_update = 0.0
        self._audio_q: asyncio.Queue[np.ndarray] = asyncio.Queue(maxsize=AUDIO_QUEUE)
        self._detector: TurnDetector | None = None
        self._manual: list[np.ndarray] = []  # turn_detection "none": audio until response.create
        self._utterances = 0
        self._utterance_id: str | None = None
        self._carry: np.ndarray | None = None  # a cut-off turn's utterance, continued by the next one
        self._last_partial_ms = 0.0
        self._response: Response | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- connection ------------------------------------------------------------------------------------------

    def request_close(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code = (code, reason)
            self.closing.set()

    def fail(self) -> None:
        self.error("internal_error", "the session failed")
        self.request_close(1011, "internal error")

    def idle_timeout(self) -> None:
        self.error("idle_timeout", f"no message for {self.settings.live_idle_timeout_s:g} s; closing")
        self.request_close(4408, "idle timeout")

    async def close(self) -> None:
        """Cut off the reply in flight (stored as interrupted), stop background work, wait until all is freed."""
        response = self._response
        if response is not None:
            response.cancel("disconnect")
        for task in self._tasks:
            if response is None or task is not response.task:
                task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=30.0)
        self.outbox.close()

    # -- incoming messages -----------------------------------------------------------------------------------

    async def handle_text(self, raw: str) -> None:
        if not self._admit(len(raw) if raw.isascii() else len(raw.encode())):
            return
        try:
            data = json.loads(raw)
        except ValueError:
            self.error("invalid_json", "the message is not valid JSON")
            return
        event_id = data.get("event_id") if isinstance(data, dict) else None
        event_id = event_id if isinstance(event_id, str) and len(event_id) <= 64 else None
        try:
            event = p.CLIENT_EVENT.validate_python(data)
        except ValidationError as exc:
            self._invalid(exc, data, event_id)
            return
        if self.session_id is None and not isinstance(event, p.SessionStart | p.Ping):
            self.error("session_not_started", "send session.start first", event_id=event_id)
            return
        await self._dispatch(event)

    async def handle_bytes(self, data: bytes) -> None:
        if not self._admit(len(data)):
            return
        if self.session_id is None:
            self.error("session_not_started", "send session.start first")
        elif data[:1] == bytes([p.AUDIO_FRAME]):
            self._audio(data[1:])
        elif data[:1] == bytes([p.IMAGE_FRAME]):
            self._image(data[1:])
        else:
            self.error("invalid_binary_frame", "a binary frame starts with 0x01 (PCM16 audio) or 0x02 (JPEG)")

    def _admit(self, size: int) -> bool:
        limit = self.settings.live_max_message_bytes
        if size > limit:
            self.error("message_too_large", f"the message is {size} bytes; the limit is {limit}")
            return False
        if not self._messages.take():
            self.error("rate_limited", "too many messages; some were dropped", throttle=True)
            return False
        return True

    def _invalid(self, exc: ValidationError, data: object, event_id: str | None) -> None:
        err = exc.errors(include_input=False, include_url=False)[0]
        if err["type"] == "union_tag_invalid" and isinstance(data, dict):
            kind = str(data.get("type"))[:40]
            expected = ", ".join(p.CLIENT_EVENT_TYPES)
            self.error("unknown_event", f"unknown event type '{kind}'; expected one of {expected}", event_id=event_id)
            return
        where = ".".join(str(x) for x in err.get("loc", ())[1:])[:80] or "type"
        if err["type"] in ("union_tag_not_found", "model_attributes_type"):
            where, err["msg"] = "type", "every event is a JSON object with a 'type'"
        self.error("invalid_event", f"{where}: {err['msg']}", event_id=event_id)

    async def _dispatch(self, event: p.ClientEvent) -> None:
        if isinstance(event, p.Ping):
            self.send(p.Pong(session_id=self.session_id, event_id=event.event_id))
        elif isinstance(event, p.SessionStart):
            await self._start(event)
        elif isinstance(event, p.ResponseCancel):
            response = self._response
            if response is None or not response.cancellable:
                self.error("no_active_response", "no response is in progress", event_id=event.event_id)
            elif event.response_id not in (None, response.id):
                self.error("response_not_found", "that response is not in progress", event_id=event.event_id)
            else:
                response.cancel("client")
        elif isinstance(event, p.InputText):
            if len(event.text) > self.settings.max_text_chars:
                limit = self.settings.max_text_chars
                self.error("invalid_event", f"text: at most {limit} characters", event_id=event.event_id)
            else:
                self._begin("text", text=event.text)
        elif isinstance(event, p.ResponseCreate):
            self._respond_now(event.event_id)
        elif isinstance(event, p.InputAudio | p.InputImage):
            encoded = event.audio if isinstance(event, p.InputAudio) else event.image
            try:
                payload = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                self.error("invalid_event", "not valid base64", event_id=event.event_id)
                return
            self._audio(payload) if isinstance(event, p.InputAudio) else self._image(payload)

    async def _start(self, event: p.SessionStart) -> None:
        if self.session_id is not None:
            self.error("session_already_started", "session.start was already sent", event_id=event.event_id)
            return
        if event.protocol != p.PROTOCOL_VERSION:
            message = f"protocol {event.protocol} is not supported; this server speaks {p.PROTOCOL_VERSION}"
            self.error("unsupported_protocol", message, event_id=event.event_id)
            return
        try:
            persona = self.service.persona(event.npc_id)
            store = self.service.store
            session = await asyncio.to_thread(store.open_session, event.player_id, event.npc_id, event.session_id)
        except NpcError as exc:
            self.error(exc.code, exc.message, event_id=event.event_id)
            return
        except SessionMismatch:
            self.error("session_conflict", "session_id belongs to another player or NPC", event_id=event.event_id)
            return
        history = await asyncio.to_thread(store.turns, session.id)
        silence_ms = event.options.silence_ms or self.settings.live_silence_ms
        options = event.options.model_copy(update={"silence_ms": silence_ms})
        if self.perception is not None and options.turn_detection == "server_vad":
            silence, longest = options.silence_ms or 0, self._max_utterance_s
            self._detector = await asyncio.to_thread(lambda: TurnDetector(silence_ms=silence, max_seconds=longest))
            self._spawn(self._audio_worker())
        self.session_id, self.player_id, self.npc_id, self.options = session.id, event.player_id, persona.id, options
        s = self.settings
        self.send(
            p.SessionStarted(
                session_id=session.id,
                player_id=event.player_id,
                npc=p.NpcView(id=persona.id, name=persona.name, role=persona.role, greeting=persona.greeting),
                history_turns=len(history),
                audio=event.audio,
                options=options,
                limits=p.Limits(
                    max_message_bytes=s.live_max_message_bytes,
                    max_text_chars=s.max_text_chars,
                    max_audio_seconds=s.live_max_audio_seconds,
                    max_utterance_seconds=self._max_utterance_s,
                    max_fps=s.live_max_fps,
                    max_messages_per_s=s.live_max_messages_per_s,
                    idle_timeout_s=s.live_idle_timeout_s,
                ),
            )
        )

    @property
    def _max_utterance_s(self) -> float:
        return max(1.0, self.settings.max_audio_seconds - 0.5)  # perception refuses longer clips

    # -- media -----------------------------------------------------------------------------------------------

    def _audio(self, pcm: bytes) -> None:
        if self.perception is None:
            self.error("perception_disabled", "this server runs without perception; audio is ignored", throttle=True)
            return
        seconds = len(pcm) / (2 * SAMPLE_RATE)
        if not pcm or len(pcm) % 2 or seconds > MAX_CHUNK_SECONDS:
            self.error("invalid_audio_frame", "audio frames are PCM16 mono 16 kHz, an even byte count, at most 1 s")
            return
        if self._audio_seconds + seconds > self.settings.live_max_audio_seconds:
            limit = self.settings.live_max_audio_seconds
            self.error("audio_limit_reached", f"this connection streamed its {limit:g} s of audio", throttle=True)
            return
        if not self._audio_rate.take(seconds):
            self.error("rate_limited", "audio is arriving faster than real time; some was dropped", throttle=True)
            return
        self._audio_seconds += seconds
        samples = pcm16_to_float(pcm)
        if self._detector is None:  # turn_detection "none": held until response.create
            if sum(c.size for c in self._manual) + samples.size > self._max_utterance_s * SAMPLE_RATE:
                self.error("audio_buffer_full", "send response.create; the audio buffer is full", throttle=True)
                return
            self._manual.append(samples)
            return
        try:
            self._audio_q.put_nowait(samples)
        except asyncio.QueueFull:
            self.error("audio_overrun", "the server is behind on audio; some was dropped", throttle=True)

    def _image(self, data: bytes) -> None:
        if self.perception is None:
            self.error("perception_disabled", "this server runs without perception; images are ignored", throttle=True)
            return
        if not data.startswith(JPEG_MAGIC):
            self.error("invalid_image_frame", "face frames are JPEG images")
            return
        if len(data) > self.settings.max_image_bytes:
            self.error("message_too_large", f"a face frame is at most {self.settings.max_image_bytes} bytes")
            return
        if not self._frames.take():
            fps = self.settings.live_max_fps
            self.error("rate_limited", f"face frames over {fps:g} per second are dropped", throttle=True)
            return
        self._faces.append((time.monotonic(), data))
        busy = self._response is not None or (self._detector is not None and self._detector.speaking)
        now = time.monotonic()
        due = now - self._last_face_update >= AFFECT_INTERVAL_S
        if self.options.affect_updates and due and not busy and not self.hub.optional.locked():
            self._last_face_update = now
            self._spawn(self._face_update(data))

    def _recent_faces(self) -> list[Upload]:
        cutoff = time.monotonic() - FACE_WINDOW_S
        return [Upload(data=d, filename=None) for at, d in self._faces if at >= cutoff]

    async def _face_update(self, frame: bytes) -> None:
        assert self.perception is not None
        async with self.hub.optional:
            try:
                perceived = await self.perception.perceive(None, [Upload(frame)], None)
            except NpcError:
                self._faces.clear()
                self.error("invalid_image_frame", "a face frame could not be decoded", throttle=True)
                return
        self._latest.face = perceived.face
        self._affect("face", droppable=True)

    async def _audio_worker(self) -> None:
        detector = self._detector
        assert detector is not None
        while True:
            chunks = [await self._audio_q.get()]
            while not self._audio_q.empty():
                chunks.append(self._audio_q.get_nowait())
            events = await asyncio.to_thread(detector.feed, np.concatenate(chunks))
            for event in events:
                self._on_vad(event)
            if self.options.partial_transcripts and detector.speaking:
                self._maybe_partial(detector)

    def _on_vad(self, event: VadEvent) -> None:
        if isinstance(event, SpeechStart):
            self._utterances += 1
            self._utterance_id = f"utt_{self._utterances}"
            self._last_partial_ms = 0.0
            self.send(
                p.SpeechStarted(session_id=self.session_id, utterance_id=self._utterance_id, audio_ms=event.at_ms)
            )
            response = self._response
            if response is not None and response.cancellable and self.options.barge_in:
                if not response.started and response.samples is not None:
                    self._carry = response.samples  # still thinking: the player kept talking; hear it all as one
                response.cancel("barge_in")
            return
        assert isinstance(event, SpeechEnd)
        samples = event.samples
        if self._carry is not None:
            samples = np.concatenate([self._carry, np.zeros(SAMPLE_RATE * 3 // 10, np.float32), samples])
            self._carry = None
        uid = self._utterance_id or "utt_0"
        duration = samples.size * 1000 / SAMPLE_RATE
        self.send(
            p.SpeechStopped(session_id=self.session_id, utterance_id=uid, audio_ms=event.at_ms, duration_ms=duration)
        )
        self._begin("audio", samples=samples, utterance_id=uid)

    def _maybe_partial(self, detector: TurnDetector) -> None:
        if detector.utterance_ms - self._last_partial_ms < PARTIAL_INTERVAL_MS or self.hub.optional.locked():
            return
        self._last_partial_ms = detector.utterance_ms
        samples = detector.snapshot()
        if self._carry is not None:
            samples = np.concatenate([self._carry, samples])
        self._spawn(self._partial(samples, self._utterance_id or "utt_0"))

    async def _partial(self, samples: np.ndarray, utterance_id: str) -> None:
        """Re-transcribe the growing utterance (Whisper is not a streaming model): about 0.6 s of CPU each."""
        assert self.perception is not None
        async with self.hub.optional:
            try:
                reading = await asyncio.to_thread(self.perception.voice.analyze_samples, samples)
            except NpcError:
                return
        if utterance_id != self._utterance_id or self._detector is None or not self._detector.speaking:
            return  # the utterance ended meanwhile; its final transcript is on the way
        self.send(
            p.InputTranscript(
                session_id=self.session_id, utterance_id=utterance_id, text=reading.transcript, final=False
            ),
            droppable=True,
        )
        self._latest.voice = reading
        self._affect("voice", droppable=True)

    # -- responses -------------------------------------------------------------------------------------------

    def _respond_now(self, event_id: str | None) -> None:
        """response.create: the buffered or ongoing speech ends the player's turn; with none, the NPC goes on."""
        if self._detector is not None and self._detector.speaking:
            end = self._detector.commit()
            if end is not None:
                self._on_vad(end)
                return
        if self._manual:
            samples = np.concatenate(self._manual)
            self._manual = []
            self._utterances += 1
            self._begin("audio", samples=samples, utterance_id=f"utt_{self._utterances}")
        elif self._response is not None:
            self.error("response_in_progress", "a response is in progress; cancel it first", event_id=event_id)
        else:
            self._begin("none")

    def _begin(
        self, kind: Kind, *, text: str | None = None, samples: np.ndarray | None = None, utterance_id: str | None = None
    ) -> None:
        previous = self._response
        if previous is not None and previous.running and (self.options.barge_in or kind != "audio"):
            previous.cancel("barge_in")  # else the utterance waits for the reply to finish
        faces = self._recent_faces()
        response = Response(self, kind, text=text, samples=samples, utterance_id=utterance_id, faces=faces)
        response.task = self._spawn(response.run(previous))
        response.task.add_done_callback(lambda _: self._finished(response))
        self._response = response

    def _finished(self, response: Response) -> None:
        if self._response is response:
            self._response = None

    # -- what responses call back ----------------------------------------------------------------------------

    def perceived(self, perceived: Perceived, kind: Kind, response_id: str) -> None:
        """A turn's perception: the latest reading per modality, sent as player.affect before response.started."""
        self._latest = Perceived(
            face=perceived.face or self._latest.face,
            voice=perceived.voice or self._latest.voice,
            text=perceived.text or self._latest.text,
        )
        if perceived.text is not None:
            self._typed = kind == "text"
        self._affect("turn", response_id=response_id)

    def faces_failed(self) -> None:
        self._faces.clear()

    # -- outgoing --------------------------------------------------------------------------------------------

    def _affect(
        self, source: Literal["face", "voice", "turn"], *, response_id: str | None = None, droppable: bool = False
    ) -> None:
        affect = player_affect(self._latest, self._typed)
        if affect is not None:
            event = p.PlayerAffectEvent(
                session_id=self.session_id, response_id=response_id, source=source, affect=affect
            )
            self.send(event, droppable=droppable)

    def send(self, event: p.ServerEvent, *, droppable: bool = False) -> None:
        self.outbox.put(event, droppable=droppable)

    def error(
        self,
        code: str,
        message: str,
        *,
        throttle: bool = False,
        event_id: str | None = None,
        response_id: str | None = None,
    ) -> None:
        if throttle:
            now = time.monotonic()
            if now - self._throttled.get(code, -THROTTLE_S) < THROTTLE_S:
                return
            self._throttled[code] = now
        self.send(
            p.ErrorEvent(
                session_id=self.session_id, code=code, message=message, event_id=event_id, response_id=response_id
            )
        )

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("live session task failed", exc_info=task.exception())
            self.fail()
