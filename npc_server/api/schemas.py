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


class Reply(BaseModel):
    text: str
    fallback: bool = Field(description="True when the model failed the character guard and a scripted line was used.")
    regenerated: bool


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    history_turns: int


class TurnResponse(BaseModel):
    session_id: str
    npc_id: str
    reply: Reply
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
