"""VoiceAnalyzer on real speech rendered by espeak-ng at test time, with the real Whisper tiny.en and Silero VAD.

Measured here (2-core CPU): corpus WER of the three sentences below at en-us / 160 wpm 0.07 (bound 0.25); arousal of
the calm rendering about 0.1 and of the excited one about 0.75. The bounds below leave room for that noise.
"""

from __future__ import annotations

import io
import os
import re
import subprocess

import numpy as np
import pytest
import soundfile as sf

from npc_server.errors import InvalidInput, PayloadTooLarge, UnsupportedMedia
from npc_server.perception import voice
from npc_server.perception.audio import SAMPLE_RATE
from npc_server.perception.voice import VOICE_DIM, VoiceAnalyzer

os.environ.setdefault("HF_HUB_OFFLINE", "1")


SENTENCES = (
    "Have you seen my brother in the village today?",
    "Please tell me the way to the castle.",
    "We need more wood for the fire before the night comes.",
)
WER_BOUND = 0.25
CALM = ("-a", "40", "-p", "20", "-s", "110")  # quiet, low, slow
EXCITED = ("-a", "180", "-p", "80", "-s", "220")  # loud, high, fast


def speak(text: str, *args: str, voice: str = "en-us") -> bytes:
    """A WAV (22.05 kHz PCM16) of espeak-ng saying `text`."""
    cmd = ["espeak-ng", "-v", voice, *args, "--stdout", text]
    return subprocess.run(cmd, capture_output=True, check=True, timeout=30).stdout


def to_format(wav: bytes, fmt: str) -> bytes:
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt)
    return buf.getvalue()


def word_error_rate(refs: list[str], hyps: list[str]) -> float:
    """Corpus WER: word-level edit distance summed over pairs / reference words; case and punctuation ignored."""

    def words(s: str) -> list[str]:
        return re.sub(r"[^a-z' ]", " ", s.lower()).split()

    edits = total = 0
    for ref, hyp in zip(refs, hyps, strict=True):
        r, h = words(ref), words(hyp)
        row = list(range(len(h) + 1))
        for i, rw in enumerate(r, 1):
            prev, row = row, [i] + [0] * len(h)
            for j, hw in enumerate(h, 1):
                row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (rw != hw))
        edits += row[-1]
        total += len(r)
    return edits / total


@pytest.fixture(scope="module")
def analyzer() -> VoiceAnalyzer:
    va = VoiceAnalyzer(max_bytes=5_000_000, max_seconds=30.0, whisper_threads=1)
    va.warm()
    return va


def test_word_error_rate_and_reading_shape(analyzer: VoiceAnalyzer) -> None:
    readings = [analyzer.analyze(speak(s, "-s", "160")) for s in SENTENCES]
    wer = word_error_rate(list(SENTENCES), [r.transcript for r in readings])
    assert wer < WER_BOUND, f"WER {wer:.2f}: {[r.transcript for r in readings]}"
    for r in readings:
        assert r.speech_found
        assert 0.0 < r.transcript_confidence <= 1.0
        assert 0.0 < r.confidence <= 1.0 and 0.0 <= r.arousal <= 1.0 and r.valence == 0.0
        assert r.features.shape == (VOICE_DIM,) and r.features.dtype == np.float32
        assert np.isfinite(r.features).all() and r.features.any()
        assert set(r.timings_ms) == {"decode", "vad", "prosody", "asr"}
        p = r.prosody
        assert 0.5 < p.speech_seconds <= p.duration_seconds
        assert 0.0 <= p.pause_ratio < 0.6
        assert 60.0 < p.pitch_hz < 250.0 and -40.0 < p.loudness_db < 0.0
        assert 1.0 < p.speaking_rate_wps < 8.0
        starts = [w[1] for w in r.words]
        assert starts == sorted(starts) and all(0.0 <= w[1] <= w[2] <= p.duration_seconds + 0.1 for w in r.words)


def test_excited_rendering_has_clearly_higher_arousal_than_calm(analyzer: VoiceAnalyzer) -> None:
    text = "Get out of my shop right now, thief!"
    calm = analyzer.analyze(speak(text, *CALM))
    excited = analyzer.analyze(speak(text, *EXCITED))
    assert calm.speech_found and excited.speech_found
    assert excited.arousal - calm.arousal > 0.3, (calm.arousal, excited.arousal)
    # Each cue moves the way the rendering was set.
    assert excited.prosody.loudness_db > calm.prosody.loudness_db + 6.0
    assert excited.prosody.pitch_hz > 1.4 * calm.prosody.pitch_hz
    assert excited.prosody.speaking_rate_wps > calm.prosody.speaking_rate_wps
    assert not np.allclose(calm.features, excited.features)


def test_pitch_tracks_the_rendered_voice(analyzer: VoiceAnalyzer) -> None:
    low = analyzer.analyze(speak(SENTENCES[1], "-p", "15"))
    high = analyzer.analyze(speak(SENTENCES[1], "-p", "85"))
    assert high.prosody.pitch_hz > 1.5 * low.prosody.pitch_hz
    assert high.arousal > low.arousal


def test_mp3_named_wav_is_decoded_as_mp3(analyzer: VoiceAnalyzer) -> None:
    reading = analyzer.analyze(to_format(speak(SENTENCES[1], "-s", "160"), "MP3"), filename="clip.wav")
    assert reading.speech_found and reading.transcript
    assert word_error_rate([SENTENCES[1]], [reading.transcript]) < 0.5


