"""FaceAnalyzer and decode_image on real media made at test time (skimage's astronaut photo, negatives)."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import skimage.data
from PIL import Image

from npc_server.errors import InvalidInput, NpcError, PayloadTooLarge, UnsupportedMedia
from npc_server.perception.face import (
    FACE_DIM,
    FEATURE_AROUSAL,
    FEATURE_COVERAGE,
    FEATURE_PROBS,
    FEATURE_VALENCE,
    FaceAnalyzer,
)
from npc_server.perception.media import decode_image
from npc_server.perception.types import EMOTIONS
from tests.media import image_bytes as encode
from tests.media import png_header_only

# mediapipe 0.10.14 calls a protobuf API that protobuf 4.25 deprecates, once per process.
pytestmark = pytest.mark.filterwarnings("ignore:SymbolDatabase.GetPrototype:UserWarning")

MAX_BYTES = 2_000_000
MAX_PIXELS = 20_000_000
MAX_FRAMES = 4


@pytest.fixture(scope="module")
def analyzer():
    fa = FaceAnalyzer(max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS, max_frames=MAX_FRAMES)
    fa.warm()
    yield fa
    fa.close()


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()  # 512x512 RGB, a smiling face


@pytest.fixture(scope="module")
def astronaut_jpeg(astronaut) -> bytes:
    return encode(astronaut, quality=90)


def assert_safe_message(err: NpcError) -> None:
    assert "/" not in err.message and "Error" not in err.message and "Traceback" not in err.message


# --- faces ------------------------------------------------------------------------------------------------


def test_astronaut_is_one_happy_face(analyzer, astronaut_jpeg) -> None:
    r = analyzer.analyze([astronaut_jpeg])
    assert r.found and r.frames == 1 and r.frames_with_face == 1
    assert max(r.expression, key=r.expression.get) == "happy"
    assert r.expression["happy"] > 0.9
    assert set(r.expression) == set(EMOTIONS) and sum(r.expression.values()) == pytest.approx(1.0, abs=1e-5)
    assert r.valence > 0.5 and 0.5 < r.arousal <= 1.0
    assert 0.5 < r.confidence <= 1.0
    x, y, w, h = r.box
    assert 0.25 < x < 0.45 and 0.05 < y < 0.3 and 0.1 < w < 0.35 and 0.1 < h < 0.35  # her face, upper middle
    assert r.features.dtype == np.float32 and r.features.shape == (FACE_DIM,)
    np.testing.assert_allclose(r.features[FEATURE_PROBS], [r.expression[e] for e in EMOTIONS], atol=1e-6)
    assert r.features[FEATURE_VALENCE] == pytest.approx(r.valence, abs=1e-6)
    assert r.features[FEATURE_AROUSAL] == pytest.approx(r.arousal, abs=1e-6)
    assert set(r.timings_ms) == {"decode", "detect", "expression"} and all(v >= 0 for v in r.timings_ms.values())


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_other_formats_and_a_large_frame(analyzer, astronaut, fmt) -> None:
    big = np.asarray(Image.fromarray(astronaut).resize((1500, 1500), Image.Resampling.BILINEAR))
    r = analyzer.analyze([encode(astronaut, fmt), encode(big, "JPEG", quality=80)])
    assert r.frames_with_face == 2 and max(r.expression, key=r.expression.get) == "happy"


def test_small_face_in_a_wide_frame_and_a_close_up(analyzer, astronaut) -> None:
    wide = np.pad(astronaut, ((300, 300), (300, 300), (0, 0)), mode="edge")  # face ~8% of the frame's width
    close = np.asarray(Image.fromarray(astronaut).crop((175, 80, 275, 180)).resize((480, 480)))  # fills it
    r = analyzer.analyze([encode(wide), encode(close)])
    assert r.frames_with_face == 2 and max(r.expression, key=r.expression.get) == "happy"


def test_exif_orientation_is_applied(analyzer, astronaut) -> None:
    stored = Image.fromarray(astronaut).rotate(90, expand=True)  # lying on its side, as a phone stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    buf = io.BytesIO()
    stored.save(buf, "JPEG", exif=exif)
    r = analyzer.analyze([buf.getvalue()])
    assert r.found and max(r.expression, key=r.expression.get) == "happy"


@pytest.mark.parametrize(
    "image",
    [
        np.full((480, 640, 3), 128, dtype=np.uint8),  # uniform grey
        # colour noise; mediapipe's short-range detector scores these frames 0.52-0.69 as faces
        np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8),
        np.random.default_rng(1).integers(0, 256, size=(512, 512, 3), dtype=np.uint8),
        np.random.default_rng(3).integers(0, 256, size=(512, 512, 3), dtype=np.uint8),
        np.zeros((8, 8, 3), dtype=np.uint8),  # tiny black
    ],
    ids=["uniform", "noise0", "noise1", "noise3", "tiny"],
)
def test_no_face_is_a_reading_not_an_error(analyzer, image) -> None:
    r = analyzer.analyze([encode(image, "PNG")])
    assert not r.found and r.frames == 1 and r.frames_with_face == 0
    assert r.confidence == 0.0 and r.box is None and r.expression == {}
    assert r.valence == 0.0 and 0.0 <= r.arousal <= 1.0
    assert r.features.shape == (FACE_DIM,) and not r.features.any()


def test_frames_aggregate(analyzer, astronaut, astronaut_jpeg) -> None:
    single = analyzer.analyze([astronaut_jpeg])
    blank = encode(np.full((480, 640, 3), 200, dtype=np.uint8), "PNG")
    mirrored = encode(np.ascontiguousarray(astronaut[:, ::-1]))
    r = analyzer.analyze([astronaut_jpeg, blank, mirrored])
    assert r.found and r.frames == 3 and r.frames_with_face == 2
    assert max(r.expression, key=r.expression.get) == "happy"
    assert r.features[FEATURE_COVERAGE] == pytest.approx(2 / 3)
    assert 0.0 < r.confidence < single.confidence  # a face missing from one frame in three costs confidence
    same = analyzer.analyze([astronaut_jpeg, astronaut_jpeg])
    assert same.expression == pytest.approx(single.expression, abs=1e-6)
    assert same.confidence == pytest.approx(single.confidence, abs=1e-6)


def test_concurrent_calls_agree(analyzer, astronaut_jpeg) -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        readings = list(pool.map(lambda _: analyzer.analyze([astronaut_jpeg]), range(4)))
    assert all(r.expression == pytest.approx(readings[0].expression, abs=1e-6) for r in readings)


# --- bad input --------------------------------------------------------------------------------------------


def _jpeg_truncated(astronaut_jpeg: bytes) -> bytes:
    return astronaut_jpeg[: len(astronaut_jpeg) // 2]


BAD_INPUTS = [
    # (id, bytes maker, error class, words the message must hold)
    ("empty", lambda jpg: b"", InvalidInput, ["empty"]),
    ("text", lambda jpg: b"hello, this is a text file\n" * 10, UnsupportedMedia, ["JPEG", "PNG", "WebP"]),
    ("wav", lambda jpg: b"RIFF\x24\x08\x00\x00WAVEfmt " + bytes(64), UnsupportedMedia, ["format", "JPEG"]),
    ("truncated_jpeg", _jpeg_truncated, InvalidInput, ["could not be decoded"]),
    ("garbage_after_magic", lambda jpg: b"\xff\xd8\xff\xe0" + bytes(200), InvalidInput, ["could not be decoded"]),
    ("bomb_20000", lambda jpg: png_header_only(20000, 20000), PayloadTooLarge, ["pixels", str(MAX_PIXELS)]),
    ("bomb_6000", lambda jpg: png_header_only(6000, 6000), PayloadTooLarge, ["6000x6000", str(MAX_PIXELS)]),
    ("over_max_bytes", lambda jpg: jpg + bytes(MAX_BYTES), PayloadTooLarge, ["bytes", str(MAX_BYTES)]),
]


@pytest.mark.parametrize(("make", "error", "words"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_image_is_refused(analyzer, astronaut_jpeg, make, error, words) -> None:
    with pytest.raises(error) as info:
        analyzer.analyze([make(astronaut_jpeg)])
    assert type(info.value) is error
    for word in words:
        assert word in info.value.message
    assert_safe_message(info.value)


def test_bad_frame_among_good_ones_is_named(analyzer, astronaut_jpeg) -> None:
    with pytest.raises(InvalidInput) as info:
        analyzer.analyze([astronaut_jpeg, b"", astronaut_jpeg])
    assert "image 2 of 3" in info.value.message and "empty" in info.value.message


def test_too_many_frames(analyzer, astronaut_jpeg) -> None:
    with pytest.raises(InvalidInput) as info:
        analyzer.analyze([astronaut_jpeg] * (MAX_FRAMES + 1))
    assert str(MAX_FRAMES + 1) in info.value.message and f"limit is {MAX_FRAMES}" in info.value.message


def test_no_frames(analyzer) -> None:
    with pytest.raises(InvalidInput, match="no images"):
        analyzer.analyze([])


# --- decode_image on its own ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_decode_gives_rgb_uint8(mode) -> None:
    image = Image.fromarray(skimage.data.astronaut()[:100, :150]).convert(mode)
    rgb = decode_image(encode(np.asarray(image), "PNG"), max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
    assert rgb.shape == (100, 150, 3) and rgb.dtype == np.uint8


def test_decode_shrinks_to_max_side(astronaut) -> None:
    data = encode(np.asarray(Image.fromarray(astronaut).resize((2048, 1024))))
    rgb = decode_image(data, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS, max_side=512)
    assert rgb.shape == (256, 512, 3)
