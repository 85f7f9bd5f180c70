"""Faces in a turn's frames -> one FaceReading: detection (mediapipe), expression (mini-Xception), aggregation.

Per frame: decode (bounded, see media.py) -> mediapipe's short-range face detector, falling back to the
full-range one when it finds nothing (see DETECTORS) -> the largest face, cropped square with a margin ->
grey 64x64 -> expression probabilities and the net's pooled 128-d features. Frames are then averaged with
weight w = detection score x top expression probability, so blurred or ambiguous frames count for less.

`FaceAnalyzer.analyze` blocks (about 5 ms a frame on one CPU thread); call it from a worker thread. It is
safe to call from several threads: the mediapipe graphs, which are not, run under a lock.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from npc_server.errors import InvalidInput, NpcError
from npc_server.perception.expression import EMBEDDING_DIM, INPUT_SIZE, load_mini_xception, to_input
from npc_server.perception.media import decode_image
from npc_server.perception.types import EMOTIONS, FaceReading

# Emotion -> (valence, arousal) on Russell's circumplex, both in -1..1. The six basic emotions take their
# pleasure/arousal coordinates from Russell & Mehrabian (1977), "Evidence for a three-factor theory of
# emotions", as commonly tabulated; neutral sits at the origin. A reading's valence is the expected value
# of the first coordinate under the expression distribution; its arousal is the expected second one mapped
# to 0..1 by (a + 1) / 2, so a neutral face reads valence 0, arousal 0.5.
CIRCUMPLEX: dict[str, tuple[float, float]] = {
    "angry": (-0.51, 0.59),
    "disgust": (-0.60, 0.35),
    "fear": (-0.64, 0.60),
    "happy": (0.81, 0.51),
    "sad": (-0.63, -0.27),
    "surprise": (0.40, 0.67),
    "neutral": (0.0, 0.0),
}
_VA = np.array([CIRCUMPLEX[e] for e in EMOTIONS], dtype=np.float64)  # (7, 2), rows in EMOTIONS order

# Layout of FaceReading.features (float32, zeros when no face was found in any frame).
FEATURE_PROBS = slice(0, len(EMOTIONS))  # aggregated expression probabilities, EMOTIONS order
FEATURE_VALENCE = 7  # -1..1
FEATURE_AROUSAL = 8  # 0..1
FEATURE_DETECTION = 9  # weighted mean detection score, 0..1
FEATURE_COVERAGE = 10  # frames_with_face / frames
FEATURE_EMBEDDING = slice(11, 11 + EMBEDDING_DIM)  # the net's last block, pooled and weight-averaged
FACE_DIM = 11 + EMBEDDING_DIM  # 139

# mediapipe 0.10.14's bundled detectors as (model_selection, min score), tried in order until one finds a face.
# Measured on skimage's astronaut and its variants, natural non-face images and 150 noise frames: short
# range scores real faces 0.84-0.96 but uniform noise up to 0.69, so it must clear 0.8; full range never
# fired on noise, finds faces that fill under ~1/4 of the frame (which short range misses) and degraded
# ones (blurred, grey, 64 px), but misses close-ups that fill the frame, which short range catches.
DETECTORS: tuple[tuple[int, float], ...] = ((0, 0.8), (1, 0.5))
CROP_MARGIN = 0.15  # added to each side of the detector's box, as a fraction of its longer side
DETECT_MAX_SIDE = 960  # frames are shrunk to this longer side at decode: detection runs at 128/192 px anyway
NEUTRAL_AROUSAL = 0.5


@dataclass
class _Face:
    """One frame's best face."""

    box: tuple[float, float, float, float]  # x, y, w, h as fractions of the frame, clipped to it
    score: float  # detector confidence
    grey: np.ndarray  # (64, 64) uint8 crop


