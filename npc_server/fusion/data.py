"""Training data for fusion: the manifest format, and feature extraction through the real analyzers.

A manifest is JSON Lines, one sample per line; paths are relative to the manifest's folder:

    {"text": "Thanks a lot!",            typed words (optional)
     "audio": "audio/g00001.flac",       a clip: WAV, FLAC, OGG or MP3 (optional)
     "images": ["images/g00001_0.jpg"],  frames of the player's face (optional)
     "face": {"expression": {...}, "detection": 0.9, "coverage": 1.0},   a synthetic face reading (optional)
     "label": "angry",                   one of EMOTIONS (required)
     "valence": -0.51, "arousal": 0.8,   optional; default: the label's point on face.CIRCUMPLEX
     "split": "train" | "test",          optional; see train.py for what happens without it
     "group": "happy/3",                 optional; rows of one group stay together in the validation split
     "tags": ["disagree"], "id": "g00001"}
Other keys are allowed and ignored (the generator documents each sample with "shows", "said", "voice_style").
As at run time, the text modality reads "text" when given, else the audio's transcript.

Features are cached in `<manifest>.features.npz` beside the manifest, keyed by a hash of each input's bytes
(and FEATURE_VERSION), so training again, or on a grown manifest, re-analyses only what is new.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from npc_server.errors import NpcError
from npc_server.fusion.features import FEATURE_VERSION, INPUT_DIMS, MODALITIES, face_vector, text_vector, voice_vector
from npc_server.perception.types import EMOTIONS, FaceReading

Log = Callable[[str], None]
ASR_SEED = 0


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def label_affect(label: str) -> tuple[float, float]:
    """A label's (valence -1..1, arousal 0..1): its point on the face model's circumplex table."""
    from npc_server.perception.face import CIRCUMPLEX

    v, a = CIRCUMPLEX[label]
    return v, (a + 1.0) / 2.0


class SyntheticFace(BaseModel):
    model_config = ConfigDict(extra="ignore")
    expression: dict[str, float]
    detection: float = Field(0.9, ge=0.0, le=1.0)
    coverage: float = Field(1.0, gt=0.0, le=1.0)

    @field_validator("expression")
    @classmethod
    def _over_emotions(cls, v: dict[str, float]) -> dict[str, float]:
        if set(v) - set(EMOTIONS) or any(p < 0 for p in v.values()) or sum(v.values()) <= 0:
            raise ValueError(f"probabilities over {', '.join(EMOTIONS)}")
        total = sum(v.values())
        return {e: v.get(e, 0.0) / total for e in EMOTIONS}


class ManifestRow(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    text: str | None = Field(None, max_length=4000)
    audio: str | None = None
    images: list[str] = Field(default_factory=list, max_length=64)
    face: SyntheticFace | None = None
    label: str
    valence: float | None = Field(None, ge=-1.0, le=1.0)
    arousal: float | None = Field(None, ge=0.0, le=1.0)
    split: str | None = Field(None, pattern="^(train|test)$")
    group: str | None = Field(None, max_length=200)
    tags: list[str] = Field(default_factory=list)

    @field_validator("label")
    @classmethod
    def _known_label(cls, v: str) -> str:
        if v not in EMOTIONS:
            raise ValueError(f"one of {', '.join(EMOTIONS)}")
        return v


class ManifestError(ValueError):
    pass


@dataclass
class Dataset:
    """Feature vectors of N samples. x[m] rows of a missing modality are zeros and are never read."""

    x: dict[str, np.ndarray]  # modality -> (N, D_m) float32
    present: np.ndarray  # (N, M) bool
    labels: np.ndarray  # (N,) int64 indices into EMOTIONS
    valence: np.ndarray  # (N,) float32
    arousal: np.ndarray  # (N,) float32
    split: list[str]  # "train", "test" or "" (unmarked)
    tags: list[list[str]] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)  # "" where a row has none

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray | list[int]) -> Dataset:
        idx = np.asarray(idx, dtype=np.int64)
        return Dataset(
            x={m: v[idx] for m, v in self.x.items()},
            present=self.present[idx],
            labels=self.labels[idx],
            valence=self.valence[idx],
            arousal=self.arousal[idx],
            split=[self.split[i] for i in idx],
            tags=[self.tags[i] for i in idx],
            ids=[self.ids[i] for i in idx],
            groups=[self.groups[i] for i in idx],
        )

    def where(self, keep: Callable[[int], bool]) -> Dataset:
        return self.subset([i for i in range(len(self)) if keep(i)])


def build_dataset(rows: list[dict[str, Any]]) -> Dataset:
    """rows of {"vectors": {m: array | None}, "label", "valence", "arousal", and optional "split", "tags", "id",
    "group"} -> Dataset."""
    n = len(rows)
    x = {m: np.zeros((n, INPUT_DIMS[m]), dtype=np.float32) for m in MODALITIES}
    present = np.zeros((n, len(MODALITIES)), dtype=bool)
    for i, row in enumerate(rows):
        for j, m in enumerate(MODALITIES):
            v = row["vectors"].get(m)
            if v is not None:
                x[m][i], present[i, j] = v, True
    return Dataset(
        x=x,
        present=present,
        labels=np.array([EMOTIONS.index(r["label"]) for r in rows], dtype=np.int64),
        valence=np.array([r["valence"] for r in rows], dtype=np.float32),
        arousal=np.array([r["arousal"] for r in rows], dtype=np.float32),
        split=[r.get("split") or "" for r in rows],
        tags=[list(r.get("tags", [])) for r in rows],
        ids=[str(r.get("id") or i) for i, r in enumerate(rows)],
        groups=[r.get("group") or "" for r in rows],
    )


def read_manifest(path: Path) -> list[ManifestRow]:
    """Parse and validate every line; a problem names the line and the field."""
    rows = []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            rows.append(ManifestRow.model_validate(json.loads(raw)))
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path.name}:{lineno}: not JSON ({exc.msg})") from None
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(map(str, err["loc"]))
            raise ManifestError(f"{path.name}:{lineno}: {where}: {err['msg']}") from None
    if not rows:
        raise ManifestError(f"{path.name}: no samples")
    return rows


class Analyzers:
    """The real perception analyzers, each loaded on first use (a fully cached manifest loads none)."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or min(2, os.cpu_count() or 1)
        self._face: Any = None
        self._voice: Any = None
        self._text: Any = None

    @property
    def face(self) -> Any:
        if self._face is None:
            from npc_server.perception.face import FaceAnalyzer

            self._face = FaceAnalyzer(max_bytes=16 << 20, max_pixels=4096 * 4096, max_frames=64)
        return self._face

    @property
    def voice(self) -> Any:
        if self._voice is None:
            import ctranslate2

            from npc_server.perception.voice import VoiceAnalyzer

            # Whisper falls back to sampling on clips it finds hard (about 2.5% of the generated ones). Its
            # worker thread seeds its generator from this seed when the model is loaded, so a run that analyses
            # the same clips in the same order (a fresh one) gets the same transcripts.
            ctranslate2.set_random_seed(ASR_SEED)
            self._voice = VoiceAnalyzer(max_bytes=64 << 20, max_seconds=120.0, whisper_threads=self.threads)
        return self._voice

    @property
    def text(self) -> Any:
        if self._text is None:
            from npc_server.perception.text import TextAnalyzer

            self._text = TextAnalyzer()
        return self._text

    def close(self) -> None:
        if self._face is not None:
            self._face.close()


