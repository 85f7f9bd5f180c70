"""Choosing the best of several sampled replies: pure scoring, no model calls.

Each candidate has already passed the guard (`ReplyFilter`). The score prefers, in order of weight:
- the persona's voice: cosine similarity of the reply's sentence embedding to the persona's centroid, minus
  its best similarity to any other persona's centroid (a reply another NPC could have said scores low);
- the persona's facts: content words shared with the knowledge facts relevant to the player's line;
- something new: a reply that mostly repeats the NPC's earlier lines, or parrots the player's, loses;
- a whole reply: one the guard cut short after a character break loses a little, and so does a bare word
  (only when it is the whole reply: the server scores first sentences, and "Hmph." is a fine way to start).

Centroids come from text the designer wrote in the persona's voice: example replies, sample phrases,
greeting and fallback lines (`voice_lines`), embedded once per persona with the same embedder as the replies.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from npc_server.personas.prompt import content_words
from npc_server.personas.schema import Persona

W_VOICE = 1.0
W_FACTS = 0.3
W_REPEAT = 0.6
W_ECHO = 0.4
W_CUT = 0.15
W_SHORT = 0.2
SHORT_WORDS = 4


@dataclass(frozen=True)
class Voices:
    """Unit-length voice centroids: this persona's, and every other loaded persona's ([K, D], maybe K=0)."""

    own: np.ndarray
    others: np.ndarray


def voice_lines(persona: Persona) -> list[str]:
    return [
        *(e.npc for e in persona.examples),
        *persona.speaking_style.sample_phrases,
        persona.greeting,
        *persona.fallback_lines,
    ]


def voices(personas: Mapping[str, Persona], embed: Callable[[list[str]], np.ndarray]) -> dict[str, Voices]:
    """Every persona's voice centroid against the others' (call once at start-up)."""
    ids = list(personas)
    centroids = []
    for pid in ids:
        c = embed(voice_lines(personas[pid])).mean(axis=0)
        centroids.append(c / max(float(np.linalg.norm(c)), 1e-9))
    matrix = np.stack(centroids) if centroids else np.zeros((0, 0), dtype=np.float32)
    return {pid: Voices(matrix[i], np.delete(matrix, i, axis=0)) for i, pid in enumerate(ids)}


def _trigrams(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}


def _overlap(text: str, earlier: Sequence[str]) -> float:
    """Share of the text's word 3-grams found in `earlier` (0 when it has none)."""
    grams = _trigrams(text)
    if not grams or not earlier:
        return 0.0
    seen = set().union(*(_trigrams(e) for e in earlier))
    return len(grams & seen) / len(grams)


def voice_score(vector: np.ndarray, v: Voices) -> float:
    own = float(vector @ v.own)
    return own - float((v.others @ vector).max()) if len(v.others) else own


def score(
    text: str,
    *,
    player_text: str,
    facts: Sequence[str] = (),
    history: Sequence[str] = (),
    vector: np.ndarray | None = None,
    voice: Voices | None = None,
    cut: bool = False,
    complete: bool = True,
) -> float:
    """Higher is better. `history` is what the NPC said earlier in the conversation, `facts` the knowledge
    facts relevant to the player's line, `vector` the reply's unit embedding, `cut` whether the guard cut
    the reply short, `complete` whether `text` is the whole reply (else its first sentences)."""
    total = 0.0
    if vector is not None and voice is not None:
        total += W_VOICE * voice_score(vector, voice)
    if facts:
        wanted = set().union(*(content_words(f) for f in facts)) - content_words(player_text)
        total += W_FACTS * min(len(content_words(text) & wanted), 3) / 3
    total -= W_REPEAT * _overlap(text, history)
    total -= W_ECHO * _overlap(text, [player_text])
    total -= W_CUT * cut
    total -= W_SHORT * (complete and len(text.split()) < SHORT_WORDS)
    return total


def best(scores: Sequence[float]) -> int:
    """Index of the best score; the earliest wins a tie (the first candidate is the plain single sample)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))
