"""Shared fixtures: a scripted fake engine for fast protocol tests, and the real embedded model."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from npc_server.app import create_app, load_engine
from npc_server.llm.engine import GenerationStats, Message, SamplingParams
from npc_server.settings import Settings

# Converted weights are cached between runs on the same machine (never required: a miss converts again).
MODEL_CACHE = Path(os.environ.get("NPC_TEST_CACHE", Path.home() / ".cache" / "npc-server"))


class ScriptedEngine:
    """Replays scripted replies word by word, one per generate() call (the last one repeats)."""

    name = "scripted"
    context_tokens = 2048
    max_concurrency = 4

    def __init__(self, *replies: str) -> None:
        self.replies = list(replies) or ["Aye."]
        self.calls: list[list[Message]] = []
        self.params: list[SamplingParams] = []

    def count_tokens(self, messages: list[Message]) -> int:
        return sum(len(m.content.split()) + 4 for m in messages)

    def generate(
        self, messages: list[Message], params: SamplingParams, stats: GenerationStats, cancel: threading.Event
    ) -> Iterator[str]:
        self.calls.append(messages)
        self.params.append(params)
        reply = self.replies[min(len(self.calls) - 1, len(self.replies) - 1)]
        stats.prompt_tokens = self.count_tokens(messages)
        stats.finish_reason = "stop"
        for i, word in enumerate(reply.split(" ")):
            if cancel.is_set():
                stats.finish_reason = "cancelled"
                return
            stats.completion_tokens = i + 1
            yield word if i == 0 else " " + word


def wait_ready(client: TestClient, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("server did not become ready")


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {"data_dir": data_dir, "cache_dir": MODEL_CACHE, "seed": 7, "perception": False}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def scripted_client(tmp_path: Path) -> Iterator[tuple[TestClient, ScriptedEngine]]:
    engine = ScriptedEngine("Hmph. Coin first, lad. Then we talk.")
    app = create_app(make_settings(tmp_path), engine_factory=lambda _: engine)
    with TestClient(app) as client:
        wait_ready(client)
        yield client, engine


@pytest.fixture(scope="session")
def real_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The whole server on the real models (SmolLM2-135M, face, voice, text), shared by real-model tests."""
    settings = make_settings(tmp_path_factory.mktemp("real"), perception=True)
    app = create_app(settings, engine_factory=load_engine)
    with TestClient(app) as client:
        wait_ready(client)
        yield client
