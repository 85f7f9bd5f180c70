"""Prompt building: persona in the system turn, player text only in user turns, history within budget."""

from __future__ import annotations

from npc_server.llm.engine import Message
from npc_server.personas.loader import load_persona_file
from npc_server.personas.prompt import HISTORY_STRIDE, Turn, build_messages, system_prompt
from npc_server.settings import DEFAULT_PERSONAS

BROKK = load_persona_file(DEFAULT_PERSONAS / "brokk.yaml")


def words(messages: list[Message]) -> int:
    return sum(len(m.content.split()) + 4 for m in messages)


def test_system_prompt_holds_the_persona() -> None:
    prompt = system_prompt(BROKK)
    assert BROKK.name in prompt and BROKK.knowledge[0] in prompt and BROKK.speaking_style.sample_phrases[0] in prompt
    assert "at most" in prompt


def test_examples_then_history_then_player_line() -> None:
    history = [Turn("player", "Hello there."), Turn("npc", "Hmph.")]
    messages, kept = build_messages(BROKK, history, "{name}? {{char}}", count_tokens=words, budget=10_000)
    assert kept == 2
    assert [m.role for m in messages[:3]] == ["system", "user", "assistant"]
    assert messages[-1] == Message("user", "{name}? {{char}}")  # never formatted
    assert messages[-3:-1] == [Message("user", "Hello there."), Message("assistant", "Hmph.")]
    assert all("{{char}}" not in m.content for m in messages[:-1])


def test_oldest_history_is_dropped_to_fit_the_budget() -> None:
    history = [Turn("player" if i % 2 == 0 else "npc", f"line {i} " + "word " * 20) for i in range(40)]
    full, _ = build_messages(BROKK, [], "Now?", count_tokens=words, budget=10_000)
    budget = words(full) + 100
    messages, kept = build_messages(BROKK, history, "Now?", count_tokens=words, budget=budget)
    assert words(messages) <= budget
    assert 0 < kept < 40 and kept % 2 == 0  # whole exchanges, newest kept
    assert messages[-2].content.startswith("line 39")
    assert messages[-1].content == "Now?"


def test_tiny_budget_keeps_persona_and_player_line() -> None:
    messages, kept = build_messages(BROKK, [Turn("player", "hi")], "Now?", count_tokens=words, budget=10)
    assert kept == 0 and messages[0].role == "system" and messages[-1].content == "Now?"


def test_situation_goes_in_the_late_note_and_the_system_prompt_stays_the_same() -> None:
    calm, _ = build_messages(BROKK, [], "Hello.", count_tokens=words, budget=4000)
    angry, _ = build_messages(
        BROKK, [], "Hello.", count_tokens=words, budget=4000, situation="The player is clearly angry."
    )
    assert calm[0] == angry[0]  # the persona prefix is byte-identical, so its KV cache is reused
    assert angry[-2].role == "system" and angry[-2].content.endswith("The player is clearly angry.")
    assert angry[-1].content == "Hello."


def test_kept_history_start_moves_in_strides_so_prompts_extend_each_other() -> None:
    """Once the oldest turns must go, consecutive prompts still start the same way most turns (their KV is
    reused), and every prompt fits."""
    full, _ = build_messages(BROKK, [], "Now?", count_tokens=words, budget=10_000)
    budget = words(full) + 300
    history = [Turn("player" if i % 2 == 0 else "npc", f"line {i} " + "word " * 20) for i in range(80)]
    starts, shared = [], 0
    previous: list[Message] = []
    for end in range(40, 80, 2):  # one exchange more each turn
        messages, kept = build_messages(BROKK, history[:end], "Now?", count_tokens=words, budget=budget)
        assert words(messages) <= budget and kept > 0 and kept % 2 == 0
        starts.append(end - kept)
        body = messages[:-1]  # without the player's new line
        shared += previous[: len(previous) - 1] == body[: len(previous) - 1]
        previous = body
    assert all(s % HISTORY_STRIDE == 0 for s in starts)
    assert shared >= len(starts) // 2  # a one-exchange slide would share nothing after the examples
