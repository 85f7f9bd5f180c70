"""Training, evaluation, the manifest loader and its cache, MELD import, the generator and the CLI, on tiny data."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from npc_server.cli import main
from npc_server.fusion.data import (
    Dataset,
    ManifestError,
    SyntheticFace,
    build_dataset,
    label_affect,
    load_manifest,
    read_manifest,
    synthetic_face_reading,
)
from npc_server.fusion.features import INPUT_DIMS, face_vector
from npc_server.fusion.generate import make_dataset, synthetic_face
from npc_server.fusion.meld import meld_manifest
from npc_server.fusion.metrics import classification_report, format_report
from npc_server.fusion.model import METHODS, FusionConfig, FusionSuite
from npc_server.fusion.train import TrainConfig, class_weights, evaluate_loss, fit, prepare, split, train_suite
from npc_server.perception.types import EMOTIONS, Prosody, TextReading, VoiceReading

AROUSAL = {"angry": 0.8, "disgust": 0.45, "fear": 0.85, "happy": 0.65, "sad": 0.2, "surprise": 0.75, "neutral": 0.4}


def face_row(label: str, rng: random.Random) -> np.ndarray:
    face = {k: v for k, v in synthetic_face(label, rng).items() if k != "shows"}
    vec = face_vector(synthetic_face_reading(SyntheticFace.model_validate(face)))
    assert vec is not None
    return vec


def toy_dataset(per_class: int = 16, seed: int = 0) -> Dataset:
    """Feature-level samples: synthetic faces, noisy text distributions, voice arousal; some modalities missing."""
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    rows = []
    for label in EMOTIONS:
        valence, arousal = label_affect(label)
        for k in range(per_class):
            alpha = np.full(len(EMOTIONS), 0.3)
            alpha[EMOTIONS.index(label)] += 3.0
            probs = nrng.dirichlet(alpha)
            text = np.concatenate([probs, [valence, valence, arousal, probs.max()]]).astype(np.float32)
            voice = nrng.normal(0.5, 0.1, INPUT_DIMS["voice"]).astype(np.float32)
            voice[5] = AROUSAL[label] + nrng.normal(0, 0.1)
            vectors = {"face": face_row(label, rng), "voice": voice, "text": text}
            for m in rng.sample(list(vectors), rng.randint(0, 2)):  # hide up to two modalities
                vectors[m] = None
            split = "test" if k < per_class // 5 else "train"
            rows.append({"vectors": vectors, "label": label, "valence": valence, "arousal": arousal, "split": split})
    return build_dataset(rows)


def test_a_few_training_steps_lower_the_loss() -> None:
    ds = toy_dataset()
    train, val, _ = split(ds, seed=0)
    cfg = TrainConfig(patience=100)
    suite = FusionSuite(FusionConfig())
    prepare(suite, train)
    weights = class_weights(train.labels)
    with_text = train.where(lambda i: bool(train.present[i, 2]))
    for model, rows in ((suite.attention, train), (suite.member("text"), with_text)):
        before = evaluate_loss(model, rows, weights, cfg)
        result = fit(model, rows, val, cfg, max_epochs=30)
        assert result["history"][-1][0] < result["history"][0][0]
        assert evaluate_loss(model, rows, weights, cfg) < 0.9 * before


def test_training_is_seeded() -> None:
    ds = toy_dataset(per_class=8)
    train, val, _ = split(ds, seed=0)
    states = []
    for _ in range(2):
        torch.manual_seed(0)  # train_suite seeds initialisation the same way
        suite = FusionSuite(FusionConfig())
        prepare(suite, train)
        fit(suite.attention, train, val, TrainConfig(seed=3), max_epochs=3)
        states.append(suite.attention.state_dict())
    assert all(np.array_equal(states[0][k].numpy(), states[1][k].numpy()) for k in states[0])


def test_train_suite_reports_every_method_and_picks_by_held_out_numbers() -> None:
    _, report = train_suite(toy_dataset(), TrainConfig(max_epochs=6), log=lambda _: None)
    held = report["test"]["all"]
    assert set(held) == set(METHODS)
    assert report["runtime_method"] == max(("late", "attention"), key=lambda m: (held[m]["macro_f1"], m == "late"))
    assert report["rows"]["test"] == 3 * len(EMOTIONS)
    assert held["face"]["coverage"] < 1.0 == held["attention"]["coverage"]


def test_split_uses_the_marks_or_holds_out_a_stratified_share() -> None:
    ds = toy_dataset(per_class=20)
    train, val, test = split(ds, seed=0)
    assert all(s == "test" for s in test.split) and len(test) == 4 * len(EMOTIONS)
    assert len(train) + len(val) + len(test) == len(ds) and len(val) > 0
    ds.split = [""] * len(ds)
    _, _, test = split(ds, seed=0)
    assert np.bincount(test.labels).tolist() == [4] * len(EMOTIONS)


def test_classification_report_matches_sklearn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for y_true, y_pred in (
        (rng.integers(0, 7, 300), rng.integers(0, 7, 300)),
        (rng.integers(0, 5, 100), rng.integers(1, 6, 100)),  # some classes never true, some never predicted
    ):
        ours = classification_report(y_true, y_pred)
        ref = metrics.classification_report(y_true, y_pred, output_dict=True, zero_division=0)
        for key, ref_row in ref.items():
            if key == "accuracy":
                assert ours["accuracy"] == pytest.approx(ref_row, abs=1e-4)
                assert ours["micro avg"]["f1"] == pytest.approx(ref_row, abs=1e-4)
                continue
            name = EMOTIONS[int(key)] if key.isdigit() else key
            for col, ours_col in (("precision", "precision"), ("recall", "recall"), ("f1-score", "f1")):
                assert ours[name][ours_col] == pytest.approx(ref_row[col], abs=1e-4), (name, col)
            assert ours[name]["support"] == ref_row["support"]
    text = format_report(ours)
    assert "macro avg" in text and "weighted avg" in text and "accuracy" in text


def test_manifest_errors_name_the_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"text": "hello", "label": "neutral"}\n{"text": "hi", "label": "furious"}\n')
    with pytest.raises(ManifestError, match=r"manifest.jsonl:2: label"):
        read_manifest(path)
    path.write_text('{"images": ["missing.jpg"], "label": "happy"}\n')
    with pytest.raises(ManifestError, match=r"manifest.jsonl:1: cannot read missing.jpg"):
        load_manifest(path, FakeAnalyzers(), log=lambda _: None)


class FakeText:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def analyze(self, text: str) -> TextReading:
        self.calls.append(text)
        emotion = {e: (0.9 if e == "happy" else 0.1 / 6) for e in EMOTIONS}
        return TextReading(text, emotion, 0.8, 0.7, 0.6, 0.9, np.zeros(0, np.float32))


class FakeVoice:
    def __init__(self) -> None:
        self.calls = 0

    def analyze(self, data: bytes, filename: str | None = None) -> VoiceReading:
        self.calls += 1
        prosody = Prosody(-18.0, 120.0, 5.0, 3.0, 0.1, 2.0, 2.2)
        return VoiceReading(True, "thanks a lot", 0.9, [], prosody, 0.6, 0.0, 0.8, np.zeros(0, np.float32))


class FakeAnalyzers:
    def __init__(self) -> None:
        self.text, self.voice = FakeText(), FakeVoice()
        self.face: Any = None

    def close(self) -> None:
        pass


def test_manifest_loader_reads_transcripts_and_caches_features(tmp_path: Path) -> None:
    (tmp_path / "clip.wav").write_bytes(b"RIFF....WAVE fake")
    smile = {"expression": {"happy": 0.9, "neutral": 0.1}, "detection": 0.9}
    rows = [
        {"text": "Thanks!", "label": "happy", "split": "train"},
        {"audio": "clip.wav", "face": smile, "label": "happy", "valence": 0.5, "tags": ["spoken"]},
        {"face": smile, "label": "sad"},
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = FakeAnalyzers()
    ds = load_manifest(manifest, first, log=lambda _: None)  # type: ignore[arg-type]
    assert first.text.calls == ["Thanks!", "thanks a lot"]  # no typed text: the transcript is read
    assert first.voice.calls == 1
    assert ds.present.tolist() == [[False, False, True], [True, True, True], [True, False, False]]
    assert ds.valence[1] == pytest.approx(0.5) and ds.valence[2] == pytest.approx(label_affect("sad")[0])
    assert ds.split == ["train", "", ""] and ds.tags[1] == ["spoken"]
    assert (tmp_path / "manifest.jsonl.features.npz").is_file()
    again = FakeAnalyzers()
    cached = load_manifest(manifest, again, log=lambda _: None)  # type: ignore[arg-type]
    assert again.text.calls == [] and again.voice.calls == 0
    for m in ds.x:
        assert np.array_equal(ds.x[m], cached.x[m])


def test_meld_import(tmp_path: Path) -> None:
    root = tmp_path / "MELD.Raw"
    clips = root / "train" / "train_splits"
    clips.mkdir(parents=True)
    (clips / "dia0_utt0.wav").write_bytes(b"RIFF")
    (clips / "dia0_utt0_01.jpg").write_bytes(b"\xff\xd8")
    header = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\n"
    (root / "train_sent_emo.csv").write_text(
        header + '1,"Oh my God, Iâ€™m so happy!",Monica,joy,positive,0,0,1,1,0,1\n'
        "2,Get out.,Ross,anger,negative,0,1,1,1,1,2\n",
        encoding="utf-8",
    )
    (root / "test_sent_emo.csv").write_text(header + "1,Hm.,Joey,neutral,neutral,5,2,1,1,0,1\n", encoding="utf-8")
    out = tmp_path / "meld" / "manifest.jsonl"
    counts = meld_manifest(root, out, log=lambda _: None)
    assert counts["train"] == 2 and counts["test"] == 1 and counts["with_audio"] == 1
    rows = [r.model_dump() for r in read_manifest(out)]
    assert rows[0]["text"] == "Oh my God, I'm so happy!" and rows[0]["label"] == "happy"
    assert rows[0]["audio"] == "../MELD.Raw/train/train_splits/dia0_utt0.wav"
    assert rows[0]["images"] == ["../MELD.Raw/train/train_splits/dia0_utt0_01.jpg"]
    assert rows[1]["label"] == "angry" and rows[1]["audio"] is None
    assert rows[2]["split"] == "test"


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="the generator speaks with espeak-ng")
def test_generator_writes_a_valid_manifest_following_the_labelling_rule(tmp_path: Path) -> None:
    counts = make_dataset(tmp_path, per_class=1, per_disagreement=2, seed=5)
    rows = read_manifest(tmp_path / "manifest.jsonl")
    raw = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert counts["rows"] == len(rows) == len(EMOTIONS) + 10
    for row, extra in zip(rows, raw, strict=True):
        for rel in [*(row.images), *([row.audio] if row.audio else [])]:
            assert (tmp_path / rel).stat().st_size > 0
        if "disagree" in row.tags:  # a positive display beside a negative channel: the negative label wins
            shows = extra["shows"]
            assert "happy" in shows.values() and row.label in ("angry", "sad", "fear")
            assert row.label in shows.values()


def test_cli_trains_and_evaluates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(0)
    manifest = tmp_path / "faces.jsonl"
    with manifest.open("w") as f:
        for label in EMOTIONS:
            for k in range(10):
                face = {k2: v for k2, v in synthetic_face(label, rng).items() if k2 != "shows"}
                f.write(json.dumps({"face": face, "label": label, "split": "test" if k < 3 else "train"}) + "\n")
    checkpoint = tmp_path / "checkpoint"
    assert main(["fusion", "train", "--data", str(manifest), "--out", str(checkpoint), "--max-epochs", "3"]) == 0
    assert {p.name for p in checkpoint.iterdir()} == {"model.safetensors", "config.json", "metrics.json"}
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["runtime_method"] in ("late", "attention") and config["training"]["rows"]["test"] == 21
    out = capsys.readouterr().out
    assert "macro avg" in out and "| method |" in out
    assert main(["fusion", "eval", "--data", str(manifest), "--checkpoint", str(checkpoint)]) == 0
    metrics = json.loads((tmp_path / "faces.jsonl.eval.json").read_text())
    assert metrics["all"]["attention"]["n"] == 21
    assert "weighted avg" in capsys.readouterr().out
