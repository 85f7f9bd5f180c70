"""Best-of-N replies in TurnService: N candidates sampled at once, the one whose first sentence sounds most like
the persona streams on, the others are cancelled. A scripted engine replies by sampling seed, so each candidate
(seeds 7, 8, 9… with NPC_SEED=7) has a known script; a bag-of-words embedder stands in for MiniLM."""

from __future__ import annotations

import re
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from npc_server.dialogue import rerank
from npc_server.dialogue.service import ReplyDelta, TurnInput, TurnResult, TurnService
from npc_server.llm.engine import EngineRunner, GenerationStats, Message, SamplingParams
from npc_server.personas.loader import load_personas
from npc_server.store.sqlite import Store
from tests.conftest import make_settings

PERSONAS, _ = load_personas(Path(__file__).resolve().parent.parent / "personas")
SEED = 7
HOLD = "|"  # in a script: wait here until the stream is cancelled (or give up after a while)

BROKK = "Speak plain or don't speak, lad. Coin first. Then we talk."  # Brokk's own phrases
HALCYON = "Noted, and filed under regrettable. Then | probability of success: four percent."
ELOWEN = "How quaint, mortal, you may approach briefly. Then | I have seen forests rise and fall."


class SeededEngine:
    """Replies with `scripts[seed - SEED]`, word by word; records which streams were cancelled."""

    name = "seeded"
    context_tokens = 2048
    max_concurrency = 8

    def __init__(self, *scripts: str) -> None:
        self.scripts = scripts
        self.started: list[int] = []
        self.cancelled: set[int] = set()
        self.finished: set[int] = set()

    def count_tokens(self, messages: list[Message]) -> int:
        return sum(len(m.content.split()) + 4 for m in messages)

    def generate(
        self, messages: list[Message], params: SamplingParams, stats: GenerationStats, cancel: threading.Event
    ) -> Iterator[str]:
        k = (params.seed or SEED) - SEED
        self.started.append(k)
        stats.prompt_tokens = self.count_tokens(messages)
        for i, word in enumerate(self.scripts[min(k, len(self.scripts) - 1)].split(" ")):
            if word == HOLD:
                cancel.wait(timeout=10)
                continue
            if cancel.is_set():
                self.cancelled.add(k)
                stats.finish_reason = "cancelled"
                return
            stats.completion_tokens = i + 1
            yield word if i == 0 else " " + word
        stats.finish_reason = "stop"
        self.finished.add(k)


