"""NPC_MODEL=openai:URL: turns through an OpenAI-compatible server (a small real one on a free port)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from npc_server.app import create_app, load_engine
from tests.conftest import make_settings, wait_ready

REPLY = ["Aye", ",", " lad", ".", " Leave", " it", " here", ".", " It", " will", " be", " ready", " by", " dusk", "."]


def openai_server(received: list[dict[str, Any]]) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> StreamingResponse:
        body = await request.json()
        received.append(body)

        def events() -> Iterator[str]:
            for piece in REPLY[: body["max_tokens"]]:
                yield f"data: {json.dumps({'choices': [{'delta': {'content': piece}, 'finish_reason': None}]})}\n\n"
            yield f"data: {json.dumps({'choices': [{'delta': {}, 'finish_reason': 'stop'}]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture
def server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(openai_server(received), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}/v1", received
    uv.should_exit = True
    thread.join(5)


def test_turns_through_an_openai_compatible_server(tmp_path: Path, server) -> None:  # type: ignore[no-untyped-def]
    url, received = server
    settings = make_settings(tmp_path, model=f"openai:{url}", openai_model="big-model")
    with TestClient(create_app(settings, engine_factory=load_engine)) as client:
        wait_ready(client)
        body = client.post("/v1/npcs/brokk/turns", json={"player_id": "p1", "text": "Fix my sword?"}).json()
    assert body["reply"]["text"] == "Aye, lad. Leave it here. It will be ready by dusk."
    request = received[-1]
    assert request["model"] == "big-model" and request["stream"] is True
    assert request["messages"][0]["role"] == "system" and request["messages"][-1] == {
        "role": "user",
        "content": "Fix my sword?",
    }
