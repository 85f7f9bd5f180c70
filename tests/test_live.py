"""The live WebSocket over a real socket: uvicorn on a free port, a real `websockets` client.

Protocol, limits, cancel, disconnect and load run on a scripted engine without perception (fast); speech turn
detection, barge-in and the cancel latency run on the real models.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
import uvicorn
from fastapi import FastAPI
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from npc_server.app import create_app, load_engine
from npc_server.llm.engine import GenerationStats, Message, SamplingParams
from npc_server.perception.audio import resample_mono
from tests.conftest import ScriptedEngine, make_settings
from tests.media import astronaut_jpeg, speech_wav

LONG = " ".join(f"Sentence number {i} of a long tale." for i in range(1, 40))
SENTENCE = "I need a new sword for the journey north"
ROOT = Path(__file__).resolve().parent.parent
CHAT = [sys.executable, "-m", "npc_server.cli", "chat"]


class SlowEngine(ScriptedEngine):
    """The scripted reply with a delay per word; a player line containing 'story' gets a long reply instead."""

    def __init__(self, reply: str, delay: float = 0.0) -> None:
        super().__init__(reply)
        self.delay = delay
        self.cancelled = 0  # generations stopped by a cancel

    def generate(
        self, messages: list[Message], params: SamplingParams, stats: GenerationStats, cancel: threading.Event
    ) -> Iterator[str]:
        reply = LONG if "story" in messages[-1].content else self.replies[0]
        stats.prompt_tokens, stats.finish_reason = self.count_tokens(messages), "stop"
        try:
            for i, word in enumerate(reply.split(" ")):
                if cancel.is_set():
                    stats.finish_reason = "cancelled"
                    return
                time.sleep(self.delay)
                stats.completion_tokens = i + 1
                yield word if i == 0 else " " + word
        finally:  # also when the runner stops iterating after a cancel
            if cancel.is_set():
                self.cancelled += 1


class Server:
    """uvicorn serving `app` on a free port, in a background thread with its own event loop."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"ws://127.0.0.1:{self.port}/v1/live"
        self.http = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.http + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError("server did not become ready")

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def hub_active(self) -> int:
        return int(self.app.state.live.active)


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, SlowEngine]]:
    engine = SlowEngine("Hmph. Coin first, lad. Then we talk.")
    settings = make_settings(tmp_path_factory.mktemp("live"), live_max_message_bytes=64 * 1024, live_max_fps=2.0)
    with Server(create_app(settings, engine_factory=lambda _: engine)) as server:
        yield server, engine


async def start(url: str, npc: str = "brokk", player: str = "p1", **extra: Any) -> tuple[ClientConnection, dict]:
    ws = await connect(url, max_size=None)
    await ws.send(json.dumps({"type": "session.start", "npc_id": npc, "player_id": player, **extra}))
    started = await recv(ws)
    assert started["type"] == "session.started", started
    return ws, started


async def recv(ws: ClientConnection, within_s: float = 30.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), within_s))


async def until(ws: ClientConnection, *types: str, within_s: float = 60.0) -> list[dict]:
    """Events up to and including the first one whose type is in `types`."""
    events: list[dict] = []
    deadline = time.monotonic() + within_s
    while not events or events[-1]["type"] not in types:
        events.append(await recv(ws, max(0.01, deadline - time.monotonic())))
    return events


def history(server: Server, session_id: str) -> list[dict]:
    return httpx.get(f"{server.http}/v1/sessions/{session_id}").json()["turns"]


def pcm16(wav: bytes, pad_s: float = 0.0) -> bytes:
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    samples = np.concatenate([resample_mono(samples, rate), np.zeros(int(pad_s * 16000), np.float32)])
    return (np.clip(samples, -1, 0.99997) * 32768).astype("<i2").tobytes()


async def stream(ws: ClientConnection, pcm: bytes, chunk_ms: int = 40) -> float:
    """Send PCM in real time as binary audio frames; returns when the last frame was sent (perf_counter)."""
    step = 32 * chunk_ms
    t0 = time.perf_counter()
    for i, at in enumerate(range(0, len(pcm), step)):
        await ws.send(b"\x01" + pcm[at : at + step])
        await asyncio.sleep(max(0.0, t0 + (i + 1) * chunk_ms / 1000 - time.perf_counter()))
    return time.perf_counter()


# -- protocol on the scripted engine -------------------------------------------------------------------------


