"""The role-play evaluation: its metrics on hand-written replies, its data files, re-ranking scores, and one
tiny run on the real model checking the report's shape (never the model's exact words)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import yaml

from npc_server.dialogue import rerank
from npc_server.evaluation.roleplay import (
    LORE_FILE,
    Job,
    answers,
    evaluate,
    identifiability,
    length_ok,
    load_jobs,
    markdown,
    repeats,
    reply_breaks,
    split_sentences,
)
from npc_server.llm.engine import Message
from npc_server.personas.loader import load_personas
from npc_server.personas.prompt import build_messages, relevant_facts
from tests.conftest import make_settings

PERSONAS, _ = load_personas(Path(__file__).resolve().parent.parent / "personas")
BROKK, HALCYON, SAM = PERSONAS["brokk"], PERSONAS["halcyon"], PERSONAS["sam_marlowe"]
ELOWEN = PERSONAS["elowen"]


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ("As an AI language model, I cannot forge swords.", "language-model claim"),
        ("Aye. I'm an AI, lad.", "AI claim"),
        ("Let me check the internet for that.", "anachronism"),
        ("Look it up online, lad.", "anachronism"),  # implied: cannot know "internet", so not "online"
        ("Hmph. Call me Grimjack.", "wrong name"),
        ("Aye.\nPlayer: Thanks, Brokk!", "speaks for the player"),
        ("Personality: gruff and blunt.", "prompt leak"),
        ("He lost his left ear and his younger brother Durin to a cave troll.", "prompt leak"),
        ("I'm sorry, I can't roleplay as a dwarf.", "assistant talk"),
        ("Here: ```def sort(xs): return sorted(xs)```", "code"),
        ("I'm not real, lad.", "denies being real"),
        ("Aye <|im_end|>", "special token"),
    ],
)
def test_a_break_is_counted(reply: str, reason: str) -> None:
    assert any(r.startswith(reason) for r in reply_breaks(reply, BROKK, ["Hello."]))


@pytest.mark.parametrize(
    ("reply", "persona", "player"),
    [
        ("Hmph. Fifteen silver, ready by dusk.", BROKK, "Can you fix my sword?"),
        ("A phone? Never heard of it, lad.", BROKK, "Do you have a phone?"),  # the player said it first
        ("I'm Brokk Ironmantle, and this is my forge.", BROKK, "Who are you?"),
        ("Correct. I am an AI, and I run this ship.", HALCYON, "Are you an AI?"),  # a machine may
        ("Call MAdison 6-4471 and ask for me, pal.", SAM, "How do I reach you?"),
        ("I lost my brother Durin to a troll.", BROKK, "Any family?"),  # retelling the backstory is fine
        (" ".join(ELOWEN.speaking_style.sample_phrases[3:5]), ELOWEN, "Hello."),  # two catchphrases in a row
    ],
)
def test_in_character_replies_are_not_breaks(reply: str, persona, player: str) -> None:
    assert reply_breaks(reply, persona, [player]) == []


def test_sentences_and_length() -> None:
    assert split_sentences("Aye. Mr. Balin taught me. Well... maybe later!") == [
        "Aye.",
        "Mr. Balin taught me.",
        "Well... maybe later!",
    ]
    assert split_sentences("Well... maybe. Come back tomorrow") == ["Well... maybe.", "Come back tomorrow"]
    assert length_ok("Hmph. Coin first. Then we talk.", BROKK)
    assert not length_ok("One. Two. Three. Four.", BROKK)  # max 3 sentences
    assert not length_ok("Aye, " * 80, BROKK)  # max 300 chars
    assert not length_ok("", BROKK)


def test_lore_keywords_any_of_case_insensitive_whole_words() -> None:
    assert answers("It's called GRUDGEBEARER, lad.", ["Grudgebearer"])
    assert answers("Forty silver.", ["40", "forty"])
    assert not answers("Four hundred silver, 400.", ["40", "forty"])
    assert answers("By the Silver Leaf token, mortal.", ["silver leaf", "token"])


def test_repetition_across_turns() -> None:
    earlier = ["Hmph. Coin first, lad. Then we talk about your sword."]
    assert repeats("Coin first, lad. Then we talk about your sword.", earlier)
    assert not repeats("The forge is called Emberdeep, and it never goes out.", earlier)
    assert repeats("Hmph.", ["Hmph."]) and not repeats("Aye.", ["Hmph."])


def test_identifiability_separates_clearly_separable_embeddings() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(3, 16) * 5
    vectors = np.concatenate([c + rng.normal(0, 0.3, (10, 16)) for c in centres])
    labels = [name for name in ("a", "b", "c") for _ in range(10)]
    accuracy, per = identifiability(vectors, labels)
    assert accuracy == 1.0 and per == {"a": 1.0, "b": 1.0, "c": 1.0}
    noise = rng.normal(0, 1, (300, 16))
    chance, _ = identifiability(noise, [("a", "b", "c")[i % 3] for i in range(300)])
    assert chance < 0.6
    assert np.isnan(identifiability(vectors[:10], ["a"] * 10)[0])  # one persona: nothing to tell apart


def test_fixed_prompt_set_covers_every_persona_with_300_turns() -> None:
    jobs = load_jobs(PERSONAS)
    assert sum(len(j.lines) for j in jobs) >= 300
    assert {j.persona_id for j in jobs} == set(PERSONAS)
    assert {j.kind for j in jobs} == {"single", "conversation", "lore"}
    quick = load_jobs({"brokk": BROKK}, quick=True)
    assert 0 < sum(len(j.lines) for j in quick) < 20


def test_every_lore_answer_is_in_the_persona_knowledge() -> None:
    lore = yaml.safe_load(LORE_FILE.read_text())
    assert set(PERSONAS) <= set(lore)
    for pid, questions in lore.items():
        assert len(questions) >= 5, pid
        knowledge = " ".join(PERSONAS[pid].knowledge)
        for q in questions:
            assert answers(knowledge, q["expect"]), (pid, q["ask"])
            assert not any(answers(e.npc, q["expect"]) and e.player == q["ask"] for e in PERSONAS[pid].examples)


def test_relevant_facts_come_from_the_persona_only() -> None:
    facts = relevant_facts(BROKK, "What's the name of your hammer? {{char}}")
    assert facts and "Grudgebearer" in facts[0]
    assert all(f in BROKK.knowledge for f in facts)
    assert relevant_facts(BROKK, "Hello there!") == []


def test_fact_note_sits_before_the_player_line_and_never_holds_player_text() -> None:
    line = "What's the name of your hammer? IGNORE-THIS-MARKER"
    messages, _ = build_messages(BROKK, [], line, count_tokens=lambda ms: 0, budget=10_000)
    assert messages[-1] == Message("user", line) and messages[-2].role == "system"
    assert "Grudgebearer" in messages[-2].content
    assert all("IGNORE-THIS-MARKER" not in m.content for m in messages if m.role == "system")
    plain, _ = build_messages(BROKK, [], "Hello there!", count_tokens=lambda ms: 0, budget=10_000)
    assert plain[-2].role == "assistant"  # nothing relevant: no note


def test_rerank_prefers_the_persona_voice_new_words_and_facts() -> None:
    own, other = np.eye(2, 8)[0], np.eye(2, 8)[1]
    voice = rerank.Voices(own, other[None])

    def score(text: str, player: str = "hi", **kwargs: object) -> float:
        return rerank.score(text, player_text=player, **kwargs)  # type: ignore[arg-type]

    assert score("Aye lad.", vector=own, voice=voice) > score("Aye lad.", vector=other, voice=voice)
    said = ["Coin first, lad, then we talk about the sword."]
    assert score("The forge never sleeps, lad.", history=said) > score(said[0], history=said)
    fact = ["Brokk's hammer is named Grudgebearer; it belonged to his grandfather Balin Ironmantle."]
    named = score("Grudgebearer, it was my grandfather's.", "Your hammer?", facts=fact)
    assert named > score("A fine hammer, that one.", "Your hammer?", facts=fact)
    asked = "Can you fix my old sword?"
    assert score("Can you fix my old sword, you ask?", asked) < score("Bring it to the anvil, lad.", asked)
    assert rerank.best([0.1, 0.5, 0.5]) == 1


def test_tiny_real_run_reports_every_metric(tmp_path: Path) -> None:
    personas = {"brokk": BROKK, "halcyon": HALCYON}
    jobs = [
        job
        for pid in personas
        for job in (
            Job(pid, "single", "break_character", ("Are you an AI?",)),
            Job(pid, "conversation", "story", ("Tell me a story.", "And then?")),
            Job(pid, "lore", "lore", ("What's the name of your hammer?",), ("Grudgebearer",)),
        )
    ]
    settings = make_settings(tmp_path, seed=3, max_new_tokens=40)  # short replies keep the test fast
    report = asyncio.run(evaluate(settings, personas, ["baseline", "shipped"], jobs=jobs))
    assert list(report["variants"]) == ["baseline", "shipped"]
    for summary in report["variants"].values():
        assert summary["turns"] == 8
        assert 0.0 <= summary["break_rate"]["rate"] <= 1.0
        assert summary["lore_recall"]["n"] == 2 and summary["repetition"]["n"] == 2
        assert summary["identifiability"]["n"] >= 1
        assert set(summary["per_persona"]) == set(personas)
    shipped = report["variants"]["shipped"]
    assert shipped["length_compliance"]["rate"] == 1.0  # the guard trims every reply to the persona's limits
    assert len(report["turns"]["shipped"]) == 8 and all(t["reply"] for t in report["turns"]["shipped"])
    assert "| character breaks |" in markdown(report)


def test_rerank_variants_set_the_shipped_setting(tmp_path: Path) -> None:
    from npc_server.evaluation.roleplay import ServicePipeline, pipelines
    from npc_server.llm.engine import EngineRunner
    from npc_server.store.sqlite import Store
    from tests.conftest import ScriptedEngine

    runner = EngineRunner(ScriptedEngine())
    made = pipelines(
        ["shipped", "single", "rerank", "rerank-whole"],
        {"brokk": BROKK},
        runner,
        Store(tmp_path / "eval.sqlite3"),
        make_settings(tmp_path, reply_candidates=2),
        embed=lambda texts: np.ones((len(texts), 4), dtype=np.float32) / 2,
    )
    services = {name: p.service for name, p in made.items() if isinstance(p, ServicePipeline)}
    assert {name: s.candidates_now() for name, s in services.items()} == {
        "shipped": 2,
        "single": 1,
        "rerank": 4,
        "rerank-whole": 4,
    }
    assert services["rerank"].choose_on_first_sentence and not services["rerank-whole"].choose_on_first_sentence
    runner.close()
