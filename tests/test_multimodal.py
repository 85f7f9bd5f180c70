"""Multimodal turns over HTTP on the real models: what each modality reports, and every bad input."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.media import (
    astronaut_jpeg,
    blank_jpeg,
    encode_audio,
    png_header_only,
    speech_wav,
    to_mp3,
)
from tests.test_turns_real import assert_in_character_reply

SENTENCE = "I need a new sword for the journey north"


def post(client: TestClient, files: list[tuple[str, tuple[str, bytes, str]]], npc: str = "brokk", **data: str):
    return client.post(f"/v1/npcs/{npc}/turns", data={"player_id": "mm-1", **data}, files=files)


def test_voice_and_face_without_text(real_client: TestClient) -> None:
    response = post(
        real_client,
        [
            ("voice", ("clip.wav", speech_wav(SENTENCE), "audio/wav")),
            ("face", ("me.jpg", astronaut_jpeg(), "image/jpeg")),
        ],
    )
    assert response.status_code == 200, response.text
    body = response.json()
    affect = body["player_affect"]
    words = set(body["player_text"].lower().strip(".!?").split())
    assert len(words & set(SENTENCE.lower().split())) >= 6, body["player_text"]
    assert affect["voice"]["speech_found"] and affect["voice"]["transcript"] == body["player_text"]
    assert affect["voice"]["prosody"]["speaking_rate_wps"] > 1 and affect["voice"]["prosody"]["pitch_hz"] > 50
    assert affect["face"]["found"] and affect["face"]["top"] == "happy" and affect["face"]["valence"] > 0.3
    assert affect["text"]["source"] == "transcript"
    assert body["timings_ms"]["voice_asr"] > 0 and body["timings_ms"]["face_detect"] > 0
    assert_in_character_reply(body["reply"]["text"], "brokk")


def test_text_with_a_blank_frame_reports_no_face(real_client: TestClient) -> None:
    response = post(real_client, [("face", ("blank.jpg", blank_jpeg(), "image/jpeg"))], text="Thank you, friend!")
    assert response.status_code == 200, response.text
    affect = response.json()["player_affect"]
    assert affect["face"] == {**affect["face"], "found": False, "confidence": 0.0, "box": None}
    assert affect["voice"] is None
    assert affect["text"]["source"] == "typed" and affect["text"]["top"] == "happy"


def test_silent_clip_is_reported_not_refused(real_client: TestClient) -> None:
    silence = encode_audio(np.zeros(16000 * 2, dtype=np.float32), 16000, "WAV")
    response = post(real_client, [("voice", ("quiet.wav", silence, "audio/wav"))], npc="pip")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["player_affect"]["voice"]["speech_found"] is False and body["player_text"] == "..."


def test_mp3_named_wav_is_decoded_by_its_content(real_client: TestClient) -> None:
    mp3 = to_mp3(speech_wav(SENTENCE))
    response = post(real_client, [("voice", ("clip.wav", mp3, "audio/wav"))], text="Hello there!")
    assert response.status_code == 200, response.text
    heard = set(response.json()["player_affect"]["voice"]["transcript"].lower().strip(".").split())
    assert len(heard & set(SENTENCE.lower().split())) >= 6, heard


def _nan_wav() -> bytes:
    samples = np.zeros(16000, dtype=np.float32)
    samples[100] = np.nan
    return encode_audio(samples, 16000, "WAV", "FLOAT")


def _ten_minutes() -> bytes:
    return encode_audio(np.zeros(16000 * 600, dtype=np.float32), 16000, "FLAC")


BAD = [
    ("empty face", lambda: [("face", ("a.jpg", b"", "image/jpeg"))], 422, "empty"),
    ("unknown face format", lambda: [("face", ("a.jpg", b"hello, not an image", "image/jpeg"))], 415, "JPEG"),
    ("truncated jpeg", lambda: [("face", ("a.jpg", astronaut_jpeg()[:3000], "image/jpeg"))], 422, "decoded"),
    ("20000x20000 png", lambda: [("face", ("a.png", png_header_only(20000, 20000), "image/png"))], 413, "pixels"),
    ("50 face files", lambda: [("face", (f"{i}.jpg", blank_jpeg(), "image/jpeg")) for i in range(50)], 422, "at most"),
    ("empty voice", lambda: [("voice", ("a.wav", b"", "audio/wav"))], 422, "empty"),
    ("unknown voice format", lambda: [("voice", ("a.wav", b"RIFF????JUNKJUNK" * 8, "audio/wav"))], 415, "WAV"),
    ("ten minutes of audio", lambda: [("voice", ("long.flac", _ten_minutes(), "audio/flac"))], 413, "seconds"),
    ("NaN samples", lambda: [("voice", ("nan.wav", _nan_wav(), "audio/wav"))], 422, "NaN"),
    ("two voice clips", lambda: [("voice", ("a.wav", b"1", "audio/wav")), ("voice", ("b.wav", b"2", "audio/wav"))],
     422, "one clip"),
]


@pytest.mark.parametrize(("name", "files", "status", "word"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_error(real_client: TestClient, name, files, status, word) -> None:
    response = post(real_client, files(), text="Look at this.")
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert word.lower() in error["message"].lower() and error["code"]
    assert "/" not in error["message"] and "Traceback" not in error["message"]


def test_form_errors_and_the_server_keeps_serving(real_client: TestClient) -> None:
    no_words = post(real_client, [("face", ("a.jpg", astronaut_jpeg(), "image/jpeg"))])
    assert no_words.status_code == 422 and "voice" in no_words.json()["error"]["message"]
    unknown = post(real_client, [], text="hi", mood="angry")
    assert unknown.status_code == 422 and "mood" in unknown.json()["error"]["message"]
    sse = real_client.post(
        "/v1/npcs/brokk/turns",
        data={"player_id": "mm-1", "text": "hi"},
        files=[("face", ("a.jpg", b"", "image/jpeg"))],
        headers={"accept": "text/event-stream"},
    )
    assert sse.status_code == 422  # refused before the stream starts
    assert real_client.get("/readyz").status_code == 200
    ok = post(real_client, [], text="Still open?")
    assert ok.status_code == 200 and ok.json()["reply"]["text"]
