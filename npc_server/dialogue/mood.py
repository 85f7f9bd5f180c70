"""The NPC's own emotional state: moved each turn by the player's fused affect and the persona's temperament.

Each turn:
1. decay: valence and arousal move DECAY of the way back to the persona's resting point; the current emotion's
   intensity fades by the same share, and below FADED the NPC is back in its baseline mood;
2. react: the player's affect is read as a stance (STANCES: hostile = angry + disgust, distressed = sad + fear,
   friendly = happy + pleasant surprise); the strongest stance over STANCE_MIN picks the temperament's
   reaction (when_hostile / when_distressed / when_friendly). Its strength is
       GAIN * reactivity * affect confidence * stance score (* (0.6 + 0.4 * player arousal) when hostile,
       so shouting counts for more), capped at 1;
   valence and arousal move that share of the way toward the reaction's point (REACTION_AFFECT), and the
   reaction becomes the NPC's emotion when it is at least as strong as the faded current one (the same
   emotion again accumulates).
Labels are the persona's own (Inworld/SPAFF-style names: contempt, tension, validation, ...).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from npc_server.fusion.model import FusedAffect
from npc_server.personas.schema import Temperament

DECAY = 0.35
FADED = 0.15
STANCE_MIN = 0.35
GAIN = 1.5
RESTING_INTENSITY = 0.3  # of a baseline mood other than neutral (a nervous innkeeper is a little tense at rest)

STANCES: dict[str, tuple[str, ...]] = {
    "hostile": ("angry", "disgust"),
    "distressed": ("sad", "fear"),
    "friendly": ("happy",),
}

# Resting-point coordinates (valence -1..1, arousal 0..1) of the emotion labels personas use; others fall back
# to their stance's default.
REACTION_AFFECT: dict[str, tuple[float, float]] = {
    "neutral": (0.0, 0.3), "joy": (0.8, 0.65), "humor": (0.6, 0.55), "affection": (0.7, 0.4),
    "validation": (0.5, 0.35), "interest": (0.3, 0.5), "surprise": (0.2, 0.75), "tense_humor": (0.1, 0.6),
    "tension": (-0.4, 0.75), "defensiveness": (-0.4, 0.6), "whining": (-0.5, 0.55), "sadness": (-0.6, 0.2),
    "stonewalling": (-0.3, 0.15), "criticism": (-0.5, 0.55), "contempt": (-0.7, 0.45), "disgust": (-0.7, 0.5),
    "domineering": (-0.4, 0.7), "belligerence": (-0.7, 0.85), "anger": (-0.8, 0.85), "fear": (-0.6, 0.8),
    "annoyed": (-0.4, 0.55), "concerned": (-0.2, 0.5), "pleased": (0.5, 0.4),
}  # fmt: skip
STANCE_AFFECT = {"hostile": (-0.5, 0.65), "distressed": (-0.1, 0.5), "friendly": (0.5, 0.45)}

# Fixed wording for the prompt: the player's emotion, and the NPC's.
PLAYER_WORDS = {
    "angry": "angry", "disgust": "disgusted", "fear": "afraid", "happy": "happy", "sad": "sad",
    "surprise": "surprised", "neutral": "calm",
}  # fmt: skip
MOOD_WORDS = {
    "neutral": "calm", "joy": "joyful", "humor": "playful", "affection": "warmth towards them",
    "validation": "inclined to reassure them", "interest": "curious", "surprise": "surprised",
    "tense_humor": "the urge to ease the tension with a joke", "tension": "tense and anxious",
    "defensiveness": "defensive", "whining": "sorry for yourself", "sadness": "sad",
    "stonewalling": "like shutting them out", "criticism": "critical of them", "contempt": "contempt for them",
    "disgust": "disgusted", "domineering": "the urge to take charge of them", "belligerence": "ready for a fight",
    "anger": "angry", "fear": "afraid", "annoyed": "annoyed", "concerned": "concerned for them",
    "pleased": "pleased",
}  # fmt: skip


@dataclass
class NpcMood:
    label: str  # the persona's emotion label, e.g. "contempt"
    intensity: float  # 0..1
    valence: float  # -1..1
    arousal: float  # 0..1
    trigger: str | None = None  # the player stance that moved it this turn: hostile, distressed, friendly

    @classmethod
    def resting(cls, t: Temperament) -> NpcMood:
        intensity = 0.0 if t.baseline_mood == "neutral" else RESTING_INTENSITY
        return cls(t.baseline_mood, intensity, t.valence, t.arousal)

    @property
    def strength(self) -> str:
        """Inworld's emotion strength: weak, normal or strong."""
        return "weak" if self.intensity < 0.35 else "normal" if self.intensity < 0.7 else "strong"

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d |= {k: round(getattr(self, k), 4) for k in ("intensity", "valence", "arousal")}
        d["strength"] = self.strength
        return d


