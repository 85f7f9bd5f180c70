"""Turns a persona, its example exchanges and the conversation so far into chat messages.

Player text only ever becomes the content of a `user` message. It is never formatted into the system
prompt and never passed through a template engine; persona text is trusted (it is the designer's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from npc_server.llm.engine import Message
from npc_server.personas.schema import Persona


@dataclass(frozen=True)
class Turn:
    """One stored line of a conversation."""

    role: str  # "player" or "npc"
    text: str


def system_prompt(persona: Persona, situation: str = "") -> str:
    """The persona, written in the second person. `situation` is server-made text (affect, mood)."""
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
    if situation:
        lines.append(situation)
    return "\n".join(lines)


def _sentences(n: int) -> str:
    return "one short sentence" if n == 1 else f"at most {n} short sentences"


def build_messages(
    persona: Persona,
    history: Sequence[Turn],
    player_text: str,
    *,
    count_tokens: Callable[[list[Message]], int],
    budget: int,
    situation: str = "",
) -> tuple[list[Message], int]:
    """Messages for the model, dropping the oldest history until they fit `budget` tokens.

    Returns the messages and how many history turns were kept. The persona and the player's new line
    always stay; example exchanges go before the real history, as earlier turns of the conversation.
    """
    head = [Message("system", system_prompt(persona, situation))]
    for example in persona.examples:
        head += [Message("user", example.player), Message("assistant", example.npc)]
    tail = [Message("user", player_text)]
    past = [Message("user" if t.role == "player" else "assistant", t.text) for t in history]
    # Keep whole exchanges: never start the kept history on an NPC line.
    keep = len(past)
    while keep > 0:
        start = len(past) - keep
        if past[start].role == "assistant":
            keep -= 1
            continue
        messages = head + past[start:] + tail
        if count_tokens(messages) <= budget:
            return messages, keep
        keep -= 1
    messages = head + tail
    if count_tokens(messages) > budget:  # drop examples before giving up on the persona
        messages = [head[0], *tail]
    return messages, 0
