"""One turn of conversation, as a stream of events. HTTP, SSE and WebSocket all run turns through here."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from npc_server.dialogue.guard import ReplyFilter
from npc_server.errors import NotFound, NpcError
from npc_server.llm.engine import EngineRunner, GenerationStats, Message, SamplingParams
from npc_server.personas.prompt import Turn, build_messages
from npc_server.personas.schema import Persona
from npc_server.settings import Settings
from npc_server.store.sqlite import SessionMismatch, Store

STOP_STRINGS = ("<|im_start|>", "\nUser:", "\nPlayer:", "\nYou:")
HISTORY_LIMIT = 64  # turns read from the store; the token budget trims further


@dataclass
class TurnInput:
    npc_id: str
    player_id: str
    text: str
    session_id: str | None = None


@dataclass
class ReplyDelta:
    """Whole sentences of the reply, in order; concatenated they equal the final text."""

    text: str


@dataclass
class TurnResult:
    session_id: str
    npc_id: str
    text: str
    fallback: bool  # the model failed the guard twice and a persona fallback line was used
    regenerated: bool
    timings_ms: dict[str, float]
    usage: dict[str, int]
    meta: dict[str, Any] = field(default_factory=dict)


TurnEvent = ReplyDelta | TurnResult


class TurnService:
    def __init__(self, personas: dict[str, Persona], runner: EngineRunner, store: Store, settings: Settings):
        self.personas = personas
        self.runner = runner
        self.store = store
        self.settings = settings

    def persona(self, npc_id: str) -> Persona:
        persona = self.personas.get(npc_id)
        if persona is None:
            raise NotFound(f"no NPC with id '{npc_id}'", code="npc_not_found")
        return persona

    def sampling(self, persona: Persona, attempt: int) -> SamplingParams:
        s, g = self.settings, persona.generation
        seed = None if s.seed is None else s.seed + attempt
        return SamplingParams(
            temperature=s.temperature if g.temperature is None else g.temperature,
            top_p=s.top_p if g.top_p is None else g.top_p,
            top_k=s.top_k if g.top_k is None else g.top_k,
            repetition_penalty=s.repetition_penalty if g.repetition_penalty is None else g.repetition_penalty,
            max_new_tokens=s.max_new_tokens if g.max_new_tokens is None else g.max_new_tokens,
            stop=STOP_STRINGS,
            seed=seed if seed is not None else random.randrange(2**31),  # noqa: S311 (sampling, not secrets)
        )

    async def run(self, turn: TurnInput) -> AsyncIterator[TurnEvent]:
        started = time.perf_counter()
        timings: dict[str, float] = {}

        def mark(name: str, since: float) -> float:
            now = time.perf_counter()
            timings[name] = round((now - since) * 1000, 1)
            return now

        persona = self.persona(turn.npc_id)
        try:
            session = await asyncio.to_thread(self.store.open_session, turn.player_id, turn.npc_id, turn.session_id)
        except SessionMismatch:
            raise NpcError(
                "session_id belongs to another player or NPC", code="session_conflict", status=409
            ) from None
        stored = await asyncio.to_thread(self.store.turns, session.id, HISTORY_LIMIT)
        history = [Turn(t.role, t.text) for t in stored]
        t = mark("load_ms", started)

        engine = self.runner.engine
        budget = engine.context_tokens - self.sampling(persona, 0).max_new_tokens
        messages, kept = await asyncio.to_thread(
            build_messages, persona, history, turn.text, count_tokens=engine.count_tokens, budget=budget
        )
        t = mark("prompt_ms", t)

        reply: ReplyFilter | None = None
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "history_turns": kept}
        first_sentence: float | None = None
        attempts = 0
        for attempt in range(2):
            attempts += 1
            reply = ReplyFilter(persona, turn.text)
            stats = GenerationStats()
            async for sentence in self._sentences(messages, self.sampling(persona, attempt), reply, stats):
                if first_sentence is None:
                    first_sentence = time.perf_counter()
                    timings["first_sentence_ms"] = round((first_sentence - started) * 1000, 1)
                yield ReplyDelta(sentence if reply.sentences[0] == sentence else " " + sentence)
            usage["prompt_tokens"] += stats.prompt_tokens
            usage["completion_tokens"] += stats.completion_tokens
            timings.setdefault("first_token_ms", round(stats.first_token_ms, 1))
            if reply.sentences:
                break
        assert reply is not None
        t = mark("generation_ms", t)

        fallback = not reply.sentences
        text = reply.text
        if fallback:
            text = persona.fallback_lines[len(history) // 2 % len(persona.fallback_lines)]
            yield ReplyDelta(text)
        meta = {"fallback": fallback, "guard": reply.broken}
        await asyncio.to_thread(
            self.store.add_turns, session.id, [("player", turn.text, {}), ("npc", text, meta)]
        )
        t = mark("store_ms", t)
        timings["total_ms"] = round((time.perf_counter() - started) * 1000, 1)
        yield TurnResult(
            session_id=session.id,
            npc_id=persona.id,
            text=text,
            fallback=fallback,
            regenerated=attempts > 1,
            timings_ms=timings,
            usage=usage,
        )

    async def _sentences(
        self, messages: list[Message], params: SamplingParams, reply: ReplyFilter, stats: GenerationStats
    ) -> AsyncIterator[str]:
        """Whole, checked sentences from one generation; stops decoding as soon as the reply is done."""
        stream = self.runner.stream(messages, params, stats)
        try:
            async for delta in stream:
                for sentence in reply.feed(delta):
                    yield sentence
                if reply.done:
                    return
        finally:
            await stream.aclose()
        for sentence in reply.finish(complete=stats.finish_reason == "stop"):
            yield sentence
