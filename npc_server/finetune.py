"""`npc-server finetune PERSONA_ID`: a per-persona LoRA adapter trained with peft on the CPU.

The training set is made from the persona file alone, without a model: its example exchanges, its
greeting as the answer to a few opening lines, and three questions per `knowledge` fact, each answered
with the fact in the first person, in the persona's voice. Each prompt is laid out as the server lays out
a first turn (`build_messages`): system prompt, example exchanges, the note with the facts relevant to
the line and how the player seems, then the line. The adapter so learns to answer from the facts the
note puts in front of it, the way it will be asked, and not only to recite them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from npc_server.dialogue.mood import NpcMood, affect_note
from npc_server.fusion.model import FusedAffect
from npc_server.llm.engine import Message
from npc_server.personas.prompt import build_messages, fixed_messages, system_prompt
from npc_server.personas.schema import Persona
from npc_server.settings import Settings

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OPENINGS = ("Hello.", "Hi there.", "Good day to you.")
QUESTIONS_PER_FACT = 3
PLAYER_MOODS = ("", "neutral", "happy")  # how the player seems in the note: not read (no line), calm, happy
_TITLE_TEXT = "doctor dr lady lord sir captain master mistress mr mrs miss madam dame king queen"
TITLES = frozenset(_TITLE_TEXT.split())
_AUX = {"is": "am", "are": "am", "was": "was", "has": "have", "does": "do", "will": "will", "can": "can"}
_PREPOSITIONS = {"to", "for", "with", "by", "from", "of", "at", "on", "about", "than"}
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9.])")
_HE = {"he": "I", "his": "my", "him": "me", "himself": "myself"}
_SHE = {"she": "I", "hers": "mine", "herself": "myself"}

Pair = tuple[list[Message], str]


def adapter_dir(personas_dir: Path, persona_id: str) -> Path:
    """Where a persona's adapter lives: beside its file, in `<personas_dir>/adapters/<persona_id>/`."""
    return personas_dir / "adapters" / persona_id


def fingerprint(persona: Persona) -> str:
    """A digest of everything the persona file sets: an adapter trained on another version is stale. Fields left
    at their defaults are out of it, so a field added to the schema later leaves existing adapters current."""
    return hashlib.sha256(persona.model_dump_json(exclude_defaults=True).encode()).hexdigest()


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def training_examples(persona: Persona) -> list[Pair]:
    """(prompt messages, NPC reply) pairs: the persona's examples, its greeting, and three per lore fact, each
    prompt laid out as the server lays out a first turn."""
    lines = [(e.player, e.npc) for e in persona.examples]
    lines += [(opening, persona.greeting) for opening in OPENINGS]
    for i, fact in enumerate(persona.knowledge):
        lines += [_lore(persona, fact, i * QUESTIONS_PER_FACT + k) for k in range(QUESTIONS_PER_FACT)]
    return [(_prompt(persona, player, i), npc) for i, (player, npc) in enumerate(lines)]


def _prompt(persona: Persona, player: str, i: int) -> list[Message]:
    """The server's prompt for `player`'s line opening a conversation, its note made by the server's own
    `affect_note` (the player's mood read from one modality, the NPC at rest)."""
    seems, situation = PLAYER_MOODS[i % len(PLAYER_MOODS)], ""
    if seems:
        affect = FusedAffect({seems: 1.0}, seems, 0.0, 0.0, confidence=0.5, modalities=["text"], method="text")
        situation = affect_note(affect, NpcMood.resting(persona.temperament))
    return build_messages(persona, [], player, count_tokens=lambda _: 0, budget=0, situation=situation)[0]


def _given_name(persona: Persona) -> str:
    words = [w for w in persona.name.split() if w.lower().strip(".") not in TITLES]
    return words[0] if words else persona.name


