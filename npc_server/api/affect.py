"""Perception readings as wire objects (feature vectors and word timings stay on the server)."""

from __future__ import annotations

from dataclasses import asdict

from npc_server.api.schemas import (
    FaceAffect,
    FusedView,
    NpcEmotion,
    NpcState,
    PlayerAffect,
    ProsodyView,
    TextAffect,
    VoiceAffect,
)
from npc_server.dialogue.mood import NpcMood
from npc_server.fusion.model import FusedAffect
from npc_server.perception.service import Perceived


def _top(probs: dict[str, float]) -> str | None:
    return max(probs, key=probs.__getitem__) if probs else None


def npc_state(mood: NpcMood | None) -> NpcState | None:
    if mood is None:
        return None
    return NpcState(
        emotion=NpcEmotion(label=mood.label, intensity=round(mood.intensity, 4), strength=mood.strength),
        valence=round(mood.valence, 4),
        arousal=round(mood.arousal, 4),
        trigger=mood.trigger,
    )


def player_affect(p: Perceived | None, typed: bool, fused: FusedAffect | None = None) -> PlayerAffect | None:
    if p is None:
        return None
    out = PlayerAffect(fused=FusedView(**fused.to_dict()) if fused is not None else None)
    if p.face is not None:
        f = p.face
        out.face = FaceAffect(
            found=f.found,
            frames=f.frames,
            frames_with_face=f.frames_with_face,
            box=f.box,
            expression=f.expression,
            top=_top(f.expression),
            valence=f.valence,
            arousal=f.arousal,
            confidence=f.confidence,
        )
    if p.voice is not None:
        v = p.voice
        out.voice = VoiceAffect(
            speech_found=v.speech_found,
            transcript=v.transcript,
            transcript_confidence=v.transcript_confidence,
            prosody=ProsodyView(**asdict(v.prosody)),
            arousal=v.arousal,
            confidence=v.confidence,
        )
    if p.text is not None:
        t = p.text
        out.text = TextAffect(
            source="typed" if typed else "transcript",
            emotion=t.emotion,
            top=_top(t.emotion) or "neutral",
            sentiment=t.sentiment,
            valence=t.valence,
            arousal=t.arousal,
            confidence=t.confidence,
        )
    return out
