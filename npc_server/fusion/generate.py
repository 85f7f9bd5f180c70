"""`npc-server fusion make-data OUT`: the project's own multimodal training set, written as a manifest + media.

No labelled multimodal corpus can be downloaded here, so every sample is made, and how is documented in
docs/fusion.md. Each sample starts from the emotion the player feels (its label); each modality that is
present then shows an emotion:
    text   a line from lines.py (typed), or none
    voice  espeak-ng saying the line with the prosody typical of the emotion it shows (pitch -p, speed -s,
           amplitude -a, SSML pitch range, word gap -g; several voices), then a random microphone gain and
           a little noise; the text modality of a spoken sample is Whisper's transcript, as at run time
    face   real frames of the one real face photo here (skimage's astronaut, smiling: happy only), or a
           synthetic face *reading* (expression probabilities as the face net would report them) for the
           expressions no available photo shows, or frames with no face in them (the face is then missing)
Congruent samples show the label in every present modality, except that a channel sometimes shows neutral
(a poker face, a flat voice, plain words). Disagreeing samples (DISAGREEMENTS) pair a positive display with
a negative one; the labelling rule: a positive display (pleasant words, a smile) is a social mask, and the
label is the negative emotion the other channel leaks.
"""

from __future__ import annotations

import io
import json
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import soundfile as sf
from PIL import Image, ImageEnhance, ImageFilter

from npc_server.fusion.data import label_affect
from npc_server.fusion.lines import line
from npc_server.perception.types import EMOTIONS

# espeak-ng prosody per shown emotion, after Murray & Arnott (1993): (pitch -p, speed -s wpm, amplitude -a,
# word gap -g in 10 ms units) as uniform ranges, and the SSML pitch ranges to pick from.
VOICE_STYLES: dict[str, dict[str, Any]] = {
    "angry": {"p": (30, 55), "s": (190, 240), "a": (160, 200), "g": (0, 1), "range": ("high", "x-high")},
    "disgust": {"p": (10, 30), "s": (105, 140), "a": (80, 115), "g": (1, 4), "range": ("medium", "high")},
    "fear": {"p": (75, 99), "s": (205, 255), "a": (90, 130), "g": (0, 2), "range": ("high", "x-high")},
    "happy": {"p": (60, 85), "s": (170, 210), "a": (120, 160), "g": (0, 1), "range": ("high", "x-high")},
    "sad": {"p": (5, 30), "s": (95, 135), "a": (35, 75), "g": (2, 6), "range": ("x-low", "low")},
    "surprise": {"p": (70, 95), "s": (160, 200), "a": (120, 165), "g": (0, 1), "range": ("x-high",)},
    "neutral": {"p": (40, 60), "s": (150, 185), "a": (85, 115), "g": (0, 1), "range": ("low", "medium")},
}
TRAIN_VOICES = ("en-us", "en-us+m3", "en-us+f2", "en-gb", "en-gb+f3", "en-gb-scotland", "en-029+m2", "en-us+f5")
TEST_VOICES = ("en-us+f4", "en-gb-x-rp+m7", "en-us-nyc")  # held out: the test split hears other speakers

# Synthetic face readings: expressions the face net confuses (its FER2013 confusions, roughly), and how
# clearly each expression tends to read. Probabilities ~ Dirichlet(0.25 + clarity * a on the shown class
# + b on one confusable class), a log-uniform in 0.2..12, b in 0.1..3: calibrated so the top probability's
# 10/50/90th percentiles (about 0.4 / 0.6 / 0.9) resemble the real net's on 91 real faces (skimage's LFW
# subset: 0.35 / 0.54 / 0.95). Detection scores follow the real detector on real faces (0.84..0.96).
CONFUSABLE: dict[str, tuple[str, ...]] = {
    "angry": ("disgust", "sad", "neutral"),
    "disgust": ("angry", "sad"),
    "fear": ("surprise", "sad"),
    "happy": ("neutral", "surprise"),
    "sad": ("neutral", "fear", "angry"),
    "surprise": ("fear", "happy"),
    "neutral": ("sad", "happy"),
}
CLARITY = {"angry": 1.0, "disgust": 0.6, "fear": 0.6, "happy": 1.6, "sad": 0.9, "surprise": 1.4, "neutral": 1.0}
ASTRONAUT_FACE = (170, 75, 285, 190)  # x0, y0, x1, y1 of the face (with a margin) in the 512 x 512 photo