def _pronouns(persona: Persona) -> dict[str, str]:
    """The persona's own third-person pronouns (from its backstory) mapped to the first person."""
    words = re.findall(r"[a-z]+", persona.backstory.lower())
    he, she = sum(w in _HE for w in words), sum(w in ("she", "her", "hers", "herself") for w in words)
    return _HE if he > she else _SHE if she > he else {}


def first_person(persona: Persona, fact: str) -> str:
    """`fact` as the persona would say it: "Brokk's hammer ... his grandfather" -> "My hammer ... my
    grandfather". Facts that neither name the persona nor start with its pronoun are kept as they are."""
    name, given, mine = re.escape(persona.name), re.escape(_given_name(persona)), _pronouns(persona)
    first = fact.split(maxsplit=1)[0].lower()
    if not re.search(rf"\b({name}|{given})\b", fact) and first not in mine and not (mine is _SHE and first == "her"):
        return fact
    text = re.sub(rf"\b(?:{name}|{given})'s\b", "my", fact)
    text = re.sub(rf"\b(?:{name}|{given}) stands for\b", "my name stands for", text)

    def subject(m: re.Match[str]) -> str:
        before, after = text[: m.start()].rstrip(), text[m.end() :].split(maxsplit=1)
        nxt = re.sub(r"\W.*", "", after[0]) if after else ""
        if before.split()[-1:] and before.split()[-1].lower() in _PREPOSITIONS:
            return "me"
        clause = not before or before[-1] in ",;:" or before.split()[-1] in ("who", "which", "that")
        verb = nxt in _AUX or (nxt.islower() and (nxt.endswith("ed") or nxt.endswith("s") or nxt.endswith("ly")))
        return "I" if clause or verb else "me"

    text = re.sub(rf"\b(?:{name}|{given})\b", subject, text)
    if mine is _SHE:  # "her" is "me" before a preposition or at the end of a clause, else "my"
        text = re.sub(r"\b[Hh]er\b(?=\s+(?:to|and|in|for|with|at|from|by|on)\b|[.,;:!?]|$)", "me", text)
        text = re.sub(r"\b[Hh]er\b", "my", text)
    if mine:
        text = re.sub(rf"\b(?:{'|'.join(mine)})\b", lambda m: mine[m[0].lower()], text, flags=re.IGNORECASE)
    text = re.sub(r"\bI (\w+ly )?(\w+)\b", lambda m: "I " + (m[1] or "") + _base_verb(m[2]), text)
    return text[0].upper() + text[1:]


def _base_verb(word: str) -> str:
    """The first-person form of a third-person verb: "is" -> "am", "carries" -> "carry"."""
    if word in _AUX:
        return _AUX[word]
    if not word.islower() or not word.endswith("s") or word.endswith("ss") or len(word) < 3:
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "oes")):
        return word[:-2]
    return word[:-1]


_SUBJECT_VERB = r"(is|are|was|were|has|have|had|may|will|can|costs?|comes?|lies|stands?|sells?|opens|runs|carries)"
_PROPER = r"[A-Z][\w-]*(?:'s\s+[A-Z][\w-]*|\s+&\s+[A-Z][\w-]*|\s+(?:of\s+(?:the\s+)?)?[A-Z][\w-]*)*"


