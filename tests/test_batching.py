"""Continuous batching and prefix caching change nothing a session gets (compared in fp32, greedy)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from npc_server.llm.batched import BatchedEngine
from npc_server.llm.engine import GenerationStats, Message, SamplingParams
from npc_server.llm.local import LocalEngine
from npc_server.llm.weights import resolve_model
from tests.conftest import MODEL_CACHE

SYSTEM = Message("system", "You are Brokk, a gruff dwarven blacksmith of the Greyhorn Mountains.")
QUESTIONS = ["Can you fix my sword?", "What is your name?", "Tell me about the mountain.", "How much for an axe?"]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=20)


def prompt(question: str) -> list[Message]:
    return [SYSTEM, Message("user", question)]


@pytest.fixture(scope="module")
def folder():  # type: ignore[no-untyped-def]
    return resolve_model("smollm2", MODEL_CACHE)


@pytest.fixture(scope="module")
def reference(folder) -> dict[str, str]:  # type: ignore[no-untyped-def]
    engine = LocalEngine(folder, dtype="float32")
    return {q: generate(engine, prompt(q)) for q in QUESTIONS}


@pytest.fixture
def batched(folder) -> Iterator[BatchedEngine]:  # type: ignore[no-untyped-def]
    engine = BatchedEngine(folder, dtype="float32", max_batch=4, prefill_chunk=16)  # prompts fill in chunks
    yield engine
    engine.close()


def generate(engine: LocalEngine, messages: list[Message], cancel: threading.Event | None = None) -> str:
    return "".join(engine.generate(messages, GREEDY, GenerationStats(), cancel or threading.Event()))


def concurrently(engine: BatchedEngine, questions: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}

    def work(q: str) -> None:
        out[q] = generate(engine, prompt(q))

    threads = [threading.Thread(target=work, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_batched_equals_unbatched(batched: BatchedEngine, reference: dict[str, str]) -> None:
    for k, v in zip(batched._k, batched._v, strict=True):  # fresh memory may hold anything, NaN included
        k.fill_(float("nan"))
        v.fill_(float("nan"))
    assert concurrently(batched, QUESTIONS) == reference
    assert batched.batched_tokens > batched.steps  # steps really ran several sequences at once


def test_cancelling_one_session_leaves_the_others_unchanged(batched: BatchedEngine, reference) -> None:  # type: ignore[no-untyped-def]
    cancel = threading.Event()
    seen: list[str] = []

    def cancelled() -> None:
        stats = GenerationStats()
        for delta in batched.generate(
            prompt("Sing me a song."), SamplingParams(temperature=0.0, max_new_tokens=200), stats, cancel
        ):
            seen.append(delta)
            if len(seen) == 3:
                cancel.set()
        assert stats.finish_reason == "cancelled"

    victim = threading.Thread(target=cancelled)
    victim.start()
    others = concurrently(batched, QUESTIONS[:3])
    victim.join(60)
    assert len(seen) <= 4
    assert others == {q: reference[q] for q in QUESTIONS[:3]}


def test_prefix_cached_equals_uncached(folder, reference) -> None:  # type: ignore[no-untyped-def]
    engine = BatchedEngine(folder, dtype="float32", max_batch=2)
    try:
        first = generate(engine, prompt(QUESTIONS[0]))
        stats = GenerationStats()
        second = "".join(engine.generate(prompt(QUESTIONS[1]), GREEDY, stats, threading.Event()))
        again = "".join(engine.generate(prompt(QUESTIONS[0]), GREEDY, GenerationStats(), threading.Event()))
        assert stats.extra["prefix_reused_tokens"] > 10  # the shared system turn came from the cache
        assert [first, second, again] == [reference[QUESTIONS[0]], reference[QUESTIONS[1]], reference[QUESTIONS[0]]]
    finally:
        engine.close()
    uncached = BatchedEngine(folder, dtype="float32", max_batch=2, prefix_cache_tokens=0)
    try:
        assert generate(uncached, prompt(QUESTIONS[1])) == reference[QUESTIONS[1]]
        assert uncached.prefix_cache.hits == 0
    finally:
        uncached.close()