# (kind, label, what each channel shows). "words": the emotion of a spoken line when its voice shows another.
# A smile is real photo frames or a synthetic happy reading; the smile kinds' words are typed or spoken.
DISAGREEMENTS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("sarcasm", "angry", {"voice": "angry", "words": "happy"}),  # pleasant words in an angry voice
    ("brave_words", "sad", {"voice": "sad", "words": "happy"}),  # pleasant words in a sad voice
    ("masking_smile", "sad", {"face": "happy", "text": "sad"}),  # a smile with sad words
    ("polite_smile", "angry", {"face": "happy", "text": "angry"}),
    ("nervous_smile", "fear", {"face": "happy", "text": "fear"}),
)
# Which modalities a congruent sample has, with weights. "voice" means spoken: its text is the transcript.
LAYOUTS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("text",), 0.15),
    (("voice",), 0.25),
    (("face", "voice"), 0.25),
    (("face", "text"), 0.20),
    (("face",), 0.10),
    (("face", "voice", "text"), 0.05),
)
P_NEUTRAL_CHANNEL = 0.2  # a congruent, non-neutral sample's channel shows neutral instead (one never does)
P_NO_FACE = 0.1  # the frames sent hold no face: the face modality is missing at analysis
P_REAL_SMILE = 0.6  # a smile is real photo frames rather than a synthetic reading
TEST_SHARE = 0.2


@dataclass
class Plan:
    """One sample before it is rendered."""

    label: str
    split: str
    shows: dict[str, str]  # modality -> shown emotion; "words": a spoken line's emotion when not the voice's
    tags: list[str]


def make_dataset(out: Path, per_class: int = 120, per_disagreement: int = 60, seed: int = 0) -> dict[str, int]:
    """Write out/manifest.jsonl, out/audio/*.flac and out/images/*.jpg. Returns counts by split and kind."""
    rng = random.Random(seed)  # noqa: S311 (reproducible data, not secrets)
    plans = [_congruent(label, rng) for label in EMOTIONS for _ in range(per_class)]
    for kind, label, shows in DISAGREEMENTS:
        plans += [_disagreeing(kind, label, shows, rng) for _ in range(per_disagreement)]
    (out / "audio").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    photos = _Photos(np.random.default_rng(seed))
    counts: dict[str, int] = {}
    with (out / "manifest.jsonl").open("w") as f:
        for i, plan in enumerate(plans):
            row = _render(f"g{i:05d}", plan, out, rng, photos)
            f.write(json.dumps(row) + "\n")
            for key in (plan.split, *plan.tags):
                counts[key] = counts.get(key, 0) + 1
    counts["rows"] = len(plans)
    about = {
        "generator": "npc-server fusion make-data (npc_server/fusion/generate.py); see docs/fusion.md",
        "settings": {"seed": seed, "per_class": per_class, "per_disagreement": per_disagreement},
        "counts": counts,
        "espeak_ng": _espeak_version(),
        "voices": {"train": list(TRAIN_VOICES), "test": list(TEST_VOICES)},
        "faces": "real: skimage astronaut (smiling) frames; synthetic: expression readings (generate.py); none: scenes",
    }
    (out / "dataset.json").write_text(json.dumps(about, indent=2) + "\n")
    return counts


def _espeak_version() -> str:
    run = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=False, timeout=10)  # noqa: S607
    return run.stdout.strip()


def _congruent(label: str, rng: random.Random) -> Plan:
    layout = rng.choices([lay for lay, _ in LAYOUTS], weights=[w for _, w in LAYOUTS])[0]
    shows = {m: label for m in layout}
    if label != "neutral" and len(layout) > 1:
        keep = rng.choice(layout)  # this channel always shows the label
        for m in layout:
            if m != keep and rng.random() < P_NEUTRAL_CHANNEL:
                shows[m] = "neutral"
    split = _split(rng)
    tags = ["congruent"] if len(set(shows.values())) == 1 else ["partly_neutral"]
    return Plan(label, split, shows, tags)


def _disagreeing(kind: str, label: str, shows: dict[str, str], rng: random.Random) -> Plan:
    shows = dict(shows)
    if "text" in shows and rng.random() < 0.5:  # the words spoken, in the voice of their own emotion
        shows["voice"] = shows.pop("text")
    if "words" in shows and rng.random() < 0.5:  # a face too: the felt emotion, or a poker face
        shows["face"] = rng.choice((label, "neutral"))
    return Plan(label, _split(rng), shows, ["disagree", f"disagree:{kind}"])


def _split(rng: random.Random) -> str:
    """About TEST_SHARE of samples are test samples; their lines come from held-out templates (lines.py)."""
    return "test" if rng.random() < TEST_SHARE else "train"


def _render(sid: str, plan: Plan, out: Path, rng: random.Random, photos: _Photos) -> dict[str, Any]:
    valence, arousal = label_affect(plan.label)
    row: dict[str, Any] = {"id": sid, "label": plan.label, "valence": round(valence, 4), "arousal": round(arousal, 4)}
    row |= {"split": plan.split, "tags": plan.tags, "shows": plan.shows}
    shows = plan.shows
    words_emotion = shows.get("words") or shows.get("text") or shows.get("voice")
    words = ""
    if words_emotion:
        words, template = line(words_emotion, plan.split, rng)
        row["group"] = f"{words_emotion}/{template}"
    if "text" in shows:  # typed (when also spoken, the same line: the typed text is what the text model reads)
        row["text"] = words
    if "voice" in shows:  # spoken: without typed text, the text modality reads Whisper's transcript
        row["audio"] = f"audio/{sid}.flac"
        row["said"] = words
        row["voice_style"] = _speak(words, shows["voice"], plan.split, rng, out / row["audio"])
    if "face" in shows:
        if rng.random() < P_NO_FACE:
            row["images"] = photos.no_face(out, sid, rng)
            row["tags"] = [*plan.tags, "no_face_found"]
        elif shows["face"] == "happy" and rng.random() < P_REAL_SMILE:
            row["images"] = photos.smiles(out, sid, rng)
        else:
            row["face"] = synthetic_face(shows["face"], rng)
    return row


