"""Turns a persona, its example exchanges and the conversation so far into chat messages.

Player text only ever becomes the content of a `user` message. It is never formatted into the system
prompt and never passed through a template engine; persona text is trusted (it is the designer's).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from npc_server.llm.engine import Message
from npc_server.personas.schema import Persona

# The layout the server ships (docs/roleplay.md has what each choice measured).
FACTS = 3  # knowledge facts relevant to the player's line, repeated in a note just before it
REMIND = False  # that note also reminds the model who it is


@dataclass(frozen=True)
class Turn:
    """One stored line of a conversation."""

    role: str  # "player" or "npc"
    text: str


def system_prompt(persona: Persona) -> str:
    """The persona, written in the second person. It is the same every turn, so its KV is computed once."""
    p = persona
    lines = [
        f"You are {p.name}, {p.role}. {p.setting}",
        p.backstory,
        f"Personality: {', '.join(p.personality)}.",
        f"How you speak: {p.speaking_style.description}",
    ]
    if p.speaking_style.sample_phrases:
        lines.append("Phrases you use: " + " ".join(f'"{s}"' for s in p.speaking_style.sample_phrases))
    if p.knowledge:
        lines.append("What you know:\n" + "\n".join(f"- {fact}" for fact in p.knowledge))
    if p.goals:
        lines.append("What you want: " + " ".join(p.goals))
    who = "a machine" if p.is_machine else "a living person of your world"
    lines.append(
        f"Stay in character as {p.name}, {who}. Speak only as {p.name}, in the first person, "
        f"and never write the player's words. Answer in {_sentences(p.reply.max_sentences)}."
    )
    return "\n".join(lines)


def _sentences(n: int) -> str:
    return "one short sentence" if n == 1 else f"at most {n} short sentences"


_STOPWORD_TEXT = (
    "a an the and or but if of to in on at by for with from as is are was were be been am do does did done have "
    "has had i me my mine you your yours he him his she her it its we us our they them their this that these "
    "those there here what who whom whose which when where why how can could will would shall should may might "
    "must not no yes so very just about into over under up down out than then too any some all tell know say "
    "give get got let like want need much many more most well also"
)
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())


def content_words(text: str) -> set[str]:
    """Content words, lowercased, with a plural or possessive "s" dropped: "Dwarves drink" -> {dwarve, drink}."""
    words = re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", text.lower().replace("'s", ""))
    return {w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in words} - _STOPWORDS


def relevant_facts(persona: Persona, player_text: str, k: int = 3) -> list[str]:
    """Up to `k` of the persona's `knowledge` facts sharing the most (rarest) content words with the player's
    line, best first. Only persona text is returned: the player's words select facts, never become them."""
    if k <= 0 or not persona.knowledge:
        return []
    facts = [content_words(f) for f in persona.knowledge]
    asked = content_words(player_text)
    weight = {w: 1.0 + math.log(len(facts) / sum(w in f for f in facts)) for w in asked if any(w in f for f in facts)}
    scored = sorted(((sum(weight.get(w, 0.0) for w in f), -i) for i, f in enumerate(facts)), reverse=True)
    return [persona.knowledge[-i] for score, i in scored[:k] if score > 0]


def note(persona: Persona, facts: Sequence[str], *, remind: bool = True, situation: str = "") -> str:
    """A short system note placed just before the player's line, where a small model attends most: who it
    is, the facts this line is about, and `situation` (server-made text: how the player seems, how the NPC
    feels). What changes from turn to turn goes here, after everything whose KV is reused."""
    parts = [f"(You are {persona.name}. Stay in character.)"] if remind else []
    if facts:
        parts.append("Facts you may need: " + " ".join(facts))
    if situation:
        parts.append(situation)
    return "\n".join(parts)


def fixed_messages(persona: Persona) -> list[Message]:
    """The part of every prompt for this persona that never changes: the system prompt, then the example
    exchanges as earlier turns of the conversation."""
    head = [Message("system", system_prompt(persona))]
    for example in persona.examples:
        head += [Message("user", example.player), Message("assistant", example.npc)]
    return head


HISTORY_STRIDE = 8  # turns: where the kept history may start once older turns are dropped


def build_messages(
    persona: Persona,
    history: Sequence[Turn],
    player_text: str,
    *,
    count_tokens: Callable[[list[Message]], int],
    budget: int,
    situation: str = "",
    facts: int = FACTS,
    remind: bool = REMIND,
    relevant: Sequence[str] | None = None,
    first: int = 0,
) -> tuple[list[Message], int]:
    """Messages for the model, dropping the oldest history until they fit `budget` tokens.

    Returns the messages and how many history turns were kept. The persona and the player's new line
    always stay; example exchanges go before the real history, as earlier turns of the conversation.
    `first` is the conversation's index of `history[0]`. Once history has to be dropped, the kept part
    starts at a multiple of HISTORY_STRIDE turns of the conversation, so the start stays put for several
    turns and the prompt of the next turn begins with this one's, its KV already computed (a window that
    slid by one exchange every turn would change the prompt right after the examples, every turn).
    A system note goes just before the player's line: up to `facts` knowledge facts relevant to it
    (`relevant`, when the caller chose them, else `relevant_facts`), a reminder of who the NPC is when
    `remind`, and the `situation`. The system prompt and examples stay the same every turn, so their KV is
    reused.
    """
    head = fixed_messages(persona)
    chosen = list(relevant[:facts]) if relevant is not None else relevant_facts(persona, player_text, facts)
    late = note(persona, chosen, remind=remind, situation=situation)
    tail = ([Message("system", late)] if late else []) + [Message("user", player_text)]
    past = [Message("user" if t.role == "player" else "assistant", t.text) for t in history]
    # Keep whole exchanges: never start the kept history on an NPC line.
    for aligned in (True, False):  # a start on the stride if any fits, else the most history that fits
        for start in range(len(past)):
            if past[start].role == "assistant":
                continue
            if aligned and (start > 0 or first > 0) and (first + start) % HISTORY_STRIDE:
                continue
            messages = head + past[start:] + tail
            if count_tokens(messages) <= budget:
                return messages, len(past) - start
    messages = head + tail
    if count_tokens(messages) > budget:  # drop examples before giving up on the persona
        messages = [head[0], *tail]
    return messages, 0