def stance(affect: FusedAffect | None) -> tuple[str | None, float]:
    """The player's strongest stance and its score (probability mass), or (None, 0) below STANCE_MIN."""
    if affect is None or not affect.modalities or affect.confidence <= 0:
        return None, 0.0
    p = affect.emotion
    scores = {name: sum(p.get(e, 0.0) for e in emotions) for name, emotions in STANCES.items()}
    scores["friendly"] += p.get("surprise", 0.0) * max(affect.valence, 0.0)
    best = max(scores, key=scores.__getitem__)
    return (best, scores[best]) if scores[best] >= STANCE_MIN else (None, 0.0)


def update_mood(previous: NpcMood | None, affect: FusedAffect | None, temperament: Temperament) -> NpcMood:
    """One turn's move of the NPC's mood (module docstring)."""
    rest = NpcMood.resting(temperament)
    prev = previous or rest
    valence = rest.valence + (prev.valence - rest.valence) * (1 - DECAY)
    arousal = rest.arousal + (prev.arousal - rest.arousal) * (1 - DECAY)
    label, intensity = prev.label, prev.intensity * (1 - DECAY)
    if label == rest.label:
        intensity = rest.intensity + (prev.intensity - rest.intensity) * (1 - DECAY)
    elif intensity < FADED:
        label, intensity = rest.label, rest.intensity

    name, score = stance(affect)
    if name is None or affect is None:
        return NpcMood(label, _clip(intensity, 0, 1), _clip(valence, -1, 1), _clip(arousal, 0, 1))
    emphasis = 0.6 + 0.4 * affect.arousal if name == "hostile" else 1.0
    strength = _clip(GAIN * temperament.reactivity * affect.confidence * score * emphasis, 0, 1)
    reaction = {"hostile": temperament.when_hostile, "distressed": temperament.when_distressed}.get(
        name, temperament.when_friendly
    )
    target_v, target_a = REACTION_AFFECT.get(reaction, STANCE_AFFECT[name])
    valence += strength * (target_v - valence)
    arousal += strength * (target_a - arousal)
    if reaction == label:
        intensity = 1 - (1 - intensity) * (1 - strength)
    elif strength >= intensity:
        label, intensity = reaction, strength
    return NpcMood(label, _clip(intensity, 0, 1), _clip(valence, -1, 1), _clip(arousal, 0, 1), trigger=name)


def affect_note(affect: FusedAffect | None, mood: NpcMood) -> str:
    """A short sentence for the prompt, from fixed words only (never the player's text)."""
    if affect is None or not affect.modalities or affect.confidence < 0.15:
        player = "You cannot tell how the player feels."
    else:
        word = PLAYER_WORDS.get(affect.label, "calm")
        if affect.confidence >= 0.7:
            player = f"The player is clearly {word}."
        elif affect.confidence >= 0.4:
            player = f"The player seems {word}."
        else:
            player = f"The player might be {word}."
    feeling = MOOD_WORDS.get(mood.label) or _plain(mood.label)
    degree = {"weak": " (slightly)", "normal": "", "strong": " (strongly)"}[mood.strength]
    if mood.label == "neutral" or mood.intensity <= 0:
        degree = ""
    return f"{player} You feel {feeling}{degree}."


def _plain(label: str) -> str:
    """A persona label outside MOOD_WORDS, reduced to lowercase letters and spaces."""
    words = re.sub(r"[^a-z ]+", " ", label.lower().replace("_", " ")).split()
    return " ".join(words[:4]) or "unsettled"


def _clip(x: float, lo: float, hi: float) -> float:
    return min(max(float(x), lo), hi)