def question(persona: Persona, fact: str, i: int) -> str:
    """A player's question about `fact`, keyed on its subject: "What's your hammer called?"."""
    given, mine = _given_name(persona), _pronouns(persona)
    own = {f"{given}'s", *(w.capitalize() for w, me in mine.items() if me == "my"), *(["Her"] if mine is _SHE else [])}
    m = re.match(rf"((?:[\w'-]+\s+){{0,4}}?[\w-]+?)\s+{_SUBJECT_VERB}\b", fact)
    first = fact.split(maxsplit=1)[0]
    if m and first not in (given, "He", "She") and not re.search(r",|\b(?:that|who|which|when)\b", m[1]):
        thing, words = m[1], m[1].split()
        if first in own:
            thing = "your" + thing[len(first) :]
        elif (
            first in ("The", "A", "An")
            or (words[1:] and words[1].islower())
            or (not words[1:] and re.search(rf"\b{re.escape(first.lower())}\b", system_prompt(persona)))
        ):  # a common word, capitalised only to start the sentence
            thing = first.lower() + thing[len(first) :]
        thing = re.sub(rf"\b(?:{'|'.join(w for w, me in mine.items() if me == 'my') or '_'})\b", "your", thing)
        if fact[m.end() :].lstrip().startswith(("named", "called")):
            return f"What's {thing} called?"
        if m[2].startswith("cost"):
            return f"How much is {thing}?"
        return (f"Tell me about {thing}.", f"What can you tell me about {thing}?", f"What about {thing}?")[i % 3]
    skip = {given, *persona.name.split(), "The", "A", "An", "His", "Her", "He", "She", "In"}
    nouns = [re.sub(r"^The ", "the ", n) for n in re.findall(_PROPER, fact) if n not in skip]
    nouns = [n for n in nouns if not (n.isupper() and len(n) <= 3)] or nouns
    if nouns:
        return (f"What do you know of {nouns[0]}?", f"Tell me about {nouns[0]}.", f"Ever heard of {nouns[0]}?")[i % 3]
    return ("Tell me about yourself.", "What should I know about you?", "Tell me something about you.")[i % 3]


def _lore(persona: Persona, fact: str, i: int) -> tuple[str, str]:
    """One lore exchange: a question about `fact`, and the fact in the first person in the persona's voice."""
    most = persona.reply.max_sentences
    answer = sentences(first_person(persona, fact))[:most]
    phrases = [p for p in persona.speaking_style.sample_phrases if len(sentences(p)) + len(answer) <= most]
    if phrases:
        phrase = sentences(phrases[i % len(phrases)])
        answer = phrase + answer if i % 2 == 0 else answer + phrase
    return question(persona, fact, i), " ".join(answer)


def _encode(tokenizer: Any, head: list[Message], pairs: list[Pair]) -> tuple[list[int], list[tuple[list[int], int]]]:
    """The token ids of the turns all prompts start with (`head`), and for each pair the ids after them with
    the index where the reply starts."""

    def ids(messages: list[Message], generation: bool) -> list[int]:
        chat = [{"role": m.role, "content": m.content} for m in messages]
        out: Any = tokenizer.apply_chat_template(chat, add_generation_prompt=generation, tokenize=True)
        return [int(i) for i in (out["input_ids"] if hasattr(out, "keys") else out)]

    prefix, items = ids(head, False), []
    for prompt, reply in pairs:
        asked, full = ids(prompt, True), ids([*prompt, Message("assistant", reply)], False)
        if prompt[: len(head)] != head or full[: len(asked)] != asked or asked[: len(prefix)] != prefix:
            raise RuntimeError("the chat template does not render prompts as prefixes of their replies")
        items.append((full[len(prefix) :], len(asked) - len(prefix)))
    return prefix, items


