"""Continuous batching and prefix caching change nothing a session gets (compared in fp32, greedy); the
int8 weights for small batches stay close to the model's own."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from npc_server.app import prefill_personas
from npc_server.llm.batched import BatchedEngine
from npc_server.llm.engine import GenerationStats, Message, SamplingParams
from npc_server.llm.llama import INT4_ROWS, INT8_ROWS, Weight
from npc_server.llm.local import LocalEngine
from npc_server.llm.weights import resolve_model
from npc_server.personas.loader import load_personas
from npc_server.personas.prompt import build_messages, fixed_messages
from npc_server.settings import DEFAULT_PERSONAS
from tests.conftest import MODEL_CACHE

SYSTEM = Message("system", "You are Brokk, a gruff dwarven blacksmith of the Greyhorn Mountains.")
QUESTIONS = [
    "Can you fix my sword?",
    "What is your name?",
    "Tell me about the mountain, the old mines under it and the dragon that people say sleeps in the deepest one.",
    "How much for an axe?",
    "Hi.",
    "I walked here from the coast for nine days, through rain and mud, to ask you for one thing: a blade.",
]
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


@pytest.fixture(params=[16, 256], ids=["one-prompt-per-chunk", "prompts-filled-together"])
def batched(folder, request) -> Iterator[BatchedEngine]:  # type: ignore[no-untyped-def]
    # 16: each prompt fills in several chunks; 256: several prompts fill in one forward. More questions than
    # slots: sequences join as others leave, into whichever slots are free.
    engine = BatchedEngine(folder, dtype="float32", max_batch=4, prefill_chunk=request.param)
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


def test_banned_phrases_are_never_generated_and_leave_other_sessions_alone(batched: BatchedEngine, reference) -> None:  # type: ignore[no-untyped-def]
    banned_question = QUESTIONS[0]
    phrase = " ".join(reference[banned_question].split()[1:3])  # two words of its greedy reply
    out: dict[str, str] = {}

    def work(q: str) -> None:
        params = replace(GREEDY, banned=(phrase,)) if q == banned_question else GREEDY
        out[q] = "".join(batched.generate(prompt(q), params, GenerationStats(), threading.Event()))

    threads = [threading.Thread(target=work, args=(q,)) for q in QUESTIONS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out[banned_question].strip() and phrase not in out[banned_question]
    assert {q: out[q] for q in QUESTIONS[1:]} == {q: reference[q] for q in QUESTIONS[1:]}


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


def test_a_prompt_filled_alongside_others_moves_into_place(folder, reference) -> None:  # type: ignore[no-untyped-def]
    """The scheduler driven by hand into the case where a filled prompt's place after the active sequences is
    held by another prompt being filled: the two swap slots and both get what they would alone."""
    engine = BatchedEngine(folder, dtype="float32", max_batch=4, prefill_chunk=256)
    engine.close()  # the test runs the scheduler's steps itself
    out: dict[str, str] = {}
    cancel_first = threading.Event()

    def submit(q: str, cancel: threading.Event | None = None) -> threading.Thread:
        waiting = engine._waiting.qsize()
        t = threading.Thread(target=lambda: out.__setitem__(q, generate(engine, prompt(q), cancel)))
        t.start()
        while engine._waiting.qsize() == waiting:
            time.sleep(0.01)
        return t

    first = submit("Sing me a song.", cancel_first)
    engine._admit()
    engine._prefill()  # decoding in slot 0
    a = submit(QUESTIONS[0])
    engine._admit()  # filling in slot 1
    cancel_first.set()
    engine._retire()  # slot 0 is free again
    c = submit(QUESTIONS[1])
    engine._admit()  # filling in slot 0
    assert [s.slot for s in engine._filling] == [1, 0]
    engine._stop = False
    engine._thread = threading.Thread(target=engine._loop, daemon=True)
    engine._thread.start()
    for t in (first, a, c):
        t.join(60)
    engine.close()
    assert out[QUESTIONS[0]] == reference[QUESTIONS[0]]
    assert out[QUESTIONS[1]] == reference[QUESTIONS[1]]


def test_prefix_cached_equals_uncached(folder, reference) -> None:  # type: ignore[no-untyped-def]
    engine = BatchedEngine(folder, dtype="float32", max_batch=2)
    try:
        first = generate(engine, prompt(QUESTIONS[0]))
        stats = GenerationStats()
        second = "".join(engine.generate(prompt(QUESTIONS[1]), GREEDY, stats, threading.Event()))
        again = "".join(engine.generate(prompt(QUESTIONS[0]), GREEDY, GenerationStats(), threading.Event()))
        assert stats.extra["prefix_reused_tokens"] > 10  # the shared system turn came from the cache
        assert [first, second, again] == [reference[QUESTIONS[0]], reference[QUESTIONS[1]], reference[QUESTIONS[0]]]
        # A conversation over a pinned prefix: its entry keeps only the KV after the shared system turn, and
        # its next turn is rebuilt from both.
        engine.prefix_cache.pin()
        reply = generate(engine, prompt(QUESTIONS[2]))
        follow_up = [*prompt(QUESTIONS[2]), Message("assistant", reply), Message("user", QUESTIONS[3])]
        for k, v in zip(engine._k, engine._v, strict=True):  # no help from what earlier turns left in the slots
            k.normal_()
            v.normal_()
        stats = GenerationStats()
        continued = "".join(engine.generate(follow_up, GREEDY, stats, threading.Event()))
        assert stats.extra["prefix_reused_tokens"] > engine.count_tokens(prompt(QUESTIONS[2])) - 3
    finally:
        engine.close()
    uncached = BatchedEngine(folder, dtype="float32", max_batch=2, prefix_cache_tokens=0)
    try:
        assert generate(uncached, prompt(QUESTIONS[1])) == reference[QUESTIONS[1]]
        assert generate(uncached, prompt(QUESTIONS[2])) == reply
        assert generate(uncached, follow_up) == continued
        assert uncached.prefix_cache.hits == 0
    finally:
        uncached.close()


def test_persona_prefixes_are_prefilled_at_start(folder) -> None:  # type: ignore[no-untyped-def]
    personas, _ = load_personas(DEFAULT_PERSONAS)
    engine = BatchedEngine(folder, max_batch=2)
    try:
        prefill_personas(engine, personas)
        for persona in personas.values():
            messages, _ = build_messages(
                persona, [], "Hello there!", count_tokens=engine.count_tokens, budget=1500, situation="You feel calm."
            )
            stats = GenerationStats()
            for _ in engine.generate(
                messages, SamplingParams(temperature=0.0, max_new_tokens=1), stats, threading.Event()
            ):
                pass
            # The first turn with each NPC computes only what follows its fixed prompt.
            assert stats.extra["prefix_reused_tokens"] >= engine.count_tokens(fixed_messages(persona)) - 3
    finally:
        engine.close()


def four_bit(rows: int, cols: int) -> torch.Tensor:
    """A weight of 4-bit levels in groups of 32 along each row, each group with its own step and offset: what
    a Q4_1 GGUF's weights are once dequantised."""
    levels = torch.randint(0, 16, (rows, cols // 32, 32)).float()
    levels[..., :2] = torch.tensor([0.0, 15.0])  # a group's lowest and highest weights are its end levels
    step, low = torch.rand(rows, cols // 32, 1) * 0.01, torch.randn(rows, cols // 32, 1) * 0.05
    return (levels * step + low).flatten(1).to(torch.bfloat16)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize(
    ("weight", "kernel_rows", "tolerance"),
    [
        (lambda: torch.randn(256, 128, dtype=torch.bfloat16), INT8_ROWS, 0.02),  # not 4-bit: int8
        (lambda: four_bit(256, 128), INT4_ROWS, 0.005),  # 4-bit levels: int4, as close as bf16 allows
    ],
)
def test_quantised_weights_stay_close_to_the_model_weights(rows, weight, kernel_rows, tolerance) -> None:
    torch.manual_seed(0)
    w = weight()
    x = torch.randn(rows, 128, dtype=torch.bfloat16)
    exact = F.linear(x.float(), w.float())
    quantised = Weight(w, quantize=True)
    assert quantised.rows == kernel_rows
    error = (quantised(x).float() - exact).norm() / exact.norm()
    assert error < tolerance
    wide = torch.randn(kernel_rows + 1, 128, dtype=torch.bfloat16)
    assert torch.equal(quantised(wide), F.linear(wide, w))  # larger batches use the model's own weights


def test_prefix_cache_keeps_one_entry_per_conversation() -> None:
    """A conversation's next prompt repeats its last one up to the end of the history: the old entry goes."""
    from npc_server.llm.batched import PrefixCache

    def ids(*parts: range) -> torch.Tensor:
        return torch.tensor([i for part in parts for i in part])

    kv = [(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1))]
    cache = PrefixCache(100_000)
    turn1 = ids(range(900), range(5000, 5100))  # persona + history, then note and line
    other = ids(range(700), range(6000, 6300))  # another conversation with the same persona
    cache.add(turn1, lambda _: kv)
    cache.add(other, lambda _: kv)
    turn2 = ids(range(900), range(7000, 7200))  # the same history, then the last exchange, note and line
    cache.add(turn2, lambda _: kv)
    kept = [len(entry[0]) for entry in cache.entries.values()]
    assert sorted(kept) == [1000, 1100] and cache.tokens == 2100  # turn1 superseded; the other conversation kept
    assert cache.longest(ids(range(900), range(7000, 7100)))[0] == 1000
    assert cache.longest(ids(range(900), range(9000, 9010)))[0] == 900  # a new conversation: the shared part


def test_pinned_persona_prefixes_outlive_conversations_which_hold_only_what_follows_them() -> None:
    from npc_server.llm.batched import PrefixCache

    kv = [(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1))]
    cache = PrefixCache(2_500)
    persona = torch.arange(900)
    cache.add(torch.cat([persona, torch.tensor([1])]), lambda _: kv)  # the fixed prompt and "Hello."
    cache.pin()
    assert cache.tokens == 0
    read_from = []

    def conversation(n: int) -> torch.Tensor:
        return torch.cat([persona, torch.arange(10_000 * n, 10_000 * n + 300)])

    for n in range(1, 11):  # each repeats the persona's prefix, then 300 tokens of its own
        cache.add(conversation(n), lambda start: read_from.append(start) or kv)
        assert cache.tokens <= 2_500
    assert read_from == [900] * 10  # only the KV after the pinned prefix is copied and kept
    assert cache.tokens == 8 * 300 and len(cache.entries) == 9  # the prefix, neither superseded nor evicted
    assert cache.pinned <= set(cache.entries)
    assert cache.longest(conversation(1))[0] == 900  # pushed out: the persona's prefix is still there
    reused, parts = cache.longest(conversation(10))
    assert reused == 1200 and [(start, stop) for _, start, stop in parts] == [(0, 900), (900, 1200)]
