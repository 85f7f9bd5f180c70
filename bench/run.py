"""Load benchmark: npc-server against llama-cpp-python's OpenAI server on the same SmolLM2 GGUF.

    .venv/bin/python -m bench.run [--players 1,4,8,16] [--turns 3] [--no-peer] [--no-multimodal] [--no-ws]

Starts the server (and the peer) on free ports, drives them with N concurrent simulated players over HTTP/SSE
and the live WebSocket (/v1/live) and prints a markdown table; JSON and markdown land in bench/results/.
Not a pass/fail test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

from bench.common import Sample, free_port
from bench.peer import Peer
from npc_server.llm.weights import embedded_gguf

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
LINES = [
    "Good morning! What do you have for sale today?",
    "Tell me about yourself. Where do you come from?",
    "I need help. Something terrible happened on the road.",
    "What is the strangest thing you have seen this year?",
]
NPCS = ["brokk", "elowen", "pip", "halcyon", "sam_marlowe", "ambrose", "juno"]


@dataclass
class Row:
    system: str
    scenario: str
    players: int
    turns: int = 0
    errors: int = 0
    ttft_p50: float = 0.0  # client: request sent -> first streamed text (a whole sentence for npc-server)
    ttft_p95: float = 0.0
    first_token_p50: float | None = None  # server: timings_ms.first_token_ms; None where the server reports none
    first_token_p95: float | None = None
    turn_p50: float = 0.0
    turn_p95: float = 0.0
    stream_tps: float = 0.0  # median per-stream decode rate
    aggregate_tps: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: float = 0.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Server:
    """npc-server in a subprocess on a free port, with a throwaway data dir and the shared weight cache."""

    def __init__(self, candidates: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = tempfile.mkdtemp(prefix="npc-bench-")
        env = {**os.environ, "NPC_DATA_DIR": self.data, "NPC_PORT": str(self.port), "NPC_LOG_LEVEL": "warning"}
        env["NPC_REPLY_CANDIDATES"] = str(candidates)
        env.setdefault("NPC_CACHE_DIR", str(Path.home() / ".cache" / "npc-server"))
        started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "npc_server.cli", "serve"], env=env, cwd=ROOT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError("npc-server did not become ready")
        self.ready_s = time.perf_counter() - started
        time.sleep(1.0)
        self.idle_rss_mib = rss_mib(self.proc.pid)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


async def npc_turn(
    client: httpx.AsyncClient, url: str, player: int, turn: int, media: dict[str, bytes] | None
) -> Sample:
    npc = NPCS[player % len(NPCS)]
    text = LINES[(player + turn) % len(LINES)]
    kwargs: dict[str, Any]
    if media is None:
        kwargs = {"json": {"player_id": f"bench-{player}", "text": text}}
    else:
        kwargs = {
            "data": {"player_id": f"bench-{player}"},
            "files": [
                ("face", ("face.jpg", media["face"], "image/jpeg")),
                ("voice", ("v.wav", media["voice"], "audio/wav")),
            ],
        }
    sent = time.perf_counter()
    first = None
    done: dict[str, Any] | None = None
    async with client.stream(
        "POST", f"{url}/v1/npcs/{npc}/turns", headers={"accept": "text/event-stream"}, timeout=300, **kwargs
    ) as response:
        response.raise_for_status()
        event = ""
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                if event == "reply.delta" and first is None:
                    first = time.perf_counter()
                elif event == "turn.done":
                    done = json.loads(line[6:])
                elif event == "error":
                    raise RuntimeError(line)
    end = time.perf_counter()
    assert done is not None
    return turn_sample(sent, first, end, done, done["timings_ms"])


def turn_sample(
    sent: float, first: float | None, end: float, turn: dict[str, Any], timings: dict[str, float]
) -> Sample:
    """One npc-server turn from its client-side clock readings and the server's turn object."""
    return Sample(
        first_ms=((first or end) - sent) * 1000,
        total_ms=(end - sent) * 1000,
        tokens=turn["usage"]["completion_tokens"],
        stages=timings,
    )


