"""`npc-server chat NPC_ID`: talk to an NPC from a terminal over the live WebSocket (docs/live.md).

Each line typed is one turn; the reply prints sentence by sentence as it streams. `--voice FILE` first
streams a clip in real-time 40 ms chunks and lets the server's turn detection answer it; `--face FILE`
sends a JPEG with every turn. Ctrl-C during a reply cancels it; Ctrl-C or Ctrl-D at the prompt leaves.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

DEFAULT_URL = "ws://127.0.0.1:8000/v1/live"
CHUNK_MS = 40
TURN_TIMEOUT_S = 300.0
AUDIO_FRAME, IMAGE_FRAME = b"\x01", b"\x02"  # npc_server.live.protocol, without importing the server


def add_parser(commands: Any) -> None:
    chat = commands.add_parser("chat", help="talk to an NPC over the live WebSocket")
    chat.add_argument("npc_id")
    chat.add_argument("--url", default=DEFAULT_URL, help=f"server, ws(s):// or http(s):// (default {DEFAULT_URL})")
    chat.add_argument("--player", default="terminal", help="player id (default 'terminal')")
    chat.add_argument("--session", help="session id to continue or create (default: the latest with this NPC)")
    chat.add_argument("--voice", type=Path, help="a clip (WAV, FLAC, OGG, MP3) to stream as the first turn")
    chat.add_argument("--face", type=Path, help="a JPEG sent with every turn")


def run(args: argparse.Namespace) -> int:
    try:
        face = args.face.read_bytes() if args.face else None
        voice = _pcm16(args.voice) if args.voice else None
    except (OSError, ValueError) as exc:
        print(f"npc-server chat: {exc}", file=sys.stderr)
        return 2
    if face is not None and not face.startswith(b"\xff\xd8\xff"):
        print(f"npc-server chat: {args.face} is not a JPEG", file=sys.stderr)
        return 2
    try:
        return asyncio.run(Chat(args, live_url(args.url), face, voice).run())
    except KeyboardInterrupt:
        return 130


def live_url(url: str) -> str:
    """ws(s)://host[:port][/path]; http(s) becomes ws(s), a bare host gets ws://, no path gets /v1/live."""
    if "://" not in url:
        url = "ws://" + url
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path if parts.path not in ("", "/") else "/v1/live"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def _pcm16(path: Path) -> bytes:
    import numpy as np

    from npc_server.errors import NpcError
    from npc_server.perception.audio import decode_audio

    try:
        samples = decode_audio(path.read_bytes(), max_bytes=64 * 1024 * 1024, max_seconds=30.0)
    except NpcError as exc:
        raise ValueError(f"{path}: {exc.message}") from None
    return (np.clip(samples, -1.0, 32767 / 32768) * 32768).astype("<i2").tobytes()