async def test_text_turn_streams_deltas_then_done(scripted: tuple[Server, SlowEngine]) -> None:
    server, _ = scripted
    ws, started = await start(server.url, player="text-1")
    sid = started["session_id"]
    assert started["protocol"] == 1 and started["npc"]["id"] == "brokk" and started["options"]["silence_ms"] == 700
    await ws.send(json.dumps({"type": "input.text", "text": "Can you fix my sword?"}))
    events = await until(ws, "response.done")
    kinds = [e["type"] for e in events]
    assert kinds[0] == "response.started" and kinds.count("response.text.delta") >= 2, kinds
    rid = events[0]["response_id"]
    assert all(e["session_id"] == sid for e in events)
    assert all(e["response_id"] == rid for e in events if e["type"].startswith("response."))
    done = events[-1]
    deltas = "".join(e["text"] for e in events if e["type"] == "response.text.delta")
    assert deltas == done["text"] == done["turn"]["reply"]["text"] == "Hmph. Coin first, lad. Then we talk."
    assert done["turn"]["session_id"] == sid and done["turn"]["player_text"] == "Can you fix my sword?"
    assert done["timings_ms"]["live_to_first_delta_ms"] <= done["timings_ms"]["live_to_done_ms"]
    turns = history(server, sid)
    assert [t["text"] for t in turns[-2:]] == ["Can you fix my sword?", done["text"]]
    await ws.close()


async def test_bad_input_gets_error_events_and_the_socket_keeps_serving(scripted: tuple[Server, SlowEngine]) -> None:
    server, _ = scripted
    ws = await connect(server.url)
    bad: list[tuple[str | bytes, str]] = [
        (b"\x01" + bytes(640), "session_not_started"),  # audio before session.start
        (json.dumps({"type": "input.text", "text": "hi"}), "session_not_started"),
        ("{not json", "invalid_json"),
        (json.dumps({"type": "dance"}), "unknown_event"),
        (json.dumps([1, 2]), "invalid_event"),
        (json.dumps({"type": "session.start", "npc_id": "brokk"}), "invalid_event"),
        (json.dumps({"type": "session.start", "npc_id": "nobody", "player_id": "p"}), "npc_not_found"),
        ("x" * (65 * 1024), "message_too_large"),
    ]
    for message, code in bad:
        await ws.send(message)
        event = await recv(ws)
        assert event["type"] == "error" and event["code"] == code, (message[:40], event)
        assert "Traceback" not in event["message"] and "/" not in event["message"].replace("N/A", "")
    ws2, started = await start(server.url, player="bad-1")  # a session on another socket is unaffected
    await ws2.close()
    await ws.send(json.dumps({"type": "session.start", "npc_id": "brokk", "player_id": "bad-1", "event_id": "s1"}))
    assert (await recv(ws))["type"] == "session.started"
    after: list[tuple[str | bytes, str]] = [
        (b"\x01" + bytes(64 * 1024), "message_too_large"),  # oversize binary frame
        (b"\x01" + bytes(641), "perception_disabled"),
        (b"\x07abc", "invalid_binary_frame"),
        (json.dumps({"type": "session.start", "npc_id": "brokk", "player_id": "p"}), "session_already_started"),
        (json.dumps({"type": "input.text", "text": ""}), "invalid_event"),
        (json.dumps({"type": "input.audio", "audio": "***"}), "invalid_event"),
        (json.dumps({"type": "response.cancel", "event_id": "c1"}), "no_active_response"),
    ]
    for message, code in after:
        await ws.send(message)
        event = await recv(ws)
        assert event["type"] == "error" and event["code"] == code, (message[:40], event)
        assert event["session_id"] == started["session_id"]
    await ws.send(json.dumps({"type": "ping", "event_id": "p1"}))
    assert await recv(ws) == {"type": "pong", "session_id": started["session_id"], "event_id": "p1"}
    await ws.send(json.dumps({"type": "input.text", "text": "Still there?"}))
    assert (await until(ws, "response.done"))[-1]["type"] == "response.done"
    await ws.close()