class FeatureCache:
    """An .npz of vectors keyed '<modality>_<sha256>'; an empty vector records 'analysed, nothing found'."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, np.ndarray] = {}
        self.dirty = 0
        if path is not None and path.is_file():
            with np.load(path, allow_pickle=False) as npz:
                self.entries = {k: npz[k] for k in npz.files}

    @staticmethod
    def key(kind: str, *chunks: bytes) -> str:
        h = hashlib.sha256(f"v{FEATURE_VERSION}".encode())
        for chunk in chunks:
            h.update(hashlib.sha256(chunk).digest())
        return f"{kind}_{h.hexdigest()[:32]}"

    def get(self, key: str) -> np.ndarray | None:
        return self.entries.get(key)

    def put(self, key: str, value: np.ndarray) -> None:
        self.entries[key] = value
        self.dirty += 1
        if self.dirty >= 100:
            self.save()

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        tmp = self.path.with_name(self.path.name + ".tmp.npz")
        np.savez(tmp, **self.entries)  # type: ignore[arg-type]  # numpy's stub wants positional arrays
        tmp.replace(self.path)
        self.dirty = 0


def load_manifest(
    path: Path, analyzers: Analyzers | None = None, *, cache: bool = True, log: Log = stderr_log
) -> Dataset:
    """Read a manifest and turn each sample into feature vectors with the real analyzers (cached)."""
    rows = read_manifest(path)
    store = FeatureCache(path.with_name(path.name + ".features.npz") if cache else None)
    own = analyzers is None
    analyzers = analyzers or Analyzers()
    started, out = time.monotonic(), []
    try:
        for i, row in enumerate(rows):
            vecs = _row_vectors(row, path.parent, analyzers, store, log, where=f"{path.name}:{i + 1}")
            valence, arousal = label_affect(row.label)
            out.append(
                {
                    "vectors": vecs,
                    "label": row.label,
                    "valence": valence if row.valence is None else row.valence,
                    "arousal": arousal if row.arousal is None else row.arousal,
                    "split": row.split,
                    "tags": row.tags,
                    "group": row.group,
                    "id": row.id or str(i),
                }
            )
            if (i + 1) % 100 == 0 and time.monotonic() - started > 5:  # quiet when everything is cached
                log(f"features: {i + 1}/{len(rows)} samples, {time.monotonic() - started:.0f} s")
    finally:
        store.save()
        if own:
            analyzers.close()
    return build_dataset(out)


def _row_vectors(
    row: ManifestRow, root: Path, analyzers: Analyzers, store: FeatureCache, log: Log, where: str
) -> dict[str, np.ndarray | None]:
    vecs: dict[str, np.ndarray | None] = {"face": None, "voice": None, "text": None}
    if row.face is not None:
        vecs["face"] = face_vector(synthetic_face_reading(row.face))
    elif row.images:
        frames = [_read(root, p, where) for p in row.images]
        key = store.key("face", *frames)
        vecs["face"] = _cached(store, key, lambda: face_vector(analyzers.face.analyze(frames)), log, where)
    transcript = ""
    if row.audio:
        clip = _read(root, row.audio, where)
        key = store.key("voice", clip)
        asr_key = key.replace("voice_", "asr_", 1)  # the transcript, for the text modality
        if store.get(key) is None or store.get(asr_key) is None:
            reading = _analyse(lambda: analyzers.voice.analyze(clip, row.audio), log, where)
            vec = voice_vector(reading)
            store.put(key, vec if vec is not None else np.zeros(0, np.float32))
            store.put(asr_key, np.array(reading.transcript if reading is not None else ""))
        cached = store.get(key)
        vecs["voice"] = cached if cached is not None and cached.size else None
        transcript = str(store.get(asr_key))
    words = row.text if row.text is not None else transcript
    if words.strip():
        key = store.key("text", words.encode())
        vecs["text"] = _cached(store, key, lambda: text_vector(analyzers.text.analyze(words)), log, where)
    return vecs


def _cached(store: FeatureCache, key: str, compute: Callable[[], np.ndarray | None], log: Log, where: str) -> Any:
    hit = store.get(key)
    if hit is None:
        vec = _analyse(compute, log, where)
        hit = vec if vec is not None else np.zeros(0, np.float32)
        store.put(key, hit)
    return hit if hit.size else None


def _analyse(compute: Callable[[], Any], log: Log, where: str) -> Any:
    """Run one analyzer; input it refuses (too long, undecodable) makes the modality missing, with a note."""
    try:
        return compute()
    except NpcError as err:
        log(f"{where}: skipped a modality: {err.message}")
        return None


def _read(root: Path, rel: str, where: str) -> bytes:
    path = Path(rel) if Path(rel).is_absolute() else root / rel
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{where}: cannot read {rel} ({exc.strerror})") from None


def synthetic_face_reading(face: SyntheticFace) -> FaceReading:
    """A FaceReading from expression probabilities, aggregated exactly as face.py aggregates frames."""
    from npc_server.perception.face import CIRCUMPLEX, NEUTRAL_AROUSAL

    probs = np.array([face.expression[e] for e in EMOTIONS])
    va = np.array([CIRCUMPLEX[e] for e in EMOTIONS])
    valence = float(probs @ va[:, 0])
    arousal = float((probs @ va[:, 1] + 1.0) / 2.0) if probs.sum() else NEUTRAL_AROUSAL
    confidence = float(np.clip(face.detection * probs.max() * np.sqrt(face.coverage), 0.0, 1.0))
    return FaceReading(
        found=True,
        frames=1,
        frames_with_face=1,
        box=None,
        expression=dict(face.expression),
        valence=valence,
        arousal=arousal,
        confidence=confidence,
        features=np.zeros(0, dtype=np.float32),
    )