def embed(texts: list[str]) -> np.ndarray:
    """Unit-length hashed bags of words: texts sharing words point the same way."""
    out = np.zeros((len(texts), 256), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in re.findall(r"[a-z']+", text.lower()):
            out[row, zlib.crc32(word.encode()) % 256] += 1
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def service(tmp_path: Path, engine: SeededEngine, candidates: int = 3, **overrides: object) -> TurnService:
    settings = make_settings(tmp_path, seed=SEED, reply_candidates=candidates, **overrides)
    store = Store(tmp_path / "turns.sqlite3")
    return TurnService(dict(PERSONAS), EngineRunner(engine), store, settings, embed=embed)


async def turn(svc: TurnService, text: str = "Can you fix my sword?") -> tuple[list[str], TurnResult]:
    prepared = await svc.prepare(TurnInput(npc_id="brokk", player_id="p1", text=text))
    deltas: list[str] = []
    result: TurnResult | None = None
    async for event in svc.respond(prepared):
        if isinstance(event, ReplyDelta):
            deltas.append(event.text)
        else:
            result = event
    assert result is not None
    return deltas, result


def stored(svc: TurnService, session_id: str) -> str:
    return svc.store.turns(session_id, 10)[-1].text


async def test_the_candidate_in_the_persona_voice_wins_and_the_others_are_cancelled(tmp_path: Path) -> None:
    engine = SeededEngine(HALCYON, BROKK, ELOWEN)
    svc = service(tmp_path, engine)
    deltas, result = await turn(svc)
    assert sorted(engine.started) == [0, 1, 2]
    assert result.text == BROKK and not result.fallback and not result.regenerated
    assert deltas == ["Speak plain or don't speak, lad.", " Coin first.", " Then we talk."]
    assert "".join(deltas) == result.text == stored(svc, result.session_id)
    assert engine.cancelled == {0, 2} and engine.finished == {1}  # the losers stopped mid-reply
    assert result.usage["candidates"] == 3 and not svc._live  # every stream is closed
    svc.runner.close()


async def test_order_does_not_matter(tmp_path: Path) -> None:
    engine = SeededEngine(ELOWEN, HALCYON, BROKK)
    svc = service(tmp_path, engine)
    _, result = await turn(svc)
    assert result.text == BROKK and engine.cancelled == {0, 1}
    svc.runner.close()


async def test_a_candidate_that_breaks_character_is_never_chosen(tmp_path: Path) -> None:
    # The first sounds most like Brokk, and breaks character in its first sentence.
    breaking = "As an AI language model, lad, speak plain or don't speak, coin first. Then we talk."
    plain = "The blade is cracked. Leave it here."
    engine = SeededEngine(breaking, plain, plain)
    svc = service(tmp_path, engine)
    deltas, result = await turn(svc)
    assert result.text == plain and "AI" not in "".join(deltas)
    assert "".join(deltas) == stored(svc, result.session_id)
    svc.runner.close()


async def test_when_every_candidate_breaks_fresh_ones_are_drawn_then_the_fallback_line(tmp_path: Path) -> None:
    breaking = "I am a large language model. Sorry."
    engine = SeededEngine(breaking, breaking, breaking, "Hmph. Leave it with me, lad.")
    svc = service(tmp_path, engine)
    deltas, result = await turn(svc)
    assert sorted(engine.started) == [0, 1, 2, 3, 4, 5]  # a second round of three, seeds 10..12
    assert result.regenerated and result.text == "Hmph. Leave it with me, lad." == "".join(deltas)

    svc = service(tmp_path / "again", SeededEngine(breaking))
    deltas, result = await turn(svc)
    assert result.fallback and result.text in PERSONAS["brokk"].fallback_lines and deltas == [result.text]
    svc.runner.close()


async def test_a_barge_in_during_the_reply_cancels_every_candidate(tmp_path: Path) -> None:
    held = "Speak plain or don't speak, lad. Coin | first."
    engine = SeededEngine(HALCYON, held, ELOWEN)
    svc = service(tmp_path, engine)
    prepared = await svc.prepare(TurnInput(npc_id="brokk", player_id="p1", text="Fix my sword?"))
    events = svc.respond(prepared)
    first = await anext(events)
    assert isinstance(first, ReplyDelta) and first.text == "Speak plain or don't speak, lad."
    await events.aclose()
    assert engine.cancelled == {0, 1, 2} and not svc._live
    row = svc.store.turns(prepared.session_id, 10)[-1]
    assert row.text == first.text and row.meta["interrupted"] is True
    svc.runner.close()


@pytest.mark.parametrize(("live", "expected"), [(0, 3), (2, 2), (4, 1), (9, 1)])
def test_a_busy_engine_gets_fewer_candidates(tmp_path: Path, live: int, expected: int) -> None:
    svc = service(tmp_path, SeededEngine(BROKK), max_batch=4)
    svc._live.update(object() for _ in range(live))  # other turns' candidates
    assert svc.candidates_now() == expected
    svc.runner.close()


def test_one_candidate_without_an_embedder_or_on_a_one_at_a_time_engine(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, reply_candidates=4)
    store = Store(tmp_path / "turns.sqlite3")
    plain = TurnService(dict(PERSONAS), EngineRunner(SeededEngine(BROKK)), store, settings)
    assert plain.candidates_now() == 1 and plain.voices == {}
    single = SeededEngine(BROKK)
    single.max_concurrency = 1
    assert TurnService(dict(PERSONAS), EngineRunner(single), store, settings, embed=embed).candidates_now() == 1


def test_a_short_first_sentence_is_not_a_short_reply() -> None:
    def score(complete: bool) -> float:
        return rerank.score("Hmph.", player_text="Can you fix my sword?", complete=complete)

    assert score(complete=False) > score(complete=True)
