"""The live protocol's wire events (docs/live.md): JSON objects told apart by `type`, versioned as a whole.

Client events validate through `CLIENT_EVENT` (a discriminated union on `type`); every server event carries
`session_id` (null only before `session.started`) and, when it belongs to a response, `response_id`.
Binary frames start with one byte that names what follows: AUDIO_FRAME (PCM16) or IMAGE_FRAME (JPEG).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from npc_server.api.schemas import Ident, PlayerAffect, TurnResponse

PROTOCOL_VERSION = 1
AUDIO_FRAME = 0x01  # binary frame: 0x01 + PCM16 little-endian mono 16 kHz samples
IMAGE_FRAME = 0x02  # binary frame: 0x02 + one JPEG image

EventId = Annotated[str, Field(min_length=1, max_length=64)]
Base64 = Annotated[str, Field(min_length=1, max_length=32 * 1024 * 1024)]  # the message size limit binds first


class ClientEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_id: EventId | None = Field(None, description="optional; echoed in the error or pong it causes")


class AudioFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    encoding: Literal["pcm16"] = "pcm16"
    sample_rate: Literal[16000] = 16000
    channels: Literal[1] = 1


class SessionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    turn_detection: Literal["server_vad", "none"] = Field(
        "server_vad", description="server_vad: the end of speech starts a response; none: response.create does"
    )
    silence_ms: int | None = Field(None, ge=200, le=5000, description="default: the server's NPC_LIVE_SILENCE_MS")
    barge_in: bool = Field(True, description="player speech during a reply cancels it")
    partial_transcripts: bool = Field(False, description="re-transcribe the growing utterance about once a second")
    affect_updates: bool = Field(True, description="player.affect from face frames between turns")


class SessionStart(ClientEvent):
    type: Literal["session.start"]
    protocol: int = Field(PROTOCOL_VERSION, ge=1, le=1000)
    npc_id: Ident
    player_id: Ident
    session_id: Ident | None = None
    audio: AudioFormat = Field(default_factory=AudioFormat)
    options: SessionOptions = Field(default_factory=SessionOptions)


class InputText(ClientEvent):
    type: Literal["input.text"]
    text: str = Field(min_length=1, max_length=20000)


class InputAudio(ClientEvent):
    type: Literal["input.audio"]
    audio: Base64 = Field(description="base64 PCM16 little-endian mono 16 kHz")


class InputImage(ClientEvent):
    type: Literal["input.image"]
    image: Base64 = Field(description="base64 JPEG")


class ResponseCreate(ClientEvent):
    type: Literal["response.create"]


class ResponseCancel(ClientEvent):
    type: Literal["response.cancel"]
    response_id: EventId | None = Field(None, description="only cancel this response; omitted: the current one")


class Ping(ClientEvent):
    type: Literal["ping"]


AnyClientEvent = Annotated[
    SessionStart | InputText | InputAudio | InputImage | ResponseCreate | ResponseCancel | Ping,
    Field(discriminator="type"),
]
CLIENT_EVENT: TypeAdapter[AnyClientEvent] = TypeAdapter(AnyClientEvent)
CLIENT_EVENT_TYPES = ("session.start", "input.text", "input.audio", "input.image", "response.create",
                      "response.cancel", "ping")  # fmt: skip


class ServerEvent(BaseModel):
    session_id: str | None


class NpcView(BaseModel):
    id: str
    name: str
    role: str
    greeting: str


class Limits(BaseModel):
    max_message_bytes: int
    max_text_chars: int
    max_audio_seconds: float = Field(description="audio this connection may stream in all")
    max_utterance_seconds: float
    max_fps: float
    max_messages_per_s: int
    idle_timeout_s: float


class SessionStarted(ServerEvent):
    type: Literal["session.started"] = "session.started"
    protocol: int = PROTOCOL_VERSION
    player_id: str
    npc: NpcView
    history_turns: int = Field(description="turns already stored in this conversation")
    audio: AudioFormat
    options: SessionOptions = Field(description="the options in force, defaults filled in")
    limits: Limits


class SpeechStarted(ServerEvent):
    type: Literal["input.speech.started"] = "input.speech.started"
    utterance_id: str
    audio_ms: float = Field(description="where the speech starts, in ms of audio received")


class SpeechStopped(ServerEvent):
    type: Literal["input.speech.stopped"] = "input.speech.stopped"
    utterance_id: str
    audio_ms: float = Field(description="where the turn was ended, in ms of audio received")
    duration_ms: float


class InputTranscript(ServerEvent):
    type: Literal["input.transcript"] = "input.transcript"
    response_id: str | None = None
    utterance_id: str
    text: str
    final: bool


class PlayerAffectEvent(ServerEvent):
    type: Literal["player.affect"] = "player.affect"
    response_id: str | None = None
    source: Literal["face", "voice", "turn"]
    affect: PlayerAffect


class ResponseStarted(ServerEvent):
    type: Literal["response.started"] = "response.started"
    response_id: str
    input: Literal["text", "audio", "none"]
    player_text: str = Field(description="the player's line as the NPC heard it")
    utterance_id: str | None = None


class ResponseTextDelta(ServerEvent):
    type: Literal["response.text.delta"] = "response.text.delta"
    response_id: str
    text: str = Field(description="whole sentences; the deltas concatenated equal response.done's text")


class NpcEmotion(ServerEvent):
    type: Literal["npc.emotion"] = "npc.emotion"
    response_id: str
    emotion: dict[str, Any]


class ResponseDone(ServerEvent):
    type: Literal["response.done"] = "response.done"
    response_id: str
    text: str
    turn: TurnResponse = Field(description="the object the HTTP turn endpoint answers with")
    timings_ms: dict[str, float] = Field(description="turn.timings_ms plus the live session's own timings")


class ResponseCancelled(ServerEvent):
    type: Literal["response.cancelled"] = "response.cancelled"
    response_id: str
    reason: Literal["client", "barge_in", "disconnect"]
    partial_text: str = Field(description="what was sent before the cut; stored in history as interrupted")
    cancel_ms: float = Field(description="from the cancel (event received, or speech detected) to this event")


class ErrorEvent(ServerEvent):
    type: Literal["error"] = "error"
    code: str
    message: str
    response_id: str | None = None
    event_id: str | None = None


class Pong(ServerEvent):
    type: Literal["pong"] = "pong"
    event_id: str | None = None