def _speak(text: str, emotion: str, split: str, rng: random.Random, path: Path) -> dict[str, Any]:
    """espeak-ng -> gain + noise -> FLAC at `path`; returns the style used."""
    style = VOICE_STYLES[emotion]
    voice = rng.choice(TEST_VOICES if split == "test" else TRAIN_VOICES)
    knobs = {k: rng.randint(*style[k]) for k in ("p", "s", "a", "g")}
    pitch_range = rng.choice(style["range"])
    ssml = f'<speak><prosody range="{pitch_range}">{escape(text)}</prosody></speak>'
    args = [f"-{k}{v}" for k, v in knobs.items()]
    cmd = ["espeak-ng", "-v", voice, *args, "-m", "--stdout", ssml]
    wav = subprocess.run(cmd, capture_output=True, check=True, timeout=60).stdout  # noqa: S603 (fixed argv)
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    gain_db = rng.uniform(-6.0, 4.0)
    samples = samples * 10 ** (gain_db / 20)
    rms = float(np.sqrt(np.mean(samples**2))) + 1e-9
    snr_db = rng.uniform(25.0, 45.0)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, rms / 10 ** (snr_db / 20), samples.shape)
    sf.write(path, np.clip(samples + noise, -1.0, 1.0), rate, format="FLAC")
    return {"emotion": emotion, "voice": voice, **knobs, "range": pitch_range, "gain_db": round(gain_db, 1)}


def synthetic_face(emotion: str, rng: random.Random) -> dict[str, Any]:
    """A face reading as the expression net might report a face showing `emotion` (see CONFUSABLE)."""
    alpha = np.full(len(EMOTIONS), 0.25)
    alpha[EMOTIONS.index(emotion)] += CLARITY[emotion] * float(np.exp(rng.uniform(np.log(0.2), np.log(12.0))))
    alpha[EMOTIONS.index(rng.choice(CONFUSABLE[emotion]))] += float(np.exp(rng.uniform(np.log(0.1), np.log(3.0))))
    probs = np.random.default_rng(rng.getrandbits(32)).dirichlet(alpha)
    return {
        "expression": {e: round(float(p), 5) for e, p in zip(EMOTIONS, probs, strict=True)},
        "detection": round(rng.uniform(0.84, 0.96), 3),
        "coverage": rng.choice((1.0, 1.0, 1.0, 2 / 3, 0.5)),
        "shows": emotion,
    }


class _Photos:
    """Frames cut from the real photos skimage ships: the smiling astronaut, and pictures with no face."""

    def __init__(self, rng: np.random.Generator) -> None:
        from skimage import data

        self.rng = rng
        self.astronaut = Image.fromarray(data.astronaut())
        self.scenes = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in ("coffee", "rocket", "chelsea")]
        self.scenes += [Image.fromarray(getattr(data, n)()).convert("RGB") for n in ("brick", "grass", "coins")]

    def smiles(self, out: Path, sid: str, rng: random.Random) -> list[str]:
        """1-3 augmented frames of the astronaut, each keeping her whole face in view."""
        paths = []
        x0, y0, x1, y1 = ASTRONAUT_FACE
        for k in range(rng.randint(1, 3)):
            side = rng.randint(max(x1 - x0, y1 - y0) + 20, 512)
            left = rng.randint(max(0, x1 - side), min(x0, 512 - side))
            top = rng.randint(max(0, y1 - side), min(y0, 512 - side))
            img = self.astronaut.crop((left, top, left + side, top + side)).rotate(rng.uniform(-12, 12))
            img = img.resize((rng.randint(160, 480),) * 2)
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.6, 1.3))
            img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.7, 1.2))
            if rng.random() < 0.3:
                img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
            paths.append(self._save(img, out, f"{sid}_{k}", rng))
        return paths

    def no_face(self, out: Path, sid: str, rng: random.Random) -> list[str]:
        """One frame without a face: a crop of a scene, or noise."""
        if rng.random() < 0.3:
            img = Image.fromarray(self.rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))
        else:
            scene = rng.choice(self.scenes)
            w, h = scene.size
            side = rng.randint(min(w, h) // 2, min(w, h))
            left, top = rng.randint(0, w - side), rng.randint(0, h - side)
            img = scene.crop((left, top, left + side, top + side)).resize((256, 256))
        return [self._save(img, out, f"{sid}_0", rng)]

    @staticmethod
    def _save(img: Image.Image, out: Path, name: str, rng: random.Random) -> str:
        rel = f"images/{name}.jpg"
        img.convert("RGB").save(out / rel, "JPEG", quality=rng.randint(60, 92))
        return rel