def test_example_clip_words_and_rate(analyzer: VoiceAnalyzer) -> None:
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "examples", "voice.wav"), "rb") as f:
        reading = analyzer.analyze(f.read(), filename="voice.wav")
    assert word_error_rate(["Good morning. I need a new sword for the journey north."], [reading.transcript]) < 0.1
    assert 3.0 < reading.prosody.speaking_rate_wps < 4.5  # 11 words over about 2.9 s of speech


def test_regions_are_decoded_on_the_clips_clock(analyzer: VoiceAnalyzer) -> None:
    """Two sentences apart by 1.5 s of silence, after 1 s of it: two VAD regions, each decoded in its own window;
    the words of the second start after the gap and speaking rate does not count the gap."""
    from npc_server.perception.audio import decode_audio

    first, second = (decode_audio(speak(s, "-s", "160"), max_bytes=5_000_000, max_seconds=30.0) for s in SENTENCES[1:])
    gap = np.zeros(int(1.5 * SAMPLE_RATE), dtype=np.float32)
    clip = np.concatenate([gap[:SAMPLE_RATE], first, gap, second])
    reading = analyzer.analyze_samples(clip)
    assert word_error_rate([" ".join(SENTENCES[1:])], [reading.transcript]) < WER_BOUND, reading.transcript
    starts = [w[1] for w in reading.words]
    assert starts == sorted(starts) and 0.7 < starts[0] < 1.3
    second_start = (SAMPLE_RATE + first.size + gap.size) / SAMPLE_RATE
    n_first = len(SENTENCES[1].split())
    assert all(w[2] <= second_start - 0.9 for w in reading.words[: n_first - 1])
    assert all(w[1] >= second_start - 0.3 for w in reading.words[n_first + 1 :])
    assert 2.5 < reading.prosody.speaking_rate_wps < 5.0


def test_runaway_decoding_falls_back_to_the_full_window(
    analyzer: VoiceAnalyzer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Text that compresses like a repetition loop sends the region through faster-whisper's 30 s window."""
    calls: list[int] = []
    full = analyzer._transcribe_full

    def counted(samples: np.ndarray, regions: list[tuple[float, float]]) -> list[voice.Word]:
        calls.append(len(regions))
        return full(samples, regions)

    monkeypatch.setattr(voice, "_MAX_COMPRESSION", 0.5)  # any text is "repetitive"
    monkeypatch.setattr(analyzer, "_transcribe_full", counted)
    reading = analyzer.analyze(speak(SENTENCES[2], "-s", "160"))
    assert calls == [1]
    assert word_error_rate([SENTENCES[2]], [reading.transcript]) < 0.5
    assert 1.0 < reading.prosody.speaking_rate_wps < 8.0


@pytest.mark.parametrize("kind", ["silence", "white_noise", "hum"])
def test_no_speech_is_not_an_error(analyzer: VoiceAnalyzer, kind: str) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(3 * SAMPLE_RATE) / SAMPLE_RATE
    clip = {
        "silence": np.zeros(t.size),
        "white_noise": rng.normal(0.0, 0.1, t.size),
        "hum": 0.2 * np.sin(2 * np.pi * 50.0 * t),
    }[kind].astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, clip, SAMPLE_RATE, format="WAV")
    reading = analyzer.analyze(buf.getvalue(), filename="quiet.wav")
    assert not reading.speech_found
    assert reading.transcript == "" and reading.words == []
    assert reading.arousal == 0.0 and reading.confidence == 0.0
    assert reading.features.shape == (VOICE_DIM,) and not reading.features.any()
    assert reading.prosody.duration_seconds == pytest.approx(3.0)


def test_analyze_samples_takes_the_live_path(analyzer: VoiceAnalyzer) -> None:
    from npc_server.perception.audio import decode_audio, pcm16_to_float

    samples = decode_audio(speak(SENTENCES[0], "-s", "160"), max_bytes=5_000_000, max_seconds=30.0)
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    reading = analyzer.analyze_samples(pcm16_to_float(pcm))
    assert reading.speech_found and "decode" not in reading.timings_ms
    assert word_error_rate([SENTENCES[0]], [reading.transcript]) < 0.5
    assert not analyzer.analyze_samples(np.zeros(0, dtype=np.float32)).speech_found


def test_analyze_samples_refuses_bad_arrays(analyzer: VoiceAnalyzer) -> None:
    bad = np.zeros(SAMPLE_RATE, dtype=np.float32)
    bad[10] = np.nan
    with pytest.raises(InvalidInput):
        analyzer.analyze_samples(bad)
    with pytest.raises(InvalidInput):
        analyzer.analyze_samples(np.zeros((2, SAMPLE_RATE), dtype=np.float32))
    with pytest.raises(PayloadTooLarge):
        analyzer.analyze_samples(np.zeros(31 * SAMPLE_RATE, dtype=np.float32))


def test_bad_uploads_raise_client_errors(analyzer: VoiceAnalyzer) -> None:
    wav = speak("Hello there.")
    with pytest.raises(InvalidInput):
        analyzer.analyze(b"")
    with pytest.raises(UnsupportedMedia):
        analyzer.analyze(b"not audio at all", filename="x.wav")
    with pytest.raises(InvalidInput):
        analyzer.analyze(to_format(wav, "FLAC")[:300])
    with pytest.raises(PayloadTooLarge):
        analyzer.analyze(wav + bytes(5_000_000))
    buf = io.BytesIO()
    sf.write(buf, np.zeros(8_000 * 600, dtype=np.float32), 8_000, format="FLAC")  # 10 minutes, about 14 kB
    with pytest.raises(PayloadTooLarge):
        analyzer.analyze(buf.getvalue())
