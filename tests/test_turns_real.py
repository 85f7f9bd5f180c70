"""Real turns on the real embedded model, end to end through HTTP. Properties only, never exact text."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient

from npc_server.dialogue.guard import character_breaks
from npc_server.personas.loader import load_personas
from npc_server.settings import DEFAULT_PERSONAS

PERSONAS, _ = load_personas(DEFAULT_PERSONAS)
LABEL = re.compile(r"^\s*[\w .'-]{1,40}:\s", re.M)


def assert_in_character_reply(text: str, npc_id: str) -> None:
    persona = PERSONAS[npc_id]
    assert text.strip(), "empty reply"
    assert text.rstrip()[-1] in ".!?…\"'”’)*", f"not a whole sentence: {text!r}"
    assert not LABEL.search(text), f"speaker label in {text!r}"
    assert len(text) <= persona.reply.max_chars
    assert len(re.findall(r"[.!?…]+(?:\s|$)", text)) <= persona.reply.max_sentences + 1  # abbreviations
    assert character_breaks(text, persona) == []
    assert "<|" not in text


@pytest.mark.parametrize("npc_id", ["brokk", "elowen", "halcyon"])
def test_real_reply_is_whole_in_character_sentences(real_client: TestClient, npc_id: str) -> None:
    response = real_client.post(
        f"/v1/npcs/{npc_id}/turns", json={"player_id": "real-1", "text": "Who are you, and what is this place?"}
    )
    assert response.status_code == 200
    body = response.json()
    assert_in_character_reply(body["reply"]["text"], npc_id)
    assert body["usage"]["prompt_tokens"] > 100  # persona and examples went in
    assert body["timings_ms"]["first_token_ms"] > 0


def test_real_sse_stream_matches_final_text_and_history(real_client: TestClient) -> None:
    with real_client.stream(
        "POST",
        "/v1/npcs/sam_marlowe/turns",
        json={"player_id": "real-2", "text": "Somebody stole my sister's necklace. Will you take the case?"},
        headers={"accept": "text/event-stream"},
    ) as response:
        raw = response.read().decode()
    events = [(b.split("\n")[0][7:], json.loads(b.split("\n")[1][6:])) for b in raw.strip().split("\n\n")]
    assert events[-1][0] == "turn.done"
    done = events[-1][1]
    streamed = "".join(d["text"] for name, d in events if name == "reply.delta")
    assert streamed == done["reply"]["text"]
    assert_in_character_reply(streamed, "sam_marlowe")
    history = real_client.get(f"/v1/sessions/{done['session_id']}").json()["turns"]
    assert history[-2]["text"].startswith("Somebody stole") and history[-1]["text"] == streamed