async def test_cancel_stops_the_reply_and_history_marks_it(scripted: tuple[Server, SlowEngine]) -> None:
    server, engine = scripted
    engine.delay, cancelled_before = 0.02, engine.cancelled
    try:
        ws, started = await start(server.url, player="cancel-1")
        await ws.send(json.dumps({"type": "input.text", "text": "Tell me a story."}))
        await until(ws, "response.text.delta")
        sent = time.perf_counter()
        await ws.send(json.dumps({"type": "response.cancel"}))
        events = await until(ws, "response.cancelled", "response.done")
        latency_ms = (time.perf_counter() - sent) * 1000
    finally:
        engine.delay = 0.0
    cancelled = events[-1]
    assert cancelled["type"] == "response.cancelled" and cancelled["reason"] == "client"
    assert latency_ms < 500 and cancelled["cancel_ms"] < 500, (latency_ms, cancelled)
    assert cancelled["partial_text"].startswith("Sentence number 1") and len(cancelled["partial_text"]) < len(LONG)
    assert engine.cancelled == cancelled_before + 1  # the engine saw the cancel and stopped decoding
    npc_turn = history(server, started["session_id"])[-1]
    assert npc_turn["text"] == cancelled["partial_text"] and npc_turn["meta"]["interrupted"] is True
    await ws.send(json.dumps({"type": "input.text", "text": "Shorter, then."}))  # the next turn works
    assert (await until(ws, "response.done"))[-1]["text"] == "Hmph. Coin first, lad. Then we talk."
    await ws.close()


async def test_disconnect_mid_reply_frees_everything(scripted: tuple[Server, SlowEngine]) -> None:
    server, engine = scripted
    engine.delay, cancelled_before = 0.02, engine.cancelled
    try:
        ws, started = await start(server.url, player="gone-1")
        assert server.hub_active >= 1
        await ws.send(json.dumps({"type": "input.text", "text": "Tell me a story."}))
        await until(ws, "response.text.delta")
        ws.transport.abort()  # no close handshake: the client just vanishes
        for _ in range(500):  # the server thread frees it; poll for up to 10 s
            if not server.hub_active and engine.cancelled > cancelled_before:
                break
            await asyncio.sleep(0.02)
    finally:
        engine.delay = 0.0
    assert server.hub_active == 0 and engine.cancelled == cancelled_before + 1
    npc_turn = history(server, started["session_id"])[-1]
    assert npc_turn["meta"]["interrupted"] is True and npc_turn["text"].startswith("Sentence number 1")


async def test_text_during_a_reply_cuts_it_off_and_answers_the_new_line(scripted: tuple[Server, SlowEngine]) -> None:
    server, engine = scripted
    engine.delay = 0.02
    try:
        ws, _ = await start(server.url, player="interrupt-1")
        await ws.send(json.dumps({"type": "input.text", "text": "Tell me a story."}))
        first = (await until(ws, "response.text.delta"))[0]["response_id"]
        await ws.send(json.dumps({"type": "input.text", "text": "Stop. What do I owe you?"}))
        events = await until(ws, "response.done")
    finally:
        engine.delay = 0.0
    cancelled = next(e for e in events if e["type"] == "response.cancelled")
    assert cancelled["response_id"] == first and cancelled["reason"] == "barge_in"
    assert events[-1]["response_id"] != first and events[-1]["turn"]["player_text"] == "Stop. What do I owe you?"
    await ws.close()


async def test_twenty_concurrent_connections_complete_their_turns(scripted: tuple[Server, SlowEngine]) -> None:
    server, _ = scripted

    async def one(i: int) -> dict:
        ws, started = await start(server.url, npc=["brokk", "pip", "juno"][i % 3], player=f"crowd-{i}")
        await ws.send(json.dumps({"type": "input.text", "text": f"Hello from player {i}."}))
        done = (await until(ws, "response.done", "error", within_s=120))[-1]
        await ws.close()
        return {**done, "sid": started["session_id"]}

    results = await asyncio.gather(*(one(i) for i in range(20)))
    assert all(r["type"] == "response.done" for r in results), [r for r in results if r["type"] != "response.done"]
    assert len({r["sid"] for r in results}) == 20
    assert sorted(r["turn"]["player_text"] for r in results) == sorted(f"Hello from player {i}." for i in range(20))


