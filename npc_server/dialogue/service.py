"""One turn of conversation, as a stream of events. HTTP, SSE and WebSocket all run turns through here.

With `reply_candidates` N > 1 (and the sentence embedder loaded), a turn samples N replies at once, each
through its own guard. Each is read up to its first whole, checked sentence; the first sentences are scored
by `rerank.score` (persona voice, relevant facts, repetition), the winner streams on and the others are
cancelled, which frees their engine slots. Candidates that break character or fail are dropped. When the
engine's batch is filling up, turns sample fewer candidates (`candidates_now`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from npc_server.dialogue import rerank
from npc_server.dialogue.guard import ReplyFilter
from npc_server.dialogue.mood import NpcMood, affect_note, update_mood
from npc_server.errors import NotFound, NpcError
from npc_server.fusion.model import FusedAffect
from npc_server.fusion.runtime import AffectFuser
from npc_server.llm.engine import EngineRunner, GenerationStats, Message, SamplingParams
from npc_server.perception.service import Perceived, Perception, Upload
from npc_server.personas.prompt import FACTS, Turn, build_messages, relevant_facts
from npc_server.personas.schema import Persona
from npc_server.settings import Settings
from npc_server.store.sqlite import SessionMismatch, Store, TurnRow

log = logging.getLogger(__name__)

Embed = Callable[[list[str]], np.ndarray]  # texts -> unit-length sentence embeddings [N, D]

STOP_STRINGS = ("<|im_start|>", "\nUser:", "\nPlayer:", "\nYou:")
HISTORY_LIMIT = 64  # turns read from the store; the token budget trims further


SILENCE = "..."  # the player's line when they sent only a clip with no speech in it


@dataclass
class TurnInput:
    npc_id: str
    player_id: str
    text: str | None = None
    session_id: str | None = None
    faces: list[Upload] = field(default_factory=list)
    voice: Upload | None = None


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
    player_text: str
    perceived: Perceived | None = None
    affect: FusedAffect | None = None  # the player's fused affect
    npc_emotion: NpcMood | None = None  # the NPC's emotional state after this turn


TurnEvent = ReplyDelta | TurnResult


@dataclass
class PreparedTurn:
    persona: Persona
    session_id: str
    player_text: str
    perceived: Perceived | None
    affect: FusedAffect | None
    mood: NpcMood
    messages: list[Message]
    history_turns: int  # history turns that fit the prompt
    history_len: int  # history turns stored
    started: float
    timings_ms: dict[str, float]


@dataclass(eq=False)
class _Candidate:
    """One sampled reply: its own guard, its stats, and its stream of checked sentences."""

    reply: ReplyFilter
    stats: GenerationStats
    sentences: AsyncGenerator[str, None]
    read: list[str] = field(default_factory=list)  # sentences read before the choice


def _last_mood(stored: list[TurnRow]) -> NpcMood | None:
    """The NPC's mood after its last reply in this session, if it was recorded."""
    for row in reversed(stored):
        mood = row.meta.get("mood") if row.role == "npc" else None
        if isinstance(mood, dict):
            return NpcMood(mood["label"], mood["intensity"], mood["valence"], mood["arousal"])
    return None


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 1)


