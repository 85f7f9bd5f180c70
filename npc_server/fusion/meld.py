"""MELD (Poria et al., 2019) -> a fusion manifest: each utterance's text, label, and its media once extracted.

MELD ships mp4 clips, which cannot be decoded here (no ffmpeg). Extract, elsewhere, beside each clip:
`dia3_utt1.wav` (audio) and `dia3_utt1_01.jpg`, `dia3_utt1_02.jpg`, ... (frames); docs/fusion.md shows how.
Rows without them are text-only.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from npc_server.fusion.data import Log, ManifestError, stderr_log

# MELD's labels -> EMOTIONS, and where each split's CSV and clips live in MELD.Raw.
MELD_LABELS = {
    "anger": "angry",
    "disgust": "disgust",
    "fear": "fear",
    "joy": "happy",
    "sadness": "sad",
    "surprise": "surprise",
    "neutral": "neutral",
}
MELD_SPLITS = {  # MELD split -> (csv name, clip folder names, our split); dev is more training data
    "train": ("train_sent_emo.csv", ("train_splits",), "train"),
    "dev": ("dev_sent_emo.csv", ("dev_splits_complete", "dev_splits"), "train"),
    "test": ("test_sent_emo.csv", ("output_repeated_splits_test", "test_splits"), "test"),
}
MAX_MELD_FRAMES = 8
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def meld_manifest(meld_dir: Path, out: Path, log: Log = stderr_log) -> dict[str, int]:
    """Write a manifest for a MELD folder; returns row counts per MELD split and with media."""
    counts: dict[str, int] = {}
    lines = []
    for meld_split, (csv_name, clip_dirs, split) in MELD_SPLITS.items():
        found = sorted(meld_dir.rglob(csv_name))
        if not found:
            log(f"MELD: no {csv_name} under {meld_dir}; skipping the {meld_split} split")
            continue
        folders = [d for name in clip_dirs for d in sorted(meld_dir.rglob(name)) if d.is_dir()]
        with found[0].open(encoding="utf-8", errors="replace", newline="") as f:
            for rec in csv.DictReader(f):
                label = MELD_LABELS.get(rec.get("Emotion", "").strip().lower())
                if label is None:
                    continue
                stem = f"dia{rec['Dialogue_ID'].strip()}_utt{rec['Utterance_ID'].strip()}"
                row: dict[str, Any] = {"id": f"meld-{meld_split}-{stem}", "text": _meld_text(rec["Utterance"])}
                row |= _meld_media(folders, stem, out.parent)
                row |= {"label": label, "split": split, "tags": ["meld", f"meld:{meld_split}"]}
                lines.append(json.dumps(row))
                counts[meld_split] = counts.get(meld_split, 0) + 1
                counts["with_audio"] = counts.get("with_audio", 0) + ("audio" in row)
                counts["with_frames"] = counts.get("with_frames", 0) + ("images" in row)
    if not lines:
        raise ManifestError(f"no MELD csv files (train_sent_emo.csv, ...) under {meld_dir}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return counts


def _meld_media(folders: list[Path], stem: str, root: Path) -> dict[str, Any]:
    """The extracted audio and frames of one utterance, as manifest paths relative to `root`."""
    media: dict[str, Any] = {}
    for folder in folders:
        audio = [folder / f"{stem}{ext}" for ext in (".wav", ".flac") if (folder / f"{stem}{ext}").is_file()]
        frames = sorted(p for p in folder.glob(f"{stem}_*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if audio:
            media["audio"] = os.path.relpath(audio[0], root)
        if frames:
            media["images"] = [os.path.relpath(p, root) for p in frames[:MAX_MELD_FRAMES]]
    return media


def _meld_text(text: str) -> str:
    """MELD's CSVs hold UTF-8 read as cp1252 in places ('Iâ€™m'); undo that where it round-trips."""
    try:
        fixed = text.encode("cp1252").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        fixed = text
    return " ".join(fixed.replace("\u2019", "'").replace("\x92", "'").split())