class LivePlayers:
    """Each simulated player holds one /v1/live WebSocket session, opened before its first timed turn."""

    def __init__(self, url: str) -> None:
        self.url = "ws" + url.removeprefix("http") + "/v1/live"
        self.sockets: dict[int, ClientConnection] = {}

    async def turn(self, player: int, turn: int) -> Sample:
        ws = self.sockets.get(player)
        if ws is None:
            ws = await connect(self.url, open_timeout=60, max_size=16 * 1024 * 1024)
            self.sockets[player] = ws
            npc = NPCS[player % len(NPCS)]
            await ws.send(json.dumps({"type": "session.start", "npc_id": npc, "player_id": f"bench-{player}"}))
            started = json.loads(await ws.recv())
            if started["type"] != "session.started":
                await self.drop(player)
                raise RuntimeError(f"session.start: {started}")
        sent = time.perf_counter()
        first = None
        await ws.send(json.dumps({"type": "input.text", "text": LINES[(player + turn) % len(LINES)]}))
        while True:
            event = json.loads(await asyncio.wait_for(ws.recv(), 300))
            if event["type"] == "response.text.delta" and first is None:
                first = time.perf_counter()
            elif event["type"] == "response.done":
                return turn_sample(sent, first, time.perf_counter(), event["turn"], event["timings_ms"])
            elif event["type"] in ("error", "response.cancelled"):
                await self.drop(player)  # events of the failed turn must not leak into the next one
                raise RuntimeError(json.dumps(event))

    async def drop(self, player: int) -> None:
        ws = self.sockets.pop(player, None)
        if ws is not None:
            await ws.close()

    async def close(self) -> None:
        for player in list(self.sockets):
            await self.drop(player)


async def drive(
    name: str, players: int, turns: int, one_turn: Callable[[int, int], Awaitable[Sample]]
) -> tuple[list[Sample], int, float]:
    errors = 0
    samples: list[Sample] = []

    async def player(p: int) -> None:
        nonlocal errors
        for t in range(turns):
            try:
                samples.append(await one_turn(p, t))
            except Exception as exc:
                errors += 1
                print(f"  {name} player {p}: {type(exc).__name__}: {exc}"[:200], file=sys.stderr)

    started = time.perf_counter()
    await asyncio.gather(*(player(p) for p in range(players)))
    return samples, errors, time.perf_counter() - started


def summarise(system: str, scenario: str, players: int, samples: list[Sample], errors: int, wall: float) -> Row:
    rates = [s.tokens_per_s for s in samples if s.tokens_per_s]
    stage_names = sorted({k for s in samples for k in s.stages})
    first_tokens = [s.stages["first_token_ms"] for s in samples if "first_token_ms" in s.stages]
    row = Row(
        system=system,
        scenario=scenario,
        players=players,
        turns=len(samples),
        errors=errors,
        ttft_p50=pct([s.first_ms for s in samples], 0.5),
        ttft_p95=pct([s.first_ms for s in samples], 0.95),
        first_token_p50=pct(first_tokens, 0.5) if first_tokens else None,
        first_token_p95=pct(first_tokens, 0.95) if first_tokens else None,
        turn_p50=pct([s.total_ms for s in samples], 0.5),
        turn_p95=pct([s.total_ms for s in samples], 0.95),
        stream_tps=statistics.median(rates) if rates else 0.0,
        aggregate_tps=sum(s.tokens for s in samples) / wall if wall else 0.0,
        stages={k: round(statistics.median([s.stages[k] for s in samples if k in s.stages]), 1) for k in stage_names},
    )
    return row


def bench_media() -> dict[str, bytes]:
    voice = subprocess.run(
        ["espeak-ng", "-v", "en-us", "-s", "150", "--stdout", "Good morning. I would like to buy a new sword, please."],
        check=True,
        capture_output=True,
    ).stdout
    return {"face": (ROOT / "examples" / "face.jpg").read_bytes(), "voice": voice}


async def main_async(args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    server = Server(args.candidates)
    print(f"npc-server ready in {server.ready_s:.1f} s, idle RSS {server.idle_rss_mib:.0f} MiB", file=sys.stderr)
    media = bench_media() if args.multimodal else None
    peer = Peer(embedded_gguf(), cache=ROOT / ".cache" / "peer-native") if args.peer else None
    try:
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=64)) as client:

            async def npc_row(scenario: str, n: int, one_turn: Callable[[int, int], Awaitable[Sample]]) -> None:
                samples, errors, wall = await drive(scenario, n, args.turns, one_turn)
                row = summarise("npc-server", scenario, n, samples, errors, wall)
                row.peak_rss_mib = peak_rss_mib(server.proc.pid)  # the high-water mark once this row has run
                rows.append(row)
                print(render([row]), file=sys.stderr)

            for n in args.players:
                await npc_turn(client, server.url, 0, 0, None)  # warm the prefix cache for this persona
                await npc_row("text", n, lambda p, t: npc_turn(client, server.url, p, t, None))
                if args.ws:
                    live = LivePlayers(server.url)
                    try:
                        await npc_row("text (ws)", n, live.turn)
                    finally:
                        await live.close()
                if media is not None:
                    await npc_row("face+voice", n, lambda p, t: npc_turn(client, server.url, p, t, media))
            if peer is not None and peer.start():
                for n in args.players:
                    samples, errors, wall = await drive(
                        "peer",
                        n,
                        args.turns,
                        lambda p, t: peer.turn(client, NPCS[p % len(NPCS)], LINES[(p + t) % len(LINES)]),
                    )
                    rows.append(summarise("llama-cpp-python", "text", n, samples, errors, wall))
                    rows[-1].peak_rss_mib = peak_rss_mib(peer.pid)
                    print(render([rows[-1]]), file=sys.stderr)
    finally:
        server.close()
        if peer is not None:
            peer.close()
    rows_meta = {
        "ready_s": round(server.ready_s, 1),
        "idle_rss_mib": round(server.idle_rss_mib),
        "reply_candidates": args.candidates,
    }
    write(rows, rows_meta, peer.skipped if peer else "disabled with --no-peer")
    return rows


