"""Over the real pipeline: the player's fused affect is in the response and moves the NPC's emotion."""

from __future__ import annotations

from fastapi.testclient import TestClient

from npc_server.personas.loader import load_persona_file
from npc_server.settings import DEFAULT_PERSONAS
from tests.media import astronaut_jpeg, speech_wav

ELOWEN = load_persona_file(DEFAULT_PERSONAS / "elowen.yaml")


def turn(client: TestClient, player: str, text: str, voice: bytes, face: bytes | None = None) -> dict:
    files = [("voice", ("v.wav", voice, "audio/wav"))]
    if face is not None:
        files.append(("face", ("f.jpg", face, "image/jpeg")))
    response = client.post("/v1/npcs/elowen/turns", data={"player_id": player, "text": text}, files=files)
    assert response.status_code == 200, response.text
    return response.json()


def test_angry_turn_moves_the_npc_differently_from_a_friendly_one(real_client: TestClient) -> None:
    angry = turn(
        real_client,
        "affect-angry",
        "You cheated me, you lying thief! Give me back my gold!",
        speech_wav("You cheated me! Give me back my gold, right now!", "-a", "190", "-p", "85", "-s", "230"),
    )
    friendly = turn(
        real_client,
        "affect-friendly",
        "Thank you so much, my lady. Your garden is wonderful!",
        speech_wav("Thank you so much, my lady.", "-s", "150"),
        astronaut_jpeg(),
    )
    fused_angry, fused_friendly = angry["player_affect"]["fused"], friendly["player_affect"]["fused"]
    assert fused_angry["label"] in ("angry", "disgust") and fused_angry["valence"] < 0
    assert fused_friendly["label"] == "happy" and fused_friendly["valence"] > 0
    assert set(fused_friendly["modalities"]) == {"face", "voice", "text"}
    assert fused_angry["arousal"] > fused_friendly["arousal"] - 0.2

    assert angry["npc"]["trigger"] == "hostile" and angry["npc"]["emotion"]["label"] == ELOWEN.temperament.when_hostile
    assert friendly["npc"]["trigger"] == "friendly"
    assert friendly["npc"]["emotion"]["label"] != angry["npc"]["emotion"]["label"]
    assert angry["npc"]["valence"] < friendly["npc"]["valence"]


def test_mood_carries_over_within_a_session(real_client: TestClient) -> None:
    insult = "You are a useless, arrogant fool and I despise you!"
    first = turn(real_client, "affect-carry", insult, speech_wav(insult, "-a", "190", "-s", "220"))
    calm = turn(real_client, "affect-carry", "Anyway.", speech_wav("Anyway.", "-a", "60", "-s", "130"))
    assert first["npc"]["emotion"]["intensity"] > 0
    # One neutral line later the NPC is still cooler than at rest, and the history remembers its mood.
    assert calm["npc"]["valence"] < ELOWEN.temperament.valence
    history = real_client.get(f"/v1/sessions/{calm['session_id']}").json()["turns"]
    assert history[1]["meta"]["mood"]["label"] == first["npc"]["emotion"]["label"]
