"""Real test media made at test time: espeak-ng speech, scikit-image's astronaut photo, crafted bad files."""

from __future__ import annotations

import io
import struct
import subprocess
import zlib

import numpy as np
import soundfile as sf
from PIL import Image


def speech_wav(text: str, *espeak_args: str) -> bytes:
    """A WAV of espeak-ng saying `text` (args such as -p 80 -s 220 -a 180 change pitch, speed, loudness)."""
    return subprocess.run(
        ["espeak-ng", "-v", "en-us", *espeak_args, "--stdout", text], check=True, capture_output=True
    ).stdout


def encode_audio(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def to_mp3(wav: bytes) -> bytes:
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return encode_audio(samples, rate, "MP3")


def image_bytes(rgb: np.ndarray, fmt: str = "JPEG", **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def astronaut_jpeg() -> bytes:
    from skimage import data

    return image_bytes(data.astronaut())


def blank_jpeg() -> bytes:
    return image_bytes(np.full((240, 320, 3), 128, dtype=np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that claims width x height pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