def finetune(
    persona: Persona,
    model_folder: Path,
    out_dir: Path,
    *,
    epochs: int = 3,
    rank: int = 8,
    alpha: int = 16,
    lr: float = 2e-4,
    batch_size: int = 4,
    seed: int = 1234,
    threads: int = 2,
    limit: int | None = None,
    progress: Callable[[str], object] = print,
) -> dict[str, Any]:
    """Train a LoRA adapter for `persona` on the CPU in float32 and save it (with training.json) in `out_dir`.

    The loss is the mean over examples of the mean over reply tokens (the end-of-turn token included).
    Every prompt starts with the same turns (system prompt and example exchanges), so a batch computes them
    once and its examples attend to them (the same sums as one sequence each, a fraction of the work).
    `limit` caps the examples (tests).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started, old_threads = time.monotonic(), torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    base = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGET_MODULES, task_type="CAUSAL_LM")
    model: Any = get_peft_model(base, config)
    prefix, data = _encode(tokenizer, fixed_messages(persona), training_examples(persona)[:limit])
    pad = tokenizer.pad_token_id or 0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)

    def loss_of(batch: list[tuple[list[int], int]]) -> Any:
        cache = model(input_ids=torch.tensor([prefix]), use_cache=True, logits_to_keep=1).cache
        cache.batch_repeat_interleave(len(batch))
        width = max(len(seq) for seq, _ in batch)
        ids = torch.tensor([seq + [pad] * (width - len(seq)) for seq, _ in batch])
        labels = torch.tensor([[-100] * k + seq[k:] + [-100] * (width - len(seq)) for seq, k in batch])[:, 1:]
        logits = model(input_ids=ids, cache=cache, use_cache=True).logits[:, :-1]
        token_losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        return (token_losses.sum(1) / (labels != -100).sum(1)).mean()

    def mean_loss() -> float:
        model.eval()
        with torch.no_grad():
            chunks = [data[i : i + 8] for i in range(0, len(data), 8)]
            return sum(float(loss_of(chunk)) * len(chunk) for chunk in chunks) / len(data)

    try:
        initial = mean_loss()
        progress(f"{persona.id}: {len(data)} examples, initial loss {initial:.3f}")
        shuffle, epoch_losses = torch.Generator().manual_seed(seed), []
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(data), generator=shuffle).tolist()
            total = 0.0
            for i in range(0, len(order), batch_size):
                batch = [data[j] for j in order[i : i + batch_size]]
                loss = loss_of(batch)
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                total += loss.item() * len(batch)
            epoch_losses.append(round(total / len(data), 4))
            progress(f"epoch {epoch + 1}/{epochs}: loss {epoch_losses[-1]:.3f} ({time.monotonic() - started:.0f} s)")
        final = mean_loss()
    finally:
        torch.set_num_threads(old_threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    halve(out_dir)
    report = {"persona": persona.id, "examples": len(data), "epochs": epochs, "rank": rank, "alpha": alpha, "lr": lr}
    report |= {"batch_size": batch_size, "seed": seed, "initial_loss": round(initial, 4), "final_loss": round(final, 4)}
    report |= {"epoch_losses": epoch_losses, "seconds": round(time.monotonic() - started, 1)}
    report |= {"base_model": model_folder.name, "persona_sha256": fingerprint(persona)}
    (out_dir / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    progress(f"final loss {final:.3f}; adapter saved in {out_dir} ({report['seconds']} s)")
    return report


def halve(out_dir: Path) -> None:
    """Store the adapter's weights in bf16 (half the size; the server computes with them in float32) and drop
    the model card peft writes beside them."""
    import torch
    from safetensors.torch import load_file, save_file

    path = out_dir / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(path)).items()}, str(path), metadata={"format": "pt"})
    (out_dir / "README.md").unlink(missing_ok=True)


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("finetune", help="train a LoRA adapter for one persona on the CPU")
    parser.add_argument("persona_id")
    parser.add_argument("--epochs", type=int, default=3, help="passes over the examples (default 3)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank; alpha is twice it (default 8)")
    parser.add_argument("--out", type=Path, help="adapter folder (default <personas dir>/adapters/<persona id>)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from npc_server.llm.weights import resolve_model
    from npc_server.personas.loader import load_personas

    personas, _ = load_personas(settings.personas_dir)
    persona = personas.get(args.persona_id)
    if persona is None:
        known = ", ".join(sorted(personas)) or "none"
        print(f"npc-server finetune: unknown persona {args.persona_id!r} (known: {known})", file=sys.stderr)
        return 2
    folder = resolve_model(settings.model, settings.resolved_cache_dir)
    out = args.out or adapter_dir(settings.personas_dir, persona.id)
    finetune(persona, folder, out, epochs=args.epochs, rank=args.rank, alpha=2 * args.rank)
    return 0