def render(rows: list[Row]) -> str:
    head = (
        "| system | turns | players | n | errors | first text p50 / p95 ms | first token p50 / p95 ms | "
        "turn p50 / p95 ms | tokens/s per stream | tokens/s total | peak RSS MiB |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        first_token = "n/a" if r.first_token_p50 is None else f"{r.first_token_p50:.0f} / {r.first_token_p95 or 0:.0f}"
        lines.append(
            f"| {r.system} | {r.scenario} | {r.players} | {r.turns} | {r.errors} | "
            f"{r.ttft_p50:.0f} / {r.ttft_p95:.0f} | {first_token} | {r.turn_p50:.0f} / {r.turn_p95:.0f} | "
            f"{r.stream_tps:.1f} | {r.aggregate_tps:.1f} | {r.peak_rss_mib:.0f} |"
        )
    return "\n".join(lines)


def ratios(rows: list[Row]) -> str:
    ours = {r.players: r for r in rows if r.system == "npc-server" and r.scenario == "text"}
    peer = {r.players: r for r in rows if r.system == "llama-cpp-python"}
    lines = [
        "| players | tokens/s per stream, ours / peer | tokens/s total, ours / peer | first text p95, ours / peer |",
        "|---|---|---|---|",
    ]
    for n in sorted(set(ours) & set(peer)):
        o, p = ours[n], peer[n]
        lines.append(
            f"| {n} | {o.stream_tps / p.stream_tps:.2f} | {o.aggregate_tps / p.aggregate_tps:.2f} | "
            f"{o.ttft_p95 / p.ttft_p95:.2f} |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def stages_table(rows: list[Row]) -> str:
    keep = [
        "perception_ms",
        "face_decode",
        "face_detect",
        "face_expression",
        "voice_decode",
        "voice_vad",
        "voice_prosody",
        "voice_asr",
        "text_embed",
        "prompt_ms",
        "queue_ms",
        "first_token_ms",
        "generation_ms",
        "total_ms",
    ]
    lines = ["| turns | players | " + " | ".join(keep) + " |", "|---|---|" + "---|" * len(keep)]
    for r in rows:
        if r.system == "npc-server":
            lines.append(f"| {r.scenario} | {r.players} | " + " | ".join(str(r.stages.get(k, "")) for k in keep) + " |")
    return "\n".join(lines)


def write(rows: list[Row], meta: dict[str, Any], peer_note: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'CPU'}"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    (RESULTS / "latest.json").write_text(
        json.dumps(
            {"date": stamp, "machine": machine, **meta, "peer": peer_note, "rows": [asdict(r) for r in rows]}, indent=2
        )
    )
    text = "\n\n".join(
        part
        for part in [
            f"Benchmark of {stamp} on {machine}; npc-server (NPC_REPLY_CANDIDATES={meta['reply_candidates']}) "
            f"ready in {meta['ready_s']} s, "
            f"idle RSS {meta['idle_rss_mib']} MiB. Peer: {peer_note}. First text: the client's wait for the first "
            "streamed text (a whole sentence for npc-server); first token: the server's timings_ms.first_token_ms.",
            render(rows),
            ratios(rows),
            stages_table(rows),
        ]
        if part
    )
    (RESULTS / "latest.md").write_text(text + "\n")
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--players", default="1,4,8,16", help="comma-separated concurrency levels")
    parser.add_argument("--turns", type=int, default=3, help="turns per player per level")
    parser.add_argument(
        "--candidates",
        type=int,
        default=1,
        help="NPC_REPLY_CANDIDATES for the server (default 1: one reply per turn, the same work as the peer)",
    )
    parser.add_argument("--no-peer", dest="peer", action="store_false")
    parser.add_argument("--no-multimodal", dest="multimodal", action="store_false")
    parser.add_argument("--no-ws", dest="ws", action="store_false", help="skip the WebSocket (/v1/live) text turns")
    args = parser.parse_args()
    args.players = [int(x) for x in args.players.split(",")]
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