class Chat:
    def __init__(self, args: argparse.Namespace, url: str, face: bytes | None, voice: bytes | None) -> None:
        self.args, self.url, self.face, self.voice = args, url, face, voice
        self.name = args.npc_id
        self.silence_ms = 700
        self.turn_over = asyncio.Event()
        self.in_reply = False
        self.heard_speech = False
        self.stop = asyncio.Event()
        self.ws: Any = None
        self._pending: set[asyncio.Future[Any]] = set()

    async def run(self) -> int:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

        try:
            async with connect(self.url, open_timeout=15, max_size=16 * 1024 * 1024) as ws:
                self.ws = ws
                return await self._session(ws)
        except (OSError, InvalidURI, InvalidHandshake, TimeoutError) as exc:
            print(f"npc-server chat: cannot connect to {self.url}: {exc}", file=sys.stderr)
            return 1
        except ConnectionClosed as exc:
            print(f"\nnpc-server chat: the server closed the connection ({exc})", file=sys.stderr)
            return 1

    async def _session(self, ws: Any) -> int:
        start = {"type": "session.start", "npc_id": self.args.npc_id, "player_id": self.args.player}
        if self.args.session:
            start["session_id"] = self.args.session
        await ws.send(json.dumps(start))
        first = json.loads(await ws.recv())
        if first["type"] != "session.started":
            print(f"npc-server chat: {first.get('code')}: {first.get('message')}", file=sys.stderr)
            return 1
        npc = first["npc"]
        self.name, self.silence_ms = npc["name"], first["options"]["silence_ms"]
        print(f"{npc['name']}, {npc['role']} (session {first['session_id']}). Ctrl-D leaves.\n")
        print(f"{self.name}: {npc['greeting']}\n", flush=True)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGINT, self._interrupt)
        receiver = asyncio.create_task(self._receive(ws))
        try:
            if self.voice is not None:
                await self._speak(ws, self.voice)
            prompt = sys.stdin.isatty()
            lines = await _stdin_lines()  # owns stdin from here on
            while not receiver.done():
                if prompt:
                    print("You: ", end="", flush=True)
                line = await _first(lines.readline(), self.stop.wait())
                if not line or line.strip() in ("/quit", "/exit"):
                    break
                if line.strip():
                    if not prompt:  # piped: show the line the NPC is answering
                        print(f"You: {line.strip()}", flush=True)
                    await self._turn(ws, {"type": "input.text", "text": line.strip()})
        finally:
            receiver.cancel()
        return 0

    async def _turn(self, ws: Any, event: dict[str, Any] | None) -> None:
        self.turn_over.clear()
        if self.face is not None:
            await ws.send(IMAGE_FRAME + self.face)
        if event is not None:
            await ws.send(json.dumps({**event, "event_id": uuid.uuid4().hex[:12]}))
        await asyncio.wait_for(self.turn_over.wait(), TURN_TIMEOUT_S)

    async def _speak(self, ws: Any, pcm: bytes) -> None:
        """Stream the clip and then silence, in real time, and let turn detection answer it."""
        print(f"(streaming {len(pcm) / 32000:.1f} s of audio)", flush=True)
        self.turn_over.clear()
        if self.face is not None:
            await ws.send(IMAGE_FRAME + self.face)
        silence = bytes(32 * (self.silence_ms + 500))
        step = 32 * CHUNK_MS
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i, at in enumerate(range(0, len(pcm) + len(silence), step)):
            await ws.send(AUDIO_FRAME + (pcm + silence)[at : at + step])
            await asyncio.sleep(max(0.0, t0 + (i + 1) * CHUNK_MS / 1000 - loop.time()))
        if self.heard_speech:
            await asyncio.wait_for(self.turn_over.wait(), TURN_TIMEOUT_S)
        else:
            print("(the server heard no speech in the clip)", flush=True)

    async def _receive(self, ws: Any) -> None:
        async for raw in ws:
            event = json.loads(raw)
            kind = event["type"]
            if kind == "input.speech.started":
                self.heard_speech = True
            elif kind == "input.transcript" and event["final"]:
                print(f"You (voice): {event['text'] or '(no words heard)'}", flush=True)
                if not event["text"]:
                    self.turn_over.set()
            elif kind == "response.started":
                self.in_reply = True
                print(f"{self.name}: ", end="", flush=True)
            elif kind == "response.text.delta":
                print(event["text"], end="", flush=True)
            elif kind == "response.done":
                self._end_reply("")
            elif kind == "response.cancelled":
                self._end_reply(" [cut off]")
            elif kind == "error":
                print(f"\n[{event['code']}] {event['message']}", file=sys.stderr, flush=True)
                if event.get("event_id") or event.get("response_id"):  # no reply is coming
                    self._end_reply("")

    def _end_reply(self, tail: str) -> None:
        if self.in_reply:
            print(tail, flush=True)
        self.in_reply = False
        self.turn_over.set()

    def _interrupt(self) -> None:
        if self.in_reply and self.ws is not None:
            sent = asyncio.ensure_future(self.ws.send(json.dumps({"type": "response.cancel"})))
            self._pending.add(sent)
            sent.add_done_callback(self._pending.discard)
        else:
            self.stop.set()


async def _stdin_lines() -> asyncio.StreamReader:
    """stdin as an asyncio stream (a terminal or a pipe); a regular file is read whole."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    except (ValueError, OSError):  # a regular file: readable without blocking
        reader.feed_data(sys.stdin.buffer.read())
        reader.feed_eof()
    return reader


async def _first(line: Any, stop: Any) -> str:
    """The next line, or '' when Ctrl-C asked to leave."""
    tasks = {asyncio.ensure_future(line), asyncio.ensure_future(stop)}
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    for task in done:
        result = task.result()
        if isinstance(result, bytes):
            return result.decode(errors="replace")
    return ""