async def test_message_rate_and_frame_limits_answer_with_errors(tmp_path: Path) -> None:
    engine = ScriptedEngine("Aye.")
    settings = make_settings(tmp_path, live_max_messages_per_s=10, live_idle_timeout_s=0.5)
    with Server(create_app(settings, engine_factory=lambda _: engine)) as server:
        ws, _ = await start(server.url)
        for _ in range(30):
            await ws.send(json.dumps({"type": "ping"}))
        events = await until(ws, "error")
        assert events[-1]["code"] == "rate_limited" and len(events) - 1 <= 11  # the bucket's burst, then refused
        await asyncio.sleep(0.2)  # then idle: the server says why and closes with 4408
        events = await until(ws, "error")
        assert events[-1]["code"] == "idle_timeout"
        with pytest.raises(ConnectionClosed) as closed:
            await recv(ws, 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4408
        assert server.hub_active == 0


async def test_not_ready_is_refused_with_an_error_and_1013(tmp_path: Path) -> None:
    release = threading.Event()

    def blocked(_: object) -> ScriptedEngine:
        release.wait(30)
        return ScriptedEngine()

    app = create_app(make_settings(tmp_path), engine_factory=blocked)
    server = Server(app)
    server.thread.start()
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                ws = await connect(server.url)
                break
            except OSError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        event = await recv(ws)
        assert event["type"] == "error" and event["code"] == "not_ready"
        with pytest.raises(ConnectionClosed) as closed:
            await recv(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
    finally:
        release.set()
        server.__exit__()


def test_chat_cli_holds_a_streamed_conversation(scripted: tuple[Server, SlowEngine]) -> None:
    server, _ = scripted
    out = subprocess.run(
        [*CHAT, "pip", "--url", f"127.0.0.1:{server.port}", "--player", "cli"],
        input="Hello there.\nAnd a room for the night?\n",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("Hmph. Coin first, lad. Then we talk.") == 2, out.stdout
    assert "Pip" in out.stdout


def test_chat_cli_reports_a_server_it_cannot_reach() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run(
        [*CHAT, "pip", "--url", f"ws://127.0.0.1:{port}/v1/live"],
        input="",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 1 and "cannot connect" in out.stderr


def test_a_slow_client_loses_droppable_events_first_then_is_closed() -> None:
    from npc_server.live.flow import Outbox
    from npc_server.live.protocol import Pong

    async def go() -> None:
        overflowed: list[bool] = []
        box = Outbox(3, lambda: overflowed.append(True))
        box.put(Pong(session_id="s", event_id="affect"), droppable=True)
        for i in range(3):
            box.put(Pong(session_id="s", event_id=str(i)))
        box.put(Pong(session_id="s", event_id="late"), droppable=True)
        assert [json.loads(await box.get() or "")["event_id"] for _ in range(3)] == ["0", "1", "2"]
        assert box.dropped == 2 and not overflowed
        for i in range(4):
            box.put(Pong(session_id="s", event_id=str(i)))
        assert overflowed == [True] and len(box) == 3
        box.close()
        assert [await box.get() for _ in range(4)][-1] is None

    asyncio.run(go())


# -- the real models -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    settings = make_settings(tmp_path_factory.mktemp("live-real"), perception=True)
    with Server(create_app(settings, engine_factory=load_engine)) as server:
        yield server


def _words(text: str) -> set[str]:
    return set(text.lower().replace(",", " ").replace(".", " ").split())


async def test_real_spoken_clip_is_answered_without_a_request(real: Server) -> None:
    ws, started = await start(real.url, player="voice-1")
    await ws.send(b"\x02" + astronaut_jpeg())
    speech_end = await stream(ws, pcm16(speech_wav(SENTENCE)))
    microphone = asyncio.create_task(stream(ws, bytes(32 * 2000)))  # then silence, as a live microphone sends
    events = await until(ws, "response.started", "error")
    to_started_ms = (time.perf_counter() - speech_end) * 1000  # from the last speech frame sent
    events += await until(ws, "response.done")
    await microphone
    kinds = [e["type"] for e in events]
    assert "error" not in kinds, events
    assert kinds.index("input.speech.started") < kinds.index("input.speech.stopped") < kinds.index("input.transcript")
    final = next(e for e in events if e["type"] == "input.transcript")
    assert final["final"] and len(_words(final["text"]) & _words(SENTENCE)) >= 6, final
    affect = next(e for e in events if e["type"] == "player.affect" and e["source"] == "turn")["affect"]
    assert affect["voice"]["speech_found"] and affect["face"]["found"] and affect["text"]["source"] == "transcript"
    started_event = next(e for e in events if e["type"] == "response.started")
    assert started_event["input"] == "audio" and started_event["player_text"] == final["text"]
    done = events[-1]
    assert done["text"] and done["turn"]["player_affect"]["voice"]["transcript"] == final["text"]
    print(
        f"\nlive voice: last speech frame sent -> response.started {to_started_ms:.0f} ms (silence window "
        f"{started['options']['silence_ms']} ms included); end of speech detected -> response.started "
        f"{done['timings_ms']['live_to_started_ms']:.0f} ms, -> first delta "
        f"{done['timings_ms'].get('live_to_first_delta_ms', 0):.0f} ms"
    )
    await ws.close()


async def test_real_cancel_mid_reply(real: Server) -> None:
    ws, started = await start(real.url, npc="sam_marlowe", player="cancel-real")
    await ws.send(json.dumps({"type": "input.text", "text": "Tell me everything about the city, slowly."}))
    events = await until(ws, "response.text.delta", "response.done")
    sent = time.perf_counter()
    await ws.send(json.dumps({"type": "response.cancel"}))
    events += await until(ws, "response.cancelled", "response.done")
    latency_ms = (time.perf_counter() - sent) * 1000
    assert events[-1]["type"] == "response.cancelled", "the reply finished before the cancel arrived"
    cancelled = events[-1]
    assert latency_ms < 1500, latency_ms
    print(
        f"\nlive cancel on the real model: {latency_ms:.0f} ms client-side, {cancelled['cancel_ms']:.0f} ms server-side"
    )
    npc_turn = history(real, started["session_id"])[-1]
    assert npc_turn["meta"]["interrupted"] is True and npc_turn["text"] == cancelled["partial_text"]
    await ws.close()


async def test_real_speech_barges_in_and_is_answered(real: Server) -> None:
    options = {"partial_transcripts": True}
    ws, started = await start(real.url, npc="elowen", player="barge-real", options=options)
    await ws.send(json.dumps({"type": "input.text", "text": "Tell me the long history of your house."}))
    await until(ws, "response.started")
    await stream(ws, pcm16(speech_wav("Wait, wait. I need a new sword for the journey north"), pad_s=1.2))
    events = await until(ws, "response.done")
    kinds = [e["type"] for e in events]
    cancelled = next(e for e in events if e["type"] == "response.cancelled")
    assert cancelled["reason"] == "barge_in" and kinds.index("input.speech.started") < kinds.index("response.cancelled")
    partials = [e for e in events if e["type"] == "input.transcript" and not e["final"]]
    assert partials and partials[0]["text"], kinds
    assert events[-1]["turn"]["player_text"] and events[-1]["response_id"] != cancelled["response_id"]
    print(f"\nlive barge-in on the real model: speech detected -> response.cancelled {cancelled['cancel_ms']:.0f} ms")
    turns = history(real, started["session_id"])
    assert any(t["meta"].get("interrupted") for t in turns) or cancelled["partial_text"] == ""
    await ws.close()


def test_real_chat_cli_speaks_a_clip(real: Server, tmp_path: Path) -> None:
    clip = tmp_path / "clip.wav"
    clip.write_bytes(speech_wav(SENTENCE))
    face = tmp_path / "me.jpg"
    face.write_bytes(astronaut_jpeg())
    out = subprocess.run(
        [*CHAT, "brokk", "--url", real.url, "--voice", str(clip), "--face", str(face), "--player", "cli-voice"],
        input="",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert out.returncode == 0, out.stderr
    heard = next(line for line in out.stdout.splitlines() if line.startswith("You (voice): "))
    assert len(_words(heard) & _words(SENTENCE)) >= 6, out.stdout
    reply = [line for line in out.stdout.splitlines() if line.startswith("Brokk Ironmantle: ")]
    assert len(reply) == 2 and len(reply[1]) > 30, out.stdout  # the greeting, then the answer


async def test_base64_media_events_are_decoded(scripted: tuple[Server, SlowEngine]) -> None:
    ws, _ = await start(scripted[0].url, player="b64")
    await ws.send(json.dumps({"type": "input.image", "image": base64.b64encode(b"\xff\xd8\xff").decode()}))
    await ws.send(json.dumps({"type": "input.audio", "audio": "not base64!"}))
    events = [await recv(ws), await recv(ws)]
    assert [e["code"] for e in events] == ["perception_disabled", "invalid_event"]  # this server has no perception
    await ws.close()


async def test_real_face_frames_are_rate_limited_and_update_player_affect(real: Server) -> None:
    ws, _ = await start(real.url, player="frames-real")
    jpeg = astronaut_jpeg()
    for _ in range(20):  # far over 3 per second, even on a loaded machine
        await ws.send(b"\x02" + jpeg)
    events = await until(ws, "player.affect", within_s=30)
    errors = [e for e in events if e["type"] == "error"]
    assert [e["code"] for e in errors] == ["rate_limited"]  # once, however many frames were dropped
    assert events[-1]["source"] == "face" and events[-1]["affect"]["face"]["found"]
    await ws.send(json.dumps({"type": "input.text", "text": "Do you like my helmet?"}))
    done = (await until(ws, "response.done"))[-1]
    assert done["turn"]["player_affect"]["face"]["frames"] >= 1  # the turn used the frames it kept
    await ws.close()
