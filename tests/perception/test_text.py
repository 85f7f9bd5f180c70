"""TextAnalyzer with the real MiniLM embedder and VADER. Behaviour only: rankings and signs, never exact scores."""

from __future__ import annotations

import os

import numpy as np
import pytest

from npc_server.perception.text import EMBED_DIM, TEXT_DIM, TextAnalyzer
from npc_server.perception.types import EMOTIONS

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NEGATIVE = ("angry", "disgust", "fear", "sad")


@pytest.fixture(scope="module")
def analyzer() -> TextAnalyzer:
    import torch

    torch.set_num_threads(1)  # small per-request model; more threads busy-wait on a shared 2-core box
    ta = TextAnalyzer()
    ta.warm()
    return ta


def test_anger_outranks_happiness_and_is_negative(analyzer: TextAnalyzer) -> None:
    r = analyzer.analyze("I'm furious with you, you cheated me!")
    assert max(r.emotion[e] for e in NEGATIVE) > r.emotion["happy"]
    assert r.emotion["angry"] > r.emotion["happy"]
    assert r.valence < -0.2 and r.sentiment < 0.0


def test_gratitude_is_happy_and_positive(analyzer: TextAnalyzer) -> None:
    r = analyzer.analyze("Thank you so much, this is wonderful!")
    assert max(r.emotion, key=r.emotion.get) == "happy"
    assert r.valence > 0.2 and r.sentiment > 0.0


def test_plain_request_is_mostly_neutral(analyzer: TextAnalyzer) -> None:
    r = analyzer.analyze("How many gold coins for the shield?")
    assert max(r.emotion, key=r.emotion.get) == "neutral"
    assert abs(r.valence) < 0.3


def test_shouting_raises_arousal(analyzer: TextAnalyzer) -> None:
    shouted = analyzer.analyze("GET OUT OF MY HOUSE NOW!!!")
    tired = analyzer.analyze("I am tired, I just want to sleep.")
    assert shouted.arousal > tired.arousal + 0.2


def test_reading_shape(analyzer: TextAnalyzer) -> None:
    r = analyzer.analyze("Have you seen my brother in the village today?")
    assert set(r.emotion) == set(EMOTIONS)
    assert sum(r.emotion.values()) == pytest.approx(1.0, abs=1e-5)
    assert all(0.0 <= p <= 1.0 for p in r.emotion.values())
    assert -1.0 <= r.valence <= 1.0 and 0.0 <= r.arousal <= 1.0 and 0.0 <= r.confidence <= 1.0
    assert r.features.shape == (TEXT_DIM,) and r.features.dtype == np.float32
    assert np.isfinite(r.features).all()
    assert np.linalg.norm(r.features[:EMBED_DIM]) == pytest.approx(1.0, abs=1e-4)
    probs = r.features[EMBED_DIM : EMBED_DIM + len(EMOTIONS)]
    np.testing.assert_allclose(probs, [r.emotion[e] for e in EMOTIONS], rtol=1e-6)
    assert set(r.timings_ms) == {"embed", "emotion"}


def test_empty_text_is_neutral_not_an_error(analyzer: TextAnalyzer) -> None:
    r = analyzer.analyze("   ")
    assert r.emotion["neutral"] == 1.0 and r.confidence == 0.0
    assert r.features.shape == (TEXT_DIM,)


def test_very_long_text_is_analysed(analyzer: TextAnalyzer) -> None:
    r = analyzer.analyze("I am so happy today! " * 2000)
    assert max(r.emotion, key=r.emotion.get) == "happy"


def test_embed_is_normalised_and_semantic(analyzer: TextAnalyzer) -> None:
    emb = analyzer.embed(["Where can I buy a sword?", "Which shop sells weapons?", "My cat is asleep on the bed."])
    assert emb.shape == (3, EMBED_DIM) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2
    assert analyzer.embed([]).shape == (0, EMBED_DIM)
