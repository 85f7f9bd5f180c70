"""The runtime side of fusion: one turn's readings -> FusedAffect, from a trained checkpoint.

    fuser = AffectFuser.load()              # the shipped checkpoint, the method its held-out numbers chose
    affect = fuser.fuse(face=..., voice=..., text=...)   # any of them None

`fuse` is thread-safe (eval mode, no state is written) and cheap (well under a millisecond of model time for
these few-thousand-parameter nets); it leaves torch's thread settings alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from npc_server.fusion.features import FEATURE_VERSION, MODALITIES, vectors
from npc_server.fusion.model import METHODS, FusedAffect, FusionSuite, load_suite
from npc_server.perception.types import EMOTIONS, FaceReading, TextReading, VoiceReading

DEFAULT_CHECKPOINT = Path(__file__).parent / "checkpoints" / "default"


class AffectFuser:
    def __init__(self, suite: FusionSuite, method: str, config: dict[str, Any] | None = None) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown fusion method '{method}'; one of {', '.join(METHODS)}")
        self.suite = suite.eval()
        self.method = method
        self.config = config or {}
        self._model = suite.method(method)

    @classmethod
    def load(cls, path: Path | str | None = None, method: str | None = None) -> AffectFuser:
        """Load a checkpoint folder (default: the shipped one) and use `method`, or the one it was chosen for."""
        folder = Path(path) if path is not None else DEFAULT_CHECKPOINT
        suite, config = load_suite(folder)
        version = config.get("features", {}).get("version")
        if version != FEATURE_VERSION:
            raise ValueError(f"{folder}: checkpoint uses feature version {version}, this code {FEATURE_VERSION}")
        return cls(suite, method or config.get("runtime_method", "attention"), config)

    def fuse(
        self, face: FaceReading | None = None, voice: VoiceReading | None = None, text: TextReading | None = None
    ) -> FusedAffect:
        """Readings of one turn (None = not sent) -> the fused affect. A reading that found nothing is missing."""
        return self.fuse_vectors(vectors(face, voice, text))

    def fuse_vectors(self, vecs: dict[str, np.ndarray | None]) -> FusedAffect:
        """Feature vectors (features.py) keyed by modality, None for missing -> the fused affect."""
        used = [m for m in MODALITIES if vecs.get(m) is not None]
        if not used:
            return unread(self.method)
        dims = self.suite.cfg.input_dims
        x = {}
        for m in MODALITIES:
            v = vecs.get(m)
            x[m] = torch.as_tensor(v, dtype=torch.float32)[None] if v is not None else torch.zeros(1, dims[m])
        present = torch.tensor([[m in used for m in MODALITIES]])
        with torch.inference_mode():
            out = self._model(x, present)
        probs = out.log_probs[0].exp().tolist()
        emotion = {e: float(p) for e, p in zip(EMOTIONS, probs, strict=True)}
        return FusedAffect(
            emotion=emotion,
            label=max(emotion, key=emotion.__getitem__),
            valence=float(out.valence[0]),
            arousal=float(out.arousal[0]),
            confidence=float(out.confidence[0]),
            modalities=used,
            method=self.method,
        )


def unread(method: str) -> FusedAffect:
    """What fusion reports when no modality could be read: neutral, with no confidence."""
    emotion = {e: (1.0 if e == "neutral" else 0.0) for e in EMOTIONS}
    return FusedAffect(emotion, "neutral", 0.0, 0.5, 0.0, [], method)
