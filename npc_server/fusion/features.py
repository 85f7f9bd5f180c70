"""Per-modality readings -> the small, interpretable vectors the fusion models read.

The vectors are built from a reading's documented fields, never from the analyzers' embeddings: the training
data is mostly generated here (docs/fusion.md), and a few hundred samples cannot fit a 384-d text embedding
without learning the generator's quirks. A modality that is missing gives None, never a vector of zeros:
no face found, no speech found, or no words.

    face  (10): P(angry .. neutral) under the expression net, valence -1..1, arousal 0..1, confidence 0..1
    voice  (8): loudness, pitch, pitch range, speaking rate, pause ratio (each scaled to about 0..1),
                prosodic arousal, transcript confidence, confidence
    text  (11): P(angry .. neutral) from the text analyzer, VADER sentiment, valence, arousal, confidence
"""

from __future__ import annotations

import math

import numpy as np

from npc_server.perception.types import EMOTIONS, FaceReading, TextReading, VoiceReading

# Bump when a vector's layout or scaling changes: it keys the feature cache and is stored in checkpoints.
FEATURE_VERSION = 1

MODALITIES: tuple[str, ...] = ("face", "voice", "text")
FEATURE_NAMES: dict[str, tuple[str, ...]] = {
    "face": (*(f"p_{e}" for e in EMOTIONS), "valence", "arousal", "confidence"),
    "voice": (
        "loudness",
        "pitch",
        "pitch_range",
        "speaking_rate",
        "pause_ratio",
        "arousal",
        "transcript_confidence",
        "confidence",
    ),
    "text": (*(f"p_{e}" for e in EMOTIONS), "sentiment", "valence", "arousal", "confidence"),
}
INPUT_DIMS: dict[str, int] = {m: len(names) for m, names in FEATURE_NAMES.items()}
# Where each vector holds its reading's own confidence (late fusion and the reports use it).
CONFIDENCE_INDEX: dict[str, int] = {m: names.index("confidence") for m, names in FEATURE_NAMES.items()}


def face_vector(r: FaceReading | None) -> np.ndarray | None:
    """FaceReading -> float32 (10,), or None when no face was found."""
    if r is None or not r.found or not r.expression:
        return None
    probs = [r.expression.get(e, 0.0) for e in EMOTIONS]
    return _finite([*probs, r.valence, r.arousal, r.confidence])


def voice_vector(r: VoiceReading | None) -> np.ndarray | None:
    """VoiceReading -> float32 (8,), or None when the clip held no speech.

    loudness: dBFS mapped -60..0 -> 0..1; pitch: octaves re 100 Hz (0 when unvoiced); pitch range:
    semitones / 12; rate: words per second / 5, capped at 2.
    """
    if r is None or not r.speech_found:
        return None
    p = r.prosody
    pitch = math.log2(p.pitch_hz / 100.0) if p.pitch_hz > 0 else 0.0
    return _finite(
        [
            min(max((p.loudness_db + 60.0) / 60.0, 0.0), 1.5),
            pitch,
            p.pitch_range_semitones / 12.0,
            min(p.speaking_rate_wps / 5.0, 2.0),
            p.pause_ratio,
            r.arousal,
            r.transcript_confidence,
            r.confidence,
        ]
    )


def text_vector(r: TextReading | None) -> np.ndarray | None:
    """TextReading -> float32 (11,), or None when there were no words."""
    if r is None or not r.text.strip() or not r.emotion:
        return None
    probs = [r.emotion.get(e, 0.0) for e in EMOTIONS]
    return _finite([*probs, r.sentiment, r.valence, r.arousal, r.confidence])


def vectors(
    face: FaceReading | None, voice: VoiceReading | None, text: TextReading | None
) -> dict[str, np.ndarray | None]:
    """All three at once, keyed by modality name."""
    return {"face": face_vector(face), "voice": voice_vector(voice), "text": text_vector(text)}


def _finite(values: list[float]) -> np.ndarray:
    """float32 vector with any NaN or infinity (a broken reading) replaced by 0."""
    return np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
