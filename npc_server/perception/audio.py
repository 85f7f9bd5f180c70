"""Turn uploaded audio bytes into float32 mono 16 kHz samples, refusing bad input before decoding it.

The container is sniffed from its magic bytes (never from the filename). libsndfile (via soundfile) then
decodes WAV, FLAC, OGG and MP3 itself; no ffmpeg is needed. The duration is read from the header first, and
decoding never reads past `max_seconds`, so a file that lies about its length cannot cost more than that.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
import soxr

from npc_server.errors import InvalidInput, PayloadTooLarge, UnsupportedMedia

SAMPLE_RATE = 16_000
ACCEPTED_FORMATS = ("WAV", "FLAC", "OGG", "MP3")

# libsndfile's major-format names that belong to each sniffed container.
_SNDFILE_FORMATS = {"WAV": {"WAV", "WAVEX", "RF64"}, "FLAC": {"FLAC"}, "OGG": {"OGG"}, "MP3": {"MP3"}}
_MIN_RATE, _MAX_RATE = 1_000, 384_000
_BLOCK_FRAMES = 65_536


def sniff_format(data: bytes) -> str | None:
    """The container named by the first bytes, or None when it is none of ACCEPTED_FORMATS."""
    if data[:4] in (b"RIFF", b"RF64") and data[8:12] == b"WAVE":
        return "WAV"
    if data[:4] == b"fLaC":
        return "FLAC"
    if data[:4] == b"OggS":
        return "OGG"
    if data[:3] == b"ID3":
        return "MP3"
    if len(data) >= 3 and _is_mpeg_audio_frame(data[:3]):
        return "MP3"
    return None


def _is_mpeg_audio_frame(head: bytes) -> bool:
    """An MPEG audio frame header: 11 sync bits, a valid version, layer, bitrate and sample-rate index.

    Layer bits 00 are excluded, which also keeps AAC ADTS streams (0xFFF1/0xFFF9) out.
    """
    b0, b1, b2 = head[0], head[1], head[2]
    if b0 != 0xFF or (b1 & 0xE0) != 0xE0:
        return False
    version = (b1 >> 3) & 0x3
    layer = (b1 >> 1) & 0x3
    bitrate_index = b2 >> 4
    rate_index = (b2 >> 2) & 0x3
    return version != 0b01 and layer != 0b00 and bitrate_index != 0xF and rate_index != 0b11


def decode_audio(data: bytes, *, max_bytes: int, max_seconds: float, filename: str | None = None) -> np.ndarray:
    """Decode an uploaded clip to float32 mono at SAMPLE_RATE.

    `filename` is accepted for the caller's convenience and deliberately ignored: the bytes decide.
    Raises InvalidInput (empty, corrupt, truncated beyond use, non-finite samples), PayloadTooLarge
    (over max_bytes or max_seconds) and UnsupportedMedia (not WAV, FLAC, OGG or MP3).
    """
    del filename  # the format comes from the bytes, never from the name
    if not data:
        raise InvalidInput("The audio file is empty.")
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"The audio file is larger than the limit of {max_bytes} bytes.")
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedMedia("Unrecognised audio format; accepted formats are " + ", ".join(ACCEPTED_FORMATS) + ".")

    samples, rate = _read_limited(data, fmt, max_seconds)
    if samples.size == 0:
        raise InvalidInput("The audio file contains no samples.")
    if not np.isfinite(samples).all():
        raise InvalidInput("The audio contains NaN or infinite sample values.")
    return resample_mono(samples, rate)


def _read_limited(data: bytes, fmt: str, max_seconds: float) -> tuple[np.ndarray, int]:
    """Check the header, then decode at most max_seconds of audio (mono float32) in blocks."""
    too_long = PayloadTooLarge(f"The audio is longer than the limit of {max_seconds:g} seconds.")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            if f.format not in _SNDFILE_FORMATS[fmt]:
                raise InvalidInput(f"The audio file is not a valid {fmt} file.")
            rate = int(f.samplerate)
            if not _MIN_RATE <= rate <= _MAX_RATE or f.channels < 1:
                raise InvalidInput("The audio file has an unusable sample rate or channel count.")
            limit = int(max_seconds * rate)
            if f.frames > limit:  # the header's own length: refused without decoding
                raise too_long
            blocks: list[np.ndarray] = []
            total = 0
            while total <= limit:  # a header can understate; never decode more than limit + 1 block
                block = f.read(min(_BLOCK_FRAMES, limit + 1 - total), dtype="float32", always_2d=True)
                if block.shape[0] == 0:
                    break
                blocks.append(block.mean(axis=1))
                total += block.shape[0]
            if total > limit:
                raise too_long
    except (InvalidInput, PayloadTooLarge):
        raise
    except (sf.SoundFileError, RuntimeError, ValueError, EOFError) as exc:
        raise InvalidInput(f"The audio file could not be decoded as {fmt}; it may be corrupt.") from exc
    if not blocks:
        return np.zeros(0, dtype=np.float32), rate
    return np.concatenate(blocks).astype(np.float32, copy=False), rate


def resample_mono(samples: np.ndarray, rate: int) -> np.ndarray:
    """Resample 1-D float samples to SAMPLE_RATE (soxr, as librosa uses)."""
    if rate == SAMPLE_RATE:
        return np.ascontiguousarray(samples, dtype=np.float32)
    out = soxr.resample(samples.astype(np.float32, copy=False), rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(out, dtype=np.float32)


def pcm16_to_float(data: bytes) -> np.ndarray:
    """Raw PCM16 little-endian mono 16 kHz bytes (the live stream's format) to float32 in [-1, 1)."""
    if len(data) % 2:
        raise InvalidInput("PCM16 audio must have an even number of bytes.")
    return (np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0).astype(np.float32)
