"""What each modality reports. Plain dataclasses: the API maps them to wire schemas, fusion reads `features`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# The label space every modality and the fusion model share: the facial-expression net's 7 classes.
EMOTIONS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


@dataclass
class FaceReading:
    """Aggregate over the frames of one turn."""

    found: bool
    frames: int  # frames analysed
    frames_with_face: int
    box: tuple[float, float, float, float] | None  # x, y, w, h of the best face, as fractions of the frame
    expression: dict[str, float]  # probabilities over EMOTIONS (empty when no face)
    valence: float  # -1..1
    arousal: float  # 0..1
    confidence: float  # 0..1, 0 when no face
    features: np.ndarray = field(repr=False)  # float32, FACE_DIM, zeros when no face
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class Prosody:
    loudness_db: float  # mean RMS in dBFS over voiced frames
    pitch_hz: float  # median f0 over voiced frames (0 when unvoiced)
    pitch_range_semitones: float  # 10th..90th percentile span
    speaking_rate_wps: float  # words per second of speech (from word timestamps)
    pause_ratio: float  # fraction of the clip that is silence
    speech_seconds: float
    duration_seconds: float


@dataclass
class VoiceReading:
    speech_found: bool
    transcript: str
    transcript_confidence: float  # 0..1 (mean word probability)
    words: list[tuple[str, float, float]]  # (word, start s, end s)
    prosody: Prosody
    arousal: float  # 0..1 from prosody
    valence: float  # -1..1 (prosody says little about valence; near 0 with low weight)
    confidence: float  # 0..1
    features: np.ndarray = field(repr=False)  # float32, VOICE_DIM
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class TextReading:
    text: str
    emotion: dict[str, float]  # probabilities over EMOTIONS
    sentiment: float  # VADER compound, -1..1
    valence: float  # -1..1
    arousal: float  # 0..1
    confidence: float  # 0..1
    features: np.ndarray = field(repr=False)  # float32, TEXT_DIM (sentence embedding + a few scores)
    timings_ms: dict[str, float] = field(default_factory=dict)