class FaceAnalyzer:
    """Loads both detectors and the expression net once; `analyze` turns encoded frames into a FaceReading."""

    def __init__(self, *, max_bytes: int, max_pixels: int, max_frames: int) -> None:
        from mediapipe.python.solutions import face_detection  # heavy import: only when an analyzer is made

        self.max_bytes, self.max_pixels, self.max_frames = max_bytes, max_pixels, max_frames
        self._detectors = [
            (face_detection.FaceDetection(model_selection=model, min_detection_confidence=min_score), min_score)
            for model, min_score in DETECTORS
        ]
        self._detect_lock = threading.Lock()
        self._net = load_mini_xception()

    def warm(self) -> None:
        """One dummy pass through both detectors and the net, so the first request pays no set-up cost."""
        self._find_face(np.zeros((128, 128, 3), dtype=np.uint8))
        self._expressions(np.zeros((1, INPUT_SIZE, INPUT_SIZE), dtype=np.uint8))

    def close(self) -> None:
        with self._detect_lock:
            for detector, _ in self._detectors:
                detector.close()

    def analyze(self, images: list[bytes]) -> FaceReading:
        """Encoded frames of one turn -> their aggregate reading. Raises InvalidInput and friends on bad input."""
        if not images:
            raise InvalidInput("no images were sent")
        if len(images) > self.max_frames:
            raise InvalidInput(f"{len(images)} images were sent; the limit is {self.max_frames} per request")
        timings = {"decode": 0.0, "detect": 0.0, "expression": 0.0}
        faces: list[_Face] = []
        for i, data in enumerate(images):
            t0 = time.perf_counter()
            try:
                rgb = decode_image(data, max_bytes=self.max_bytes, max_pixels=self.max_pixels, max_side=DETECT_MAX_SIDE)
            except NpcError as err:
                where = f"image {i + 1} of {len(images)}: " if len(images) > 1 else ""
                raise type(err)(where + err.message, code=err.code, status=err.status) from None
            t1 = time.perf_counter()
            face = self._find_face(rgb)
            timings["decode"] += (t1 - t0) * 1e3
            timings["detect"] += (time.perf_counter() - t1) * 1e3
            if face is not None:
                faces.append(face)
        if not faces:
            return _no_face(len(images), timings)

        t0 = time.perf_counter()
        probs, embeddings = self._expressions(np.stack([f.grey for f in faces]))
        timings["expression"] = (time.perf_counter() - t0) * 1e3
        return _aggregate(faces, probs, embeddings, len(images), timings)

    def _find_face(self, rgb: np.ndarray) -> _Face | None:
        """The largest face in an (H, W, 3) uint8 frame, or None."""
        detections: list[Any] = []
        with self._detect_lock:
            for detector, min_score in self._detectors:
                # the graph's own threshold does not hold (short range returns 0.69 under a 0.8 threshold)
                found = detector.process(rgb).detections or []
                detections = [d for d in found if d.score[0] >= min_score]
                if detections:
                    break
        if not detections:
            return None
        boxes = [d.location_data.relative_bounding_box for d in detections]
        best = max(range(len(boxes)), key=lambda k: boxes[k].width * boxes[k].height)
        rel, score = boxes[best], float(detections[best].score[0])
        return _Face(
            box=_clip_box(rel.xmin, rel.ymin, rel.width, rel.height),
            score=score,
            grey=_crop_grey(rgb, rel.xmin, rel.ymin, rel.width, rel.height),
        )

    def _expressions(self, grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 64, 64) uint8 -> probabilities (N, 7) and pooled features (N, 128), float64."""
        with torch.inference_mode():
            logits, embedding = self._net(to_input(grey))
            probs = torch.softmax(logits, dim=1)
        return probs.double().numpy(), embedding.double().numpy()


def _clip_box(x: float, y: float, w: float, h: float) -> tuple[float, float, float, float]:
    x0, y0 = min(max(x, 0.0), 1.0), min(max(y, 0.0), 1.0)
    x1, y1 = min(max(x + w, 0.0), 1.0), min(max(y + h, 0.0), 1.0)
    return (x0, y0, x1 - x0, y1 - y0)


def _crop_grey(rgb: np.ndarray, x: float, y: float, w: float, h: float) -> np.ndarray:
    """A square around the relative box (plus CROP_MARGIN), kept inside the frame -> (64, 64) uint8 grey.

    The square is shifted, not padded, where it would cross the frame's edge; grey is ITU-R 601 luma, as
    the net's training pipeline (OpenCV's BGR2GRAY) used.
    """
    height, width = rgb.shape[:2]
    side = max(w * width, h * height) * (1 + 2 * CROP_MARGIN)
    side = max(1.0, min(side, width, height))
    cx, cy = (x + w / 2) * width, (y + h / 2) * height
    left = min(max(cx - side / 2, 0.0), width - side)
    top = min(max(cy - side / 2, 0.0), height - side)
    box = (round(left), round(top), max(round(left + side), round(left) + 1), max(round(top + side), round(top) + 1))
    crop = Image.fromarray(rgb).crop(box).convert("L")
    return np.asarray(crop.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR), dtype=np.uint8)


def _no_face(frames: int, timings: dict[str, float]) -> FaceReading:
    return FaceReading(
        found=False,
        frames=frames,
        frames_with_face=0,
        box=None,
        expression={},
        valence=0.0,
        arousal=NEUTRAL_AROUSAL,
        confidence=0.0,
        features=np.zeros(FACE_DIM, dtype=np.float32),
        timings_ms=timings,
    )


def _aggregate(
    faces: list[_Face], probs: np.ndarray, embeddings: np.ndarray, frames: int, timings: dict[str, float]
) -> FaceReading:
    """Weight-average the frames that held a face.

    weight = detection score x top probability; confidence = weighted detection score x the aggregate's
    top probability x sqrt(share of frames with a face), so disagreeing frames, weak detections and a face
    seen in few frames all lower it.
    """
    scores = np.array([f.score for f in faces])
    weights = scores * probs.max(axis=1) + 1e-9
    weights /= weights.sum()
    agg = weights @ probs  # (7,)
    valence = float(agg @ _VA[:, 0])
    arousal = float((agg @ _VA[:, 1] + 1.0) / 2.0)
    detection = float(weights @ scores)
    coverage = len(faces) / frames
    confidence = float(np.clip(detection * agg.max() * np.sqrt(coverage), 0.0, 1.0))

    features = np.zeros(FACE_DIM, dtype=np.float32)
    features[FEATURE_PROBS] = agg
    features[FEATURE_VALENCE] = valence
    features[FEATURE_AROUSAL] = arousal
    features[FEATURE_DETECTION] = detection
    features[FEATURE_COVERAGE] = coverage
    features[FEATURE_EMBEDDING] = weights @ embeddings
    return FaceReading(
        found=True,
        frames=frames,
        frames_with_face=len(faces),
        box=faces[int(np.argmax(weights))].box,
        expression={e: float(p) for e, p in zip(EMOTIONS, agg, strict=True)},
        valence=valence,
        arousal=arousal,
        confidence=confidence,
        features=features,
        timings_ms=timings,
    )
