"""The persona file format (YAML), as a pydantic schema. Every field is bounded."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Line = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=600)]
Short = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=120)]
PersonaId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,47}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SpeakingStyle(_Strict):
    description: Line
    sample_phrases: list[Line] = Field(default_factory=list, max_length=20)


class Example(_Strict):
    """One example exchange: what a player says and how this NPC answers."""

    player: Line
    npc: Line


class Temperament(_Strict):
    """The NPC's resting mood and how strongly the player's affect moves it."""

    baseline_mood: Short = "neutral"
    valence: float = Field(0.0, ge=-1.0, le=1.0)  # resting pleasantness
    arousal: float = Field(0.3, ge=0.0, le=1.0)  # resting energy
    reactivity: float = Field(0.5, ge=0.0, le=1.0)  # how far one turn of player affect moves the mood
    # How this NPC responds to a player who seems hostile, distressed or friendly (an emotion label).
    when_hostile: Short = "annoyed"
    when_distressed: Short = "concerned"
    when_friendly: Short = "pleased"


class Generation(_Strict):
    """Optional sampling overrides; unset fields use the server defaults."""

    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=1000)
    repetition_penalty: float | None = Field(None, ge=1.0, le=2.0)
    max_new_tokens: int | None = Field(None, ge=8, le=512)
    # Phrases the model is never allowed to produce for this NPC (ruled out token by token while decoding)
    banned_phrases: list[Short] = Field(default_factory=list, max_length=64)


class ReplyLimits(_Strict):
    max_sentences: int = Field(3, ge=1, le=10)
    max_chars: int = Field(360, ge=40, le=2000)


class Persona(_Strict):
    id: PersonaId
    name: Short
    role: Short
    setting: Line
    backstory: Line
    personality: list[Short] = Field(min_length=1, max_length=12)
    speaking_style: SpeakingStyle
    knowledge: list[Line] = Field(default_factory=list, max_length=64)
    goals: list[Line] = Field(default_factory=list, max_length=12)
    greeting: Line
    examples: list[Example] = Field(default_factory=list, max_length=24)
    # Words or ideas this NPC cannot know (anachronisms): a reply that uses them is regenerated.
    cannot_know: list[Short] = Field(default_factory=list, max_length=64)
    is_machine: bool = False  # a machine may call itself an AI; nobody may call itself a language model
    temperament: Temperament = Temperament()
    reply: ReplyLimits = ReplyLimits()
    generation: Generation = Generation()
    # In-character lines used when the model's replies fail the guard twice.
    fallback_lines: list[Line] = Field(min_length=1, max_length=12)
