"""Wire schemas: what clients send and receive. Every field is bounded."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Ident = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")]


class TurnRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    player_id: Ident = Field(description="Stable id of the player; conversations are kept per player and NPC.")
    session_id: Ident | None = Field(
        None, description="Continue or create this session; omitted: the player's latest session with this NPC."
    )
    text: str = Field(min_length=1, max_length=20000, description="What the player says.")


class TurnForm(BaseModel):
    """The plain fields of a multipart turn; `face` and `voice` are file parts."""

    model_config = ConfigDict(extra="forbid")

    player_id: Ident
    session_id: Ident | None = None
    text: str | None = Field(None, min_length=1, max_length=20000)


class Reply(BaseModel):
    text: str
    fallback: bool = Field(description="True when the model failed the character guard and a scripted line was used.")
    regenerated: bool


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    history_turns: int


class FaceAffect(BaseModel):
    found: bool
    frames: int
    frames_with_face: int
    box: tuple[float, float, float, float] | None = Field(description="x, y, w, h as fractions of the frame")
    expression: dict[str, float] = Field(description="probabilities over the 7 expressions")
    top: str | None
    valence: float
    arousal: float
    confidence: float


class ProsodyView(BaseModel):
    loudness_db: float
    pitch_hz: float
    pitch_range_semitones: float
    speaking_rate_wps: float
    pause_ratio: float
    speech_seconds: float
    duration_seconds: float


class VoiceAffect(BaseModel):
    speech_found: bool
    transcript: str
    transcript_confidence: float
    prosody: ProsodyView
    arousal: float
    confidence: float


class TextAffect(BaseModel):
    source: str = Field(description="'typed' or 'transcript'")
    emotion: dict[str, float]
    top: str
    sentiment: float
    valence: float
    arousal: float
    confidence: float


class FusedView(BaseModel):
    """The fusion model's reading of the player across the modalities that were read."""

    emotion: dict[str, float] = Field(description="probabilities over the 7 emotions")
    label: str
    valence: float
    arousal: float
    confidence: float
    modalities: list[str] = Field(description="the modalities that contributed")
    method: str = Field(description="attention, late, or a single modality")


class PlayerAffect(BaseModel):
    """What each modality perceived (null when not sent), and the fused affect."""

    face: FaceAffect | None = None
    voice: VoiceAffect | None = None
    text: TextAffect | None = None
    fused: FusedView | None = None


class NpcEmotion(BaseModel):
    label: str = Field(description="the persona's emotion label, e.g. contempt, tension, validation")
    intensity: float = Field(description="0..1")
    strength: str = Field(description="weak, normal or strong")


class NpcState(BaseModel):
    """The NPC's emotional state after this turn, for the game to animate."""

    emotion: NpcEmotion
    valence: float
    arousal: float
    trigger: str | None = Field(description="what moved it this turn: hostile, distressed, friendly, or null")


class TurnResponse(BaseModel):
    session_id: str
    npc_id: str
    player_text: str = Field(description="the player's line as the NPC heard it (typed text, or the transcript)")
    reply: Reply
    player_affect: PlayerAffect | None = None
    npc: NpcState | None = None
    usage: Usage
    timings_ms: dict[str, float]


class NpcSummary(BaseModel):
    id: str
    name: str
    role: str
    greeting: str


class HistoryTurn(BaseModel):
    role: str
    text: str
    created_at: float
    meta: dict[str, object]


class SessionView(BaseModel):
    session_id: str
    player_id: str
    npc_id: str
    created_at: float
    updated_at: float
    turns: list[HistoryTurn]


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
