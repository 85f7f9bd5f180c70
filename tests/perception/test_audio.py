"""decode_audio / pcm16_to_float on real encoded media made here with soundfile (libsndfile, lame for MP3)."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import soundfile as sf

from npc_server.errors import InvalidInput, PayloadTooLarge, UnsupportedMedia
from npc_server.perception.audio import ACCEPTED_FORMATS, SAMPLE_RATE, decode_audio, pcm16_to_float, sniff_format

LIMITS = {"max_bytes": 5_000_000, "max_seconds": 60.0}


def encode(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tone() -> tuple[np.ndarray, int]:
    """1.5 s stereo, 22.05 kHz: 220 Hz left, 330 Hz right, amplitude 0.3."""
    rate = 22_050
    t = np.arange(int(1.5 * rate)) / rate
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 220 * t), 0.3 * np.sin(2 * np.pi * 330 * t)], axis=1)
    return stereo.astype(np.float32), rate


@pytest.fixture(scope="module")
def encoded(tone: tuple[np.ndarray, int]) -> dict[str, bytes]:
    samples, rate = tone
    return {fmt: encode(samples, rate, fmt) for fmt in ACCEPTED_FORMATS}


def assert_client_safe(message: str) -> None:
    """Messages name the problem, never a path or library internals."""
    assert "/" not in message and "\\" not in message
    assert "sndfile" not in message.lower() and "error" not in message.lower()


@pytest.mark.parametrize("fmt", ACCEPTED_FORMATS)
def test_each_format_decodes_to_16k_mono_float(fmt: str, encoded: dict[str, bytes]) -> None:
    data = encoded[fmt]
    assert sniff_format(data) == fmt
    out = decode_audio(data, **LIMITS)
    assert out.dtype == np.float32 and out.ndim == 1
    # 1.5 s at 16 kHz; MP3 adds encoder delay and padding (under 0.1 s).
    assert abs(out.size - 1.5 * SAMPLE_RATE) < 0.1 * SAMPLE_RATE
    # Mean of two 0.3-amplitude sines: RMS 0.3 / sqrt(2) / sqrt(2) = 0.15 (lossy codecs within 15 %).
    rms = float(np.sqrt(np.mean(out[2000:-2000] ** 2)))
    assert rms == pytest.approx(0.15, rel=0.15)


def test_mp3_with_id3_tag_is_sniffed_as_mp3(encoded: dict[str, bytes]) -> None:
    tag = b"ID3\x04\x00\x00\x00\x00\x00\x20" + bytes(32)  # an ID3v2.4 tag holding 32 bytes of padding
    data = tag + encoded["MP3"]
    assert sniff_format(data) == "MP3"
    assert decode_audio(data, **LIMITS).size > SAMPLE_RATE


def test_filename_is_ignored_mp3_named_wav_decodes_as_mp3(encoded: dict[str, bytes]) -> None:
    as_wav = decode_audio(encoded["MP3"], filename="clip.wav", **LIMITS)
    as_mp3 = decode_audio(encoded["MP3"], filename="clip.mp3", **LIMITS)
    np.testing.assert_array_equal(as_wav, as_mp3)
    wav_named_mp3 = decode_audio(encoded["WAV"], filename="clip.mp3", **LIMITS)
    assert abs(wav_named_mp3.size - 1.5 * SAMPLE_RATE) <= 1


def test_16k_mono_passes_through_unresampled() -> None:
    x = (0.5 * np.sin(np.arange(16_000) * 0.05)).astype(np.float32)
    out = decode_audio(encode(x, SAMPLE_RATE, "WAV", "FLOAT"), **LIMITS)
    np.testing.assert_array_equal(out, x)


def test_empty_is_invalid() -> None:
    with pytest.raises(InvalidInput) as err:
        decode_audio(b"", **LIMITS)
    assert "empty" in err.value.message


@pytest.mark.parametrize(
    "data",
    [
        b"just some text, not audio at all",
        b"\x89PNG\r\n\x1a\n" + bytes(64),
        b"\xff\xf1\x50\x80" + bytes(64),  # AAC ADTS: MPEG sync but layer 00
        b"RIFF\x24\x00\x00\x00AVI LIST",  # RIFF, but not WAVE
    ],
)
def test_unknown_format_is_unsupported_and_names_accepted_formats(data: bytes) -> None:
    with pytest.raises(UnsupportedMedia) as err:
        decode_audio(data, **LIMITS)
    for fmt in ACCEPTED_FORMATS:
        assert fmt in err.value.message
    assert err.value.status == 415


def test_over_max_bytes_is_refused_before_decoding(encoded: dict[str, bytes]) -> None:
    with pytest.raises(PayloadTooLarge) as err:
        decode_audio(encoded["WAV"], max_bytes=len(encoded["WAV"]) - 1, max_seconds=60.0)
    assert err.value.status == 413


def test_ten_minutes_is_refused_from_the_header_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    ten_minutes = encode(np.zeros(8_000 * 600, dtype=np.float32), 8_000, "FLAC")  # silence: about 14 kB
    assert len(ten_minutes) < 100_000

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded audio that the header already showed to be too long")

    monkeypatch.setattr(sf.SoundFile, "read", no_decoding)
    with pytest.raises(PayloadTooLarge) as err:
        decode_audio(ten_minutes, **LIMITS)
    assert "60 seconds" in err.value.message


def test_ten_minute_mp3_is_refused() -> None:
    ten_minutes = encode(np.zeros(8_000 * 600, dtype=np.float32), 8_000, "MP3")
    with pytest.raises(PayloadTooLarge):
        decode_audio(ten_minutes, max_bytes=10_000_000, max_seconds=60.0)


def test_clip_just_over_the_limit_is_refused_and_one_at_the_limit_passes() -> None:
    data = encode(np.zeros(2 * SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE, "WAV")
    with pytest.raises(PayloadTooLarge):
        decode_audio(data, max_bytes=1_000_000, max_seconds=1.5)
    assert decode_audio(data, max_bytes=1_000_000, max_seconds=2.0).size == 2 * SAMPLE_RATE


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_are_invalid(bad: float) -> None:
    x = np.zeros(16_000, dtype=np.float32)
    x[1234] = bad
    with pytest.raises(InvalidInput) as err:
        decode_audio(encode(x, SAMPLE_RATE, "WAV", "FLOAT"), **LIMITS)
    assert "NaN" in err.value.message


@pytest.mark.parametrize(
    ("fmt", "keep"),
    [("WAV", 40), ("FLAC", 200), ("FLAC", 0.5), ("OGG", 0.1), ("MP3", 200)],
)
def test_truncated_files_that_cannot_be_decoded_are_invalid(fmt: str, keep: float, encoded: dict[str, bytes]) -> None:
    data = encoded[fmt]
    cut = data[: int(keep * len(data))] if keep < 1 else data[: int(keep)]
    with pytest.raises(InvalidInput) as err:
        decode_audio(cut, **LIMITS)
    assert fmt in err.value.message
    assert_client_safe(err.value.message)


def test_wav_truncated_mid_data_decodes_what_is_there(encoded: dict[str, bytes]) -> None:
    data = encoded["WAV"]
    out = decode_audio(data[: len(data) // 2], **LIMITS)
    assert 0.6 * SAMPLE_RATE < out.size < 0.9 * SAMPLE_RATE


@pytest.mark.parametrize("magic", [b"RIFF\x00\x00\x00\x00WAVE", b"fLaC", b"OggS", b"ID3\x03\x00\x00\x00\x00\x00\x00"])
def test_corrupt_body_after_valid_magic_is_invalid(magic: bytes) -> None:
    junk = np.random.default_rng(1).integers(0, 256, 4_000, dtype=np.uint8).tobytes()
    with pytest.raises(InvalidInput) as err:
        decode_audio(magic + junk, **LIMITS)
    assert_client_safe(err.value.message)


def test_wav_with_no_samples_is_invalid() -> None:
    header = b"RIFF" + struct.pack("<I", 36) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, 16_000, 32_000, 2, 16)
    with pytest.raises(InvalidInput):
        decode_audio(header + b"data" + struct.pack("<I", 0), **LIMITS)


def test_pcm16_to_float() -> None:
    raw = np.array([0, 16_384, -32_768, 32_767], dtype="<i2").tobytes()
    out = pcm16_to_float(raw)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.5, -1.0, 32_767 / 32_768])
    assert pcm16_to_float(b"").size == 0
    with pytest.raises(InvalidInput):
        pcm16_to_float(b"\x00\x01\x02")