class TurnService:
    # How far each candidate is read before the choice: its first sentence (the winner's later sentences then
    # stream as they are decoded), or, when False, its whole reply (which then arrives all at once).
    choose_on_first_sentence = True

    def __init__(
        self,
        personas: dict[str, Persona],
        runner: EngineRunner,
        store: Store,
        settings: Settings,
        perception: Perception | None = None,
        fuser: AffectFuser | None = None,
        embed: Embed | None = None,
    ) -> None:
        self.personas = personas
        self.runner = runner
        self.store = store
        self.settings = settings
        self.perception = perception
        self.fuser = fuser
        self.embed = embed
        # Re-ranking needs the sentence embedder (loaded with perception): most of its gain is the voice term.
        self.candidates = settings.reply_candidates if embed is not None else 1
        if settings.reply_candidates > 1 and embed is None:
            log.info(
                "NPC_REPLY_CANDIDATES=%d needs the sentence embedder (perception); one candidate per turn",
                settings.reply_candidates,
            )
        self.voices = rerank.voices(personas, embed) if embed is not None and self.candidates > 1 else {}
        self._live: set[_Candidate] = set()  # candidates decoding now, over all turns

    def persona(self, npc_id: str) -> Persona:
        persona = self.personas.get(npc_id)
        if persona is None:
            raise NotFound(f"no NPC with id '{npc_id}'", code="npc_not_found")
        return persona

    def sampling(self, persona: Persona, attempt: int, player_text: str = "") -> SamplingParams:
        """Sampling for one candidate of a reply to `player_text` (which the eval's variants may use)."""
        s, g = self.settings, persona.generation
        seed = None if s.seed is None else s.seed + attempt
        return SamplingParams(
            temperature=s.temperature if g.temperature is None else g.temperature,
            top_p=s.top_p if g.top_p is None else g.top_p,
            top_k=s.top_k if g.top_k is None else g.top_k,
            repetition_penalty=s.repetition_penalty if g.repetition_penalty is None else g.repetition_penalty,
            max_new_tokens=s.max_new_tokens if g.max_new_tokens is None else g.max_new_tokens,
            stop=STOP_STRINGS,
            banned=tuple(g.banned_phrases),
            seed=seed if seed is not None else random.randrange(2**31),  # noqa: S311 (sampling, not secrets)
            adapter=self.adapter(persona),
        )

    def adapter(self, persona: Persona) -> str | None:
        """The LoRA adapter this persona's turns run with: its own, where the engine loaded one."""
        loaded = getattr(self.runner.engine, "adapters", {})
        return persona.id if self.settings.adapters and persona.id in loaded else None

    async def prepare(self, turn: TurnInput) -> PreparedTurn:
        """Everything before generation: perception, session, history and prompt.

        Bad input fails here, before a transport starts streaming, so it can still answer with a 4xx.
        """
        started = time.perf_counter()
        persona = self.persona(turn.npc_id)
        timings: dict[str, float] = {}
        perceived: Perceived | None = None
        if self.perception is not None:
            perceived = await self.perception.perceive(turn.text, turn.faces, turn.voice)
            timings.update(perceived.timings_ms)
        elif turn.faces or turn.voice:
            raise NpcError("this server runs without perception (NPC_PERCEPTION=false)", code="perception_disabled")
        transcript = perceived.voice.transcript if perceived and perceived.voice else ""
        player_text = turn.text or transcript or SILENCE

        t = time.perf_counter()
        try:
            session = await asyncio.to_thread(self.store.open_session, turn.player_id, turn.npc_id, turn.session_id)
        except SessionMismatch:
            raise NpcError(
                "session_id belongs to another player or NPC", code="session_conflict", status=409
            ) from None
        stored, total = await asyncio.to_thread(
            lambda: (self.store.turns(session.id, HISTORY_LIMIT), self.store.turn_count(session.id))
        )
        history = [Turn(row.role, row.text) for row in stored]
        timings["load_ms"] = _ms(t)

        # How the player seems, and how that moves the NPC: both become a line of the system prompt.
        t = time.perf_counter()
        affect = None
        if self.fuser is not None and perceived is not None:
            affect = self.fuser.fuse(perceived.face, perceived.voice, perceived.text)
        mood = update_mood(_last_mood(stored), affect, persona.temperament)
        situation = affect_note(affect, mood) if affect is not None else ""
        timings["fusion_ms"] = _ms(t)

        t = time.perf_counter()
        engine = self.runner.engine
        budget = engine.context_tokens - self.sampling(persona, 0).max_new_tokens
        messages, kept = await asyncio.to_thread(
            build_messages,
            persona,
            history,
            player_text,
            count_tokens=engine.count_tokens,
            budget=budget,
            situation=situation,
            first=total - len(stored),
        )
        timings["prompt_ms"] = _ms(t)
        return PreparedTurn(
            persona=persona,
            session_id=session.id,
            player_text=player_text,
            perceived=perceived,
            affect=affect,
            mood=mood,
            messages=messages,
            history_turns=kept,
            history_len=len(history),
            started=started,
            timings_ms=timings,
        )

    def candidates_now(self) -> int:
        """Candidates for a turn starting now: `reply_candidates`, fewer when the engine's batch is filling up
        (extra candidates must not push other players' turns into the engine's queue), and one on an engine
        that generates one reply at a time."""
        slots = min(self.settings.max_batch, self.runner.engine.max_concurrency)
        return max(1, min(self.candidates, slots - len(self._live)))

    async def respond(self, turn: PreparedTurn) -> AsyncIterator[TurnEvent]:
        """Generate, guard and store the reply: sentence deltas, then the result."""
        persona, timings = turn.persona, turn.timings_ms
        t = time.perf_counter()
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "history_turns": turn.history_turns}
        said: list[str] = []  # the sentences sent, in order
        guard: list[str] = []
        rounds = attempts = 0
        try:
            while rounds < 2 and not said:  # a second round when every candidate failed the guard
                drawn = [self._candidate(turn, attempts + k) for k in range(self.candidates_now())]
                rounds, attempts = rounds + 1, attempts + len(drawn)
                try:
                    winner = await self._choose(turn, drawn)
                    guard = (winner or drawn[0]).reply.broken
                    if winner is None:
                        continue
                    for sentence in winner.read:
                        timings.setdefault("first_sentence_ms", _ms(turn.started))
                        said.append(sentence)  # before the yield: a barge-in there stores it as said
                        yield ReplyDelta(" " + sentence if len(said) > 1 else sentence)
                    await self._close(c for c in drawn if c is not winner)  # after the first sentence went out
                    async for sentence in winner.sentences:
                        said.append(sentence)
                        yield ReplyDelta(" " + sentence)
                    guard = winner.reply.broken
                finally:
                    await self._close(drawn)
                    usage["prompt_tokens"] += sum(c.stats.prompt_tokens for c in drawn)
                    usage["completion_tokens"] += sum(c.stats.completion_tokens for c in drawn)
                    timings.setdefault("first_token_ms", round(drawn[0].stats.first_token_ms, 1))
                    if "queue_ms" in drawn[0].stats.extra:  # waiting for a place in the engine's batch
                        timings.setdefault("queue_ms", round(drawn[0].stats.extra["queue_ms"], 1))
        except (GeneratorExit, asyncio.CancelledError):
            # Barge-in or a client gone: what the NPC already said stays in the history, marked as cut off.
            await self.interrupted(turn, " ".join(said))
            raise
        timings["generation_ms"] = _ms(t)
        usage["candidates"] = attempts

        fallback = not said
        text = " ".join(said)
        if fallback:
            text = persona.fallback_lines[turn.history_len // 2 % len(persona.fallback_lines)]
            yield ReplyDelta(text)
        t = time.perf_counter()
        meta = {"fallback": fallback, "guard": guard, "mood": turn.mood.to_dict()}
        heard = {"affect": turn.affect.to_dict()} if turn.affect is not None else {}
        await asyncio.to_thread(
            self.store.add_turns, turn.session_id, [("player", turn.player_text, heard), ("npc", text, meta)]
        )
        timings["store_ms"] = _ms(t)
        timings["total_ms"] = _ms(turn.started)
        yield TurnResult(
            session_id=turn.session_id,
            npc_id=persona.id,
            text=text,
            fallback=fallback,
            regenerated=rounds > 1,
            timings_ms=timings,
            usage=usage,
            player_text=turn.player_text,
            perceived=turn.perceived,
            affect=turn.affect,
            npc_emotion=turn.mood,
        )

    async def interrupted(self, turn: PreparedTurn, partial: str) -> None:
        """Record a turn whose reply was cut off (barge-in, cancel, disconnect)."""
        turns: list[tuple[str, str, dict[str, Any]]] = [("player", turn.player_text, {})]
        if partial:
            turns.append(("npc", partial, {"interrupted": True, "mood": turn.mood.to_dict()}))
        await asyncio.shield(asyncio.to_thread(self.store.add_turns, turn.session_id, turns))

    async def run(self, turn: TurnInput) -> AsyncIterator[TurnEvent]:
        async for event in self.respond(await self.prepare(turn)):
            yield event

    def _candidate(self, turn: PreparedTurn, attempt: int) -> _Candidate:
        reply, stats = ReplyFilter(turn.persona, turn.player_text), GenerationStats()
        params = self.sampling(turn.persona, attempt, turn.player_text)
        candidate = _Candidate(reply, stats, self._sentences(turn.messages, params, reply, stats))
        self._live.add(candidate)
        return candidate

    async def _read(self, candidate: _Candidate) -> None:
        async for sentence in candidate.sentences:
            candidate.read.append(sentence)
            if self.choose_on_first_sentence:
                return

    async def _choose(self, turn: PreparedTurn, drawn: list[_Candidate]) -> _Candidate | None:
        """Read every candidate at once up to its first sentence (or whole reply); the best one that has one.

        A candidate the guard stopped before its first sentence is dropped, and so is one whose generation
        failed; the error is raised only when every candidate failed that way."""
        results = await asyncio.gather(*(self._read(c) for c in drawn), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if len(errors) == len(drawn):
            raise errors[0]
        good = [c for c, r in zip(drawn, results, strict=True) if r is None and c.read]
        if len(good) < 2:
            return good[0] if good else None
        t = time.perf_counter()
        persona = turn.persona
        vectors = await asyncio.to_thread(self.embed, [" ".join(c.read) for c in good]) if self.embed else None
        facts = relevant_facts(persona, turn.player_text, FACTS)
        examples = {e.npc for e in persona.examples}
        history = [m.content for m in turn.messages if m.role == "assistant" and m.content not in examples]
        scores = [
            rerank.score(
                " ".join(c.read),
                player_text=turn.player_text,
                facts=facts,
                history=history,
                vector=None if vectors is None else vectors[i],
                voice=self.voices.get(persona.id),
                cut=bool(c.reply.broken),
                complete=c.reply.done,
            )
            for i, c in enumerate(good)
        ]
        turn.timings_ms["rerank_ms"] = _ms(t)
        return good[rerank.best(scores)]

    async def _close(self, candidates: Iterable[_Candidate]) -> None:
        """Stop decoding these candidates (again is a no-op); the engine frees their slots at its next step."""
        closing = [c for c in candidates if c in self._live]
        self._live.difference_update(closing)
        await asyncio.gather(*(c.sentences.aclose() for c in closing))

    async def _sentences(
        self, messages: list[Message], params: SamplingParams, reply: ReplyFilter, stats: GenerationStats
    ) -> AsyncGenerator[str, None]:
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
