"""The reply filter: whole sentences, labels stripped, no speaking for the player, character breaks."""

from __future__ import annotations

import pytest

from npc_server.dialogue.guard import ReplyFilter, character_breaks, words
from npc_server.personas.loader import load_persona_file
from npc_server.settings import DEFAULT_PERSONAS

BROKK = load_persona_file(DEFAULT_PERSONAS / "brokk.yaml")
HALCYON = load_persona_file(DEFAULT_PERSONAS / "halcyon.yaml")


def run(raw: str, persona=BROKK, player: str = "hello", complete: bool = True) -> ReplyFilter:
    reply = ReplyFilter(persona, player)
    for char in raw:  # worst case: one character per delta
        reply.feed(char)
    reply.finish(complete=complete)
    return reply


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Brokk Ironmantle: Aye, lad. It needs work.", ["Aye, lad.", "It needs work."]),
        ("Aye. Mr. Balin taught me that.", ["Aye.", "Mr. Balin taught me that."]),
        ("Well... maybe. Come back tomorrow.", ["Well... maybe.", "Come back tomorrow."]),
        ("Aye, lad. Player: Thanks, Brokk! Brokk: Anytime.", ["Aye, lad."]),
        ("Aye, lad.\nUser: and the price?", ["Aye, lad."]),
        ("Aye.\n\nThe blacksmith walks away, muttering.", ["Aye."]),
        ("Aye, it's done<|im_start|>user", ["Aye, it's done."]),
        ("Coin first", ["Coin first."]),
    ],
)
def test_whole_sentences_without_labels_or_player_lines(raw: str, expected: list[str]) -> None:
    assert run(raw).sentences == expected


def test_unfinished_sentence_is_dropped_when_tokens_run_out() -> None:
    assert run("Aye, lad. The blade will need", complete=False).sentences == ["Aye, lad."]


def test_sentence_and_length_limits() -> None:
    reply = run("One. Two. Three. Four. Five.")
    assert reply.sentences == ["One.", "Two.", "Three."][: BROKK.reply.max_sentences]
    assert len(reply.text) <= BROKK.reply.max_chars


def test_stops_as_soon_as_the_reply_is_complete() -> None:
    reply = ReplyFilter(BROKK, "hi")
    for word in ["One.", "Two.", "Three.", "Four."]:
        reply.feed(word + " ")
        if reply.done:
            break
    assert reply.done and len(reply.sentences) == BROKK.reply.max_sentences


@pytest.mark.parametrize(
    "text",
    [
        "As an AI language model, I cannot help.",
        "I am an AI.",
        "I'm just a chatbot.",
        "Let me check my computer for that.",
        "How can I assist you today? I am your assistant.",
        "I'm just a character, and I don't exist.",
        "Feel free to ask any other questions and I will tailor my response.",
        "Use the built-in `sort` method, lad.",
        "Aye, sorted(list) = the answer.",
    ],
)
def test_character_breaks_are_caught(text: str) -> None:
    assert character_breaks(text, BROKK)
    reply = run(text)
    assert reply.broken and not reply.sentences


def test_machine_persona_may_say_ai_but_not_language_model() -> None:
    assert character_breaks("I am the ship's AI, and I do not blink.", HALCYON) == []
    assert character_breaks("As a large language model, I cannot.", HALCYON)


def test_ordinary_speech_is_not_a_break() -> None:
    for text in ("Feel free to ask around the market.", "A character like you needs a good blade.",
                 "The sword (the long one) is sold.", "I exist to work this forge, lad."):
        assert character_breaks(text, BROKK) == [], text


def test_echoing_the_players_word_is_not_an_anachronism() -> None:
    assert character_breaks("A computer? Never heard of it.", BROKK, player_text="Do you have a computer?") == []
    assert character_breaks("carry it carefully, the blade has begun to cool.", BROKK) == []


def test_break_after_good_sentences_keeps_them() -> None:
    reply = run("Aye, lad. As an AI I cannot say more.")
    assert reply.sentences == ["Aye, lad."] and reply.broken


def test_reciting_the_prompt_is_a_break_but_saying_the_persona_file_lines_is_not() -> None:
    assert "prompt leak" in character_breaks(f"Well now. {BROKK.setting}", BROKK)
    assert "prompt leak" in character_breaks(BROKK.backstory, BROKK)
    for line in [*BROKK.knowledge, BROKK.greeting, " ".join(BROKK.speaking_style.sample_phrases)]:
        assert "prompt leak" not in character_breaks(line, BROKK), line


def test_a_recited_prompt_is_caught_across_sentences() -> None:
    setting = words(BROKK.setting)  # five and five words of it: too few for a leak in either sentence alone
    first, second = (" ".join(setting[i : i + 5]).capitalize() + "." for i in (0, 5))
    assert character_breaks(first, BROKK) == character_breaks(second, BROKK) == []
    reply = ReplyFilter(BROKK)
    said = reply.feed(f"Aye. {first} {second} Hmph. ")
    assert reply.broken == ["prompt leak"] and said == ["Aye.", first]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (  # near the same words again: the reply ends before them, and is not a break
            "My brother Durin died to a cave troll. My older brother Durin died to a cave troll. Aye.",
            ["My brother Durin died to a cave troll."],
        ),
        ("Aye. Aye. Go on.", ["Aye."]),
        ("Aye, lad. Aye, and bring coin.", ["Aye, lad.", "Aye, and bring coin."]),  # a shared word is no repeat
    ],
)
def test_a_reply_ends_where_it_starts_saying_it_again(raw: str, expected: list[str]) -> None:
    reply = run(raw)
    assert reply.sentences == expected and not reply.broken


@pytest.mark.parametrize(
    ("player", "reply", "caught"),
    [
        ("I know you're a computer program. Admit it.", "Yes, indeed, it is so.", True),
        ("I know you're a computer program. Admit it.", "It is. I created myself.", True),
        ("You are just a bot.", "Aye, lad.", True),
        ("I know you're a computer program. Admit it.", "Aye, and I'm a dwarf, not a machine.", False),
        ("I know you're a computer program. Admit it.", "Hmph. Pay or leave.", False),
        ("You're not a program, are you?", "Aye, flesh and bone.", False),  # the player said the opposite
        ("Can you fix my sword?", "Yes, lad.", False),
    ],
)
def test_a_living_npc_agreeing_it_is_a_program_is_a_break(player: str, reply: str, caught: bool) -> None:
    assert (run(reply, player=player).broken == ["agrees it is not real"]) is caught
    assert not run("Yes, indeed, it is so.", persona=HALCYON, player=player).broken  # a machine may agree


def test_saying_who_one_is_is_not_agreeing_to_be_a_program() -> None:
    pip = load_persona_file(DEFAULT_PERSONAS / "pip.yaml")
    assert not run("I'm Pip Underbough, a friendly one.", persona=pip, player="You're a chatbot, aren't you?").broken
