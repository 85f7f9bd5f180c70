"""Fusion models: shapes, masking of missing modalities, late fusion, checkpoints, and the shipped checkpoint
on disagreeing cases (feature level, and through the real face and text analyzers)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from npc_server.fusion.data import SyntheticFace, label_affect, synthetic_face_reading
from npc_server.fusion.features import INPUT_DIMS, MODALITIES, face_vector, text_vector, voice_vector
from npc_server.fusion.model import (
    METHODS,
    AttentionFusion,
    FusionConfig,
    FusionSuite,
    LateFusion,
    Outputs,
    hide_modalities,
    load_suite,
    save_suite,
)
from npc_server.fusion.runtime import DEFAULT_CHECKPOINT, AffectFuser
from npc_server.perception.types import EMOTIONS, Prosody, TextReading, VoiceReading


def batch(n: int = 6, seed: int = 0) -> tuple[dict[str, Tensor], Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = {m: torch.randn(n, INPUT_DIMS[m], generator=g) for m in MODALITIES}
    return x, torch.ones(n, len(MODALITIES), dtype=torch.bool)


def same(a: Outputs, b: Outputs) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def fuser() -> AffectFuser:
    return AffectFuser.load()


def test_every_method_gives_distributions_and_bounded_affect() -> None:
    suite = FusionSuite(FusionConfig()).eval()
    x, present = batch()
    present[0] = torch.tensor([False, False, True])
    present[1] = False  # nothing at all: every method still answers (the prior)
    for name in METHODS:
        out = suite.method(name)(x, present)
        assert out.log_probs.shape == (6, len(EMOTIONS))
        assert torch.allclose(out.log_probs.exp().sum(dim=1), torch.ones(6), atol=1e-5)
        assert out.valence.shape == out.arousal.shape == out.confidence.shape == (6,)
        assert bool(((out.valence >= -1) & (out.valence <= 1) & (out.arousal >= 0) & (out.arousal <= 1)).all())
        assert torch.isfinite(out.log_probs).all()


def test_a_masked_modality_values_do_not_matter() -> None:
    model = AttentionFusion(FusionConfig()).eval()
    x, present = batch()
    present[:, MODALITIES.index("voice")] = False
    before = model(x, present)
    x2 = dict(x)
    x2["voice"] = torch.randn_like(x["voice"]) * 100
    assert same(before, model(x2, present))
    x2["voice"] = torch.full_like(x["voice"], float("nan"))  # not even NaN leaks through
    assert same(before, model(x2, present))
    # and the modalities that are present still matter
    x3 = dict(x)
    x3["text"] = x["text"] + 1.0
    assert not torch.allclose(model(x3, present).log_probs, before.log_probs)


def test_a_missing_modality_is_not_zero_filled() -> None:
    model = AttentionFusion(FusionConfig()).eval()
    x, present = batch()
    x["face"] = torch.zeros_like(x["face"])
    masked = present.clone()
    masked[:, MODALITIES.index("face")] = False
    assert not torch.allclose(model(x, masked).log_probs, model(x, present).log_probs)


def test_modality_dropout_keeps_at_least_one_modality() -> None:
    torch.manual_seed(0)
    present = torch.rand(500, 3) < 0.6
    kept = hide_modalities(present, 0.9)
    assert bool((kept <= present).all())  # never reveals a missing one
    has_any = present.any(dim=1)
    assert bool(kept[has_any].any(dim=1).all())
    assert kept.sum() < present.sum()


class Fixed(nn.Module):
    """A stand-in single-modality net with a fixed answer."""

    def __init__(self, label: str, confidence: float, index: int) -> None:
        super().__init__()
        self.p = torch.full((len(EMOTIONS),), 0.02)
        self.p[EMOTIONS.index(label)] = 1 - 0.02 * (len(EMOTIONS) - 1)
        self.confidence, self.index = confidence, index

    def forward(self, x: dict[str, Tensor], present: Tensor) -> Outputs:
        n = present.shape[0]
        confidence = torch.full((n,), self.confidence)
        return Outputs(self.p.log().expand(n, -1), torch.zeros(n), torch.full((n,), 0.5), confidence)


def test_late_fusion_is_confidence_weighted() -> None:
    late = LateFusion(FusionConfig()).eval()
    x, present = batch(1)
    present[0, MODALITIES.index("voice")] = False
    late.members["face"] = Fixed("happy", 0.9, 0)
    late.members["text"] = Fixed("sad", 0.2, 2)
    late.members["voice"] = Fixed("angry", 1.0, 1)  # missing: must not count
    probs = late(x, present).log_probs.detach().exp()[0]
    assert EMOTIONS[int(probs.argmax())] == "happy"
    assert float(probs[EMOTIONS.index("angry")]) < 0.03
    late.members["face"] = Fixed("happy", 0.1, 0)
    late.members["text"] = Fixed("sad", 0.9, 2)
    assert EMOTIONS[int(late(x, present).log_probs.argmax())] == "sad"


def test_late_fusion_with_one_modality_is_that_modality() -> None:
    suite = FusionSuite(FusionConfig()).eval()
    x, present = batch()
    present[:] = torch.tensor([False, False, True])
    late, text = suite.method("late")(x, present), suite.method("text")(x, present)
    assert torch.allclose(late.log_probs, text.log_probs, atol=1e-5)
    assert torch.allclose(late.valence, text.valence, atol=1e-6)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    suite = FusionSuite(FusionConfig(width=8, heads=2, layers=1, ensemble=2)).eval()
    save_suite(suite, tmp_path, {"runtime_method": "late", "features": {"version": 1}})
    assert set(load_file(str(tmp_path / "model.safetensors"))) == set(suite.state_dict())
    loaded, config = load_suite(tmp_path)
    assert config["model"]["width"] == 8 and config["runtime_method"] == "late"
    x, present = batch()
    for name in METHODS:
        assert same(suite.method(name)(x, present), loaded.method(name)(x, present))


def test_shipped_checkpoint_is_small_and_documented(fuser: AffectFuser) -> None:
    assert (DEFAULT_CHECKPOINT / "model.safetensors").stat().st_size < 300_000
    config = json.loads((DEFAULT_CHECKPOINT / "config.json").read_text())
    metrics = json.loads((DEFAULT_CHECKPOINT / "metrics.json").read_text())
    assert fuser.method == config["runtime_method"] == metrics["runtime_method"] in ("late", "attention")
    held_out = metrics["all"]
    best = max(("late", "attention"), key=lambda m: held_out[m]["macro_f1"])
    assert fuser.method == best  # the runtime uses what the held-out numbers favour
    assert set(held_out["attention"]["report"]) >= {*EMOTIONS, "micro avg", "macro avg", "weighted avg"}


# --- the shipped checkpoint on disagreeing cases --------------------------------------------------------------


def smile_vector() -> np.ndarray:
    """A clear smile, as the real face net reads the astronaut photo (happy 0.99)."""
    probs = {e: 0.0015 for e in EMOTIONS} | {"happy": 0.991}
    vec = face_vector(synthetic_face_reading(SyntheticFace(expression=probs, detection=0.92)))
    assert vec is not None
    return vec


def text_reading(label: str, sentiment: float, p: float = 0.9) -> TextReading:
    emotion = {e: (1 - p) / 6 for e in EMOTIONS} | {label: p}
    valence, _ = label_affect(label)
    return TextReading("...", emotion, sentiment, valence, 0.5, 0.9, np.zeros(0, np.float32))


def voice_reading(loudness: float, pitch: float, pitch_range: float, rate: float, arousal: float) -> VoiceReading:
    prosody = Prosody(loudness, pitch, pitch_range, rate, 0.2, 2.5, 3.0)
    return VoiceReading(True, "...", 0.8, [], prosody, arousal, 0.0, 0.88, np.zeros(0, np.float32))


def test_a_smile_with_sad_words_reads_sad(fuser: AffectFuser) -> None:
    affect = fuser.fuse_vectors({"face": smile_vector(), "text": text_vector(text_reading("sad", -0.6))})
    assert affect.label == "sad", affect
    assert affect.modalities == ["face", "text"] and affect.method == fuser.method


def test_pleasant_words_in_an_angry_voice_read_angry(fuser: AffectFuser) -> None:
    # VoiceAnalyzer's medians over the generated set's angry clips (145) and happy clips (60): angry is
    # fast and lower-pitched, happy higher and slower
    angry = voice_vector(voice_reading(loudness=-17.0, pitch=109.0, pitch_range=6.4, rate=4.35, arousal=0.65))
    happy = voice_vector(voice_reading(loudness=-15.5, pitch=142.0, pitch_range=6.0, rate=3.55, arousal=0.69))
    words = text_vector(text_reading("happy", 0.85))
    sarcastic = fuser.fuse_vectors({"voice": angry, "text": words})
    assert sarcastic.label == "angry", sarcastic
    friendly = fuser.fuse_vectors({"voice": happy, "text": words})
    assert friendly.label == "happy", friendly


def test_real_smile_photo_with_real_sad_words(fuser: AffectFuser) -> None:
    from PIL import Image
    from skimage import data

    from npc_server.perception.face import FaceAnalyzer
    from npc_server.perception.text import TextAnalyzer

    face = FaceAnalyzer(max_bytes=5_000_000, max_pixels=4096 * 4096, max_frames=4)
    try:
        buf = io.BytesIO()
        Image.fromarray(data.astronaut()).save(buf, "PNG")
        smile = face.analyze([buf.getvalue()])
    finally:
        face.close()
    text = TextAnalyzer()
    assert smile.found and max(smile.expression, key=smile.expression.__getitem__) == "happy"
    sad = fuser.fuse(face=smile, text=text.analyze("My brother died last winter and I miss him every day."))
    assert sad.label == "sad", sad
    glad = fuser.fuse(face=smile, text=text.analyze("Thank you, you've made my day!"))
    assert glad.label == "happy" and glad.valence > 0 > sad.valence
    only_face = fuser.fuse(face=smile)
    assert only_face.label == "happy" and only_face.modalities == ["face"]


def test_nothing_readable_is_neutral_without_confidence(fuser: AffectFuser) -> None:
    affect = fuser.fuse()
    assert affect.label == "neutral" and affect.confidence == 0 and affect.modalities == []
    d = affect.to_dict()
    assert json.loads(json.dumps(d)) == d and set(d["emotion"]) == set(EMOTIONS)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng renders the player's speech")
def test_real_pleasant_words_in_an_angry_voice(fuser: AffectFuser) -> None:
    from npc_server.perception.text import TextAnalyzer
    from npc_server.perception.voice import VoiceAnalyzer

    voice, text = VoiceAnalyzer(max_bytes=5_000_000, max_seconds=30.0, whisper_threads=1), TextAnalyzer()

    def hear(*style: str) -> tuple[str, float]:
        cmd = ["espeak-ng", "-v", "en-us", *style, "--stdout", "Great, that's really kind of you."]
        reading = voice.analyze(subprocess.run(cmd, capture_output=True, check=True, timeout=30).stdout)
        affect = fuser.fuse(voice=reading, text=text.analyze(reading.transcript))
        return affect.label, affect.valence

    angry, happy = hear("-a", "190", "-p", "40", "-s", "220"), hear("-a", "140", "-p", "75", "-s", "185")
    assert angry[0] == "angry" and happy[0] == "happy", (angry, happy)
    assert angry[1] < 0 < happy[1]
