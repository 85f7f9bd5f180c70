"""`npc-server finetune`: the training set made from a persona file, and one short real LoRA training run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from npc_server.cli import main
from npc_server.finetune import (
    OPENINGS,
    QUESTIONS_PER_FACT,
    TITLES,
    adapter_dir,
    finetune,
    fingerprint,
    sentences,
    training_examples,
)
from npc_server.llm.weights import resolve_model
from npc_server.personas.loader import load_personas
from npc_server.personas.prompt import fixed_messages, system_prompt
from npc_server.personas.schema import Persona
from tests.conftest import MODEL_CACHE

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "personas"
PERSONAS, _ = load_personas(SHIPPED_DIR)
WHOLE_SENTENCE = re.compile(r"[.!?…][\"')\]]*$")


def key_words(persona: Persona, fact: str) -> set[str]:
    """Numbers and proper nouns of a fact (not the persona's own name), else its long words."""
    words, skip = (
        re.findall(r"[\w'-]+", fact),
        {*persona.name.split(), "The", "A", "An", "His", "Her", "He", "She", "In"},
    )
    keys = {w for w in words if w[0].isupper() and w.removesuffix("'s") not in skip}
    keys |= set(re.findall(r"\d[\d,.-]*\d|\d", fact))
    return keys or {w for w in words if len(w) >= 8 and w.islower()}


def lore_answer(persona: Persona, fact: str) -> str | None:
    keys, written = key_words(persona, fact), {persona.greeting, *(e.npc for e in persona.examples)}
    assert keys, fact
    found = [r for _, r in training_examples(persona) if r not in written and all(k in r for k in keys)]
    return found[0] if found else None


@pytest.mark.parametrize("persona_id", sorted(PERSONAS))
def test_training_examples_cover_examples_greeting_and_lore(persona_id: str) -> None:
    persona = PERSONAS[persona_id]
    pairs = training_examples(persona)
    assert len(pairs) >= len(persona.examples) + len(persona.knowledge)
    replies = [reply for _, reply in pairs]
    assert persona.greeting in replies
    assert all(e.npc in replies for e in persona.examples)
    head = fixed_messages(persona)
    for messages, reply in pairs:
        # laid out as the server lays out a first turn: system prompt, examples, a note (when it has something
        # to say), the player's line
        assert messages[: len(head)] == head and messages[0].content == system_prompt(persona)
        assert [m.role for m in messages[len(head) :]] in (["system", "user"], ["user"])
        player = messages[-1].content
        assert player.strip() and reply.strip()
        assert player not in reply
        assert WHOLE_SENTENCE.search(reply), reply
        assert 1 <= len(sentences(reply)) <= persona.reply.max_sentences, reply


@pytest.mark.parametrize("persona_id", sorted(PERSONAS))
def test_lore_questions_find_their_fact_in_the_note(persona_id: str) -> None:
    """The adapter learns to answer from the facts the server's note puts before the line: most of the lore
    questions (asked three ways per fact) must bring their own fact into that note."""
    persona = PERSONAS[persona_id]
    lore = training_examples(persona)[len(persona.examples) + len(OPENINGS) :]
    assert len(lore) == QUESTIONS_PER_FACT * len(persona.knowledge)
    found = [persona.knowledge[i // QUESTIONS_PER_FACT] in messages[-2].content for i, (messages, _) in enumerate(lore)]
    assert sum(found) >= 0.9 * len(found)


@pytest.mark.parametrize("persona_id", sorted(PERSONAS))
def test_lore_answers_keep_the_facts_in_the_first_person(persona_id: str) -> None:
    persona = PERSONAS[persona_id]
    given = next(w for w in persona.name.split() if w.lower() not in TITLES)
    phrases = persona.speaking_style.sample_phrases
    for fact in persona.knowledge:
        answer = lore_answer(persona, fact)
        assert answer is not None, f"no answer keeps the numbers and names of: {fact}"
        if given in fact:  # the persona speaks of itself as "I" or "my"
            assert given not in answer and re.search(r"\b(I|my|My|me)\b", answer), answer
    lore = [lore_answer(persona, fact) or "" for fact in persona.knowledge]
    assert sum(any(p in answer for p in phrases) for answer in lore) >= len(lore) // 2  # in the persona's voice


def test_adapters_live_beside_the_persona_files() -> None:
    assert adapter_dir(SHIPPED_DIR, "brokk") == SHIPPED_DIR / "adapters" / "brokk"


@pytest.mark.parametrize("persona_id", sorted(PERSONAS))
def test_every_shipped_persona_has_a_current_adapter(persona_id: str) -> None:
    """The server skips an adapter trained on another version of its persona file: a shipped one must match."""
    trained = json.loads((adapter_dir(SHIPPED_DIR, persona_id) / "training.json").read_text())
    assert trained["persona_sha256"] == fingerprint(PERSONAS[persona_id])


def test_a_field_left_at_its_default_is_not_part_of_the_fingerprint() -> None:
    brokk = PERSONAS["brokk"]
    said = brokk.model_copy(update={"generation": brokk.generation.model_copy(update={"banned_phrases": ["okay"]})})
    assert fingerprint(said) != fingerprint(brokk)
    unset = Persona.model_validate(brokk.model_dump(exclude_defaults=True))
    assert fingerprint(unset) == fingerprint(brokk)


def test_unknown_persona_is_an_error_naming_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["finetune", "nobody-here"]) == 2
    err = capsys.readouterr().err
    assert "nobody-here" in err and "brokk" in err


def test_training_saves_a_lora_adapter_that_learned(tmp_path: Path) -> None:
    folder = resolve_model("smollm2", MODEL_CACHE)
    out = tmp_path / "brokk"
    report = finetune(PERSONAS["brokk"], folder, out, epochs=1, limit=4, threads=1, progress=lambda _: None)
    assert report["examples"] == 4 and report["persona"] == "brokk" and report["base_model"] == folder.name
    assert report["final_loss"] < report["initial_loss"]
    assert json.loads((out / "training.json").read_text()) == report
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "training.json"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16
    with safe_open(out / "adapter_model.safetensors", "pt") as tensors:
        keys = set(tensors.keys())
        assert len(keys) == 30 * 7 * 2  # 30 layers, 7 projections, A and B
        pattern = r"base_model\.model\.model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.lora_[AB]\.weight"
        assert all(re.fullmatch(pattern, k) for k in keys)
        q_a = tensors.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        q_b = tensors.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
        assert q_a.shape == (8, 576) and q_b.shape == (576, 8) and q_a.dtype == q_b.dtype == torch.bfloat16
        assert float(q_b.abs().sum()) > 0  # LoRA B starts at zero: training moved it
