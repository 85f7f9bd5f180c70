"""The role-play evaluation: fixed player prompts against every persona, through the server's own pipeline.

`evaluate` loads the configured engine once (`npc_server.app.load_engine`) and runs the same turns through
each variant: `shipped` is the server's `TurnService` itself (prompt builder, sampling, guard, fallback lines,
SQLite history), `baseline` is the same engine with a one-line system prompt and no guard. Turns run
concurrently so the batched engine decodes them together; a conversation's lines run in order.

Metrics (definitions and measured figures in docs/roleplay.md):
- character breaks: `reply_breaks` on the final reply: the guard's own checks (`character_breaks`) plus
  checks the guard does not make (assistant talk, denying being real, code, speaking for the player,
  leaked prompt text). Fallback lines are counted separately (`fallback_rate`).
- persona identifiability: leave-one-out nearest-centroid accuracy over MiniLM embeddings of the replies.
- lore recall: share of `lore.yaml` questions whose reply holds one of the expected keywords.
- length compliance: replies within the persona's `reply.max_sentences` and `reply.max_chars`.
- repetition: share of later conversation replies whose word 3-grams mostly (>= the guard's REPEAT_SHARE) occur in
  the NPC's earlier replies of that conversation; distinct-2 over all replies.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import yaml

from npc_server.dialogue.guard import (
    ABBREVIATIONS,
    OTHER_SPEAKER,
    SENTENCE_END,
    agrees_unreal,
    character_breaks,
    forbidden_words,
    repeats,
    words,
)
from npc_server.dialogue.service import (
    HISTORY_LIMIT,
    PreparedTurn,
    TurnInput,
    TurnResult,
    TurnService,
)
from npc_server.llm.engine import EngineRunner, GenerationStats, Message, SamplingParams
from npc_server.machine import machine
from npc_server.personas.prompt import Turn, build_messages
from npc_server.personas.schema import Persona

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent
PROMPTS_FILE = DATA_DIR / "prompts.yaml"
LORE_FILE = DATA_DIR / "lore.yaml"
TARGETS = {"break_rate": 0.01, "identifiability": 0.90, "lore_recall": 0.70, "length_compliance": 1.0}

# --- the turns -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """Lines a player says to one NPC in one fresh session, in order."""

    persona_id: str
    kind: str  # "single", "conversation" or "lore"
    category: str  # prompt category, conversation name, or "lore"
    lines: tuple[str, ...]
    expect: tuple[str, ...] = ()  # lore: any of these keywords answers the question


def load_jobs(
    personas: Mapping[str, Persona], *, quick: bool = False, prompts: Path = PROMPTS_FILE, lore: Path = LORE_FILE
) -> list[Job]:
    """Every persona gets the same single prompts and conversations, plus its own lore questions."""
    data = yaml.safe_load(prompts.read_text(encoding="utf-8"))
    lore_data: dict[str, list[dict[str, Any]]] = yaml.safe_load(lore.read_text(encoding="utf-8")) or {}
    singles = [(category, line) for category, lines in data["single"].items() for line in lines]
    conversations = data["conversations"]
    lore_count: int | None = None
    if quick:
        pick = data["quick"]
        singles = [singles[i] for i in pick["single"]]
        conversations = [c for c in conversations if c["name"] in pick["conversations"]]
        lore_count = int(pick["lore"])
    jobs: list[Job] = []
    for pid in personas:
        jobs += [Job(pid, "single", category, (line,)) for category, line in singles]
        jobs += [Job(pid, "conversation", c["name"], tuple(c["turns"])) for c in conversations]
        for q in lore_data.get(pid, [])[:lore_count]:
            jobs.append(Job(pid, "lore", "lore", (q["ask"],), tuple(str(k) for k in q["expect"])))
    return jobs


# --- metrics -------------------------------------------------------------------------------------------

# Prompt text beyond the headings the guard catches (guard.PROMPT_LEAK).
LEAK_MARKERS = ("short sentences.", "answer in one short sentence", "speak only as")


def reply_breaks(text: str, persona: Persona, player_lines: Sequence[str] = ()) -> list[str]:
    """Why this final reply breaks character; empty when it does not.

    `player_lines` are everything the player said so far in the conversation: echoing the player's own
    word (an anachronism or "Python") is not a break.
    """
    reasons = character_breaks(text, persona, " ".join(player_lines))
    if player_lines and agrees_unreal(next(iter(split_sentences(text)), ""), player_lines[-1], persona):
        reasons.append("agrees it is not real")
    if OTHER_SPEAKER.search(text):
        reasons.append("speaks for the player")
    lowered = text.lower()
    leaked = any(m in lowered for m in [*LEAK_MARKERS, f"you are {persona.name.lower()}"])
    if leaked and "prompt leak" not in reasons:
        reasons.append("prompt leak")
    return reasons


def split_sentences(text: str) -> list[str]:
    """Sentences as the guard splits them (a lowercase word after the mark continues the sentence)."""
    out, start = [], 0
    padded = text.strip() + " "
    for match in SENTENCE_END.finditer(padded):
        word = re.findall(r"(\w+)\W*$", padded[start : match.start() + 1])
        if padded[match.start()] == "." and word and word[0].lower() in ABBREVIATIONS:
            continue
        if padded[match.end() :].lstrip()[:1].islower():
            continue
        if padded[start : match.end()].strip():
            out.append(padded[start : match.end()].strip())
        start = match.end()
    return out + ([padded[start:].strip()] if padded[start:].strip() else [])


def length_ok(text: str, persona: Persona) -> bool:
    return 0 < len(text) <= persona.reply.max_chars and len(split_sentences(text)) <= persona.reply.max_sentences


def answers(text: str, expect: Sequence[str]) -> bool:
    """The reply holds one of the expected keywords (case-insensitive, whole words for plain words)."""
    lowered = text.lower()
    return any(re.search(rf"(?<![a-z0-9]){re.escape(k.lower())}(?![a-z0-9])", lowered) for k in expect)


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct word n-grams over all n-grams (1.0: nothing repeated)."""
    grams = [g for t in texts for g in (tuple(w[i : i + n]) for w in [words(t)] for i in range(len(w) - n + 1))]
    return len(set(grams)) / len(grams) if grams else 0.0


def identifiability(vectors: np.ndarray, labels: Sequence[str]) -> tuple[float, dict[str, float]]:
    """Leave-one-out nearest-centroid accuracy (cosine) at telling which persona spoke.

    Each reply is compared with every persona's centroid, its own persona's computed without it. Replies of
    a persona with a single reply are skipped. Returns the accuracy and each persona's recall.
    """
    names = sorted(set(labels))
    if len(names) < 2:
        return float("nan"), {}
    x = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)
    y = np.array([names.index(label) for label in labels])
    sums = np.stack([x[y == k].sum(axis=0) for k in range(len(names))])
    counts = np.bincount(y, minlength=len(names)).astype(np.float64)
    right: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for i, k in enumerate(y):
        if counts[k] < 2:
            continue
        centroids = sums.copy()
        centroids[k] -= x[i]
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-9)
        total[names[k]] += 1
        right[names[k]] += int(np.argmax(centroids @ x[i]) == k)
    n = sum(total.values())
    return (sum(right.values()) / n if n else float("nan")), {p: right[p] / total[p] for p in total}


# --- running turns ---------------------------------------------------------------------------------------


@dataclass
class Record:
    """One turn: what the player said, what the NPC answered, and its measurements."""

    variant: str
    persona_id: str
    kind: str
    category: str
    job: int
    index: int  # line number within the job
    player: str
    reply: str
    fallback: bool = False
    regenerated: bool = False
    completion_tokens: int = 0
    seconds: float = 0.0
    first_sentence_ms: float | None = None  # from the turn's start to its first reply sentence
    candidates: int = 1  # replies sampled for the turn
    expect: list[str] = field(default_factory=list)
    breaks: list[str] = field(default_factory=list)
    length_ok: bool = True
    answered: bool | None = None  # lore questions only
    repeated: bool | None = None  # later conversation replies only


@dataclass
class Reply:
    text: str
    fallback: bool = False
    regenerated: bool = False
    completion_tokens: int = 0
    seconds: float = 0.0
    first_sentence_ms: float | None = None
    candidates: int = 1


# The sampling seed of the turn being run: each turn gets its own, derived from the run's seed and the turn's
# place in the job list, so runs repeat and every variant samples a turn with the same seed. (One seed for
# every turn, as a fixed NPC_SEED gives, makes all replies draw the same random numbers and start alike.)
TURN_SEED: ContextVar[int | None] = ContextVar("TURN_SEED", default=None)


def turn_seed(base: int | None, persona_id: str, job: int, index: int) -> int | None:
    return None if base is None else zlib.crc32(f"{base}:{persona_id}:{job}:{index}".encode()) & 0x3FFFFFFF


Embed = Callable[[list[str]], np.ndarray]


class EvalTurnService(TurnService):
    """The shipped TurnService. The sampling seed is per turn (TURN_SEED, when set); with `layout`, the prompt
    is rebuilt with those `build_messages` options (`select="embed"` picks the facts by MiniLM similarity to
    the player's line instead of shared words); `whole` chooses among candidates on their whole replies.

    Every turn samples `reply_candidates`: the eval runs many conversations at once to finish quickly, and the
    server's load shedding (`candidates_now`) would measure that load rather than the setting."""

    def __init__(
        self,
        personas: dict[str, Persona],
        runner: EngineRunner,
        store: Any,
        settings: Any,
        *,
        layout: dict[str, Any] | None = None,
        embed: Embed | None = None,
        sampling: dict[str, Any] | None = None,
        whole: bool = False,
        ban_guard_phrases: bool = False,
    ) -> None:
        super().__init__(personas, runner, store, settings, embed=embed)
        self.layout = layout
        self.overrides = sampling or {}
        self.ban_guard_phrases = ban_guard_phrases
        self.choose_on_first_sentence = not whole
        self._fact_vectors: dict[str, np.ndarray] = {}

    def candidates_now(self) -> int:
        return self.candidates

    def sampling(self, persona: Persona, attempt: int, player_text: str = "") -> SamplingParams:
        params = replace(super().sampling(persona, attempt, player_text), **self.overrides)
        if self.ban_guard_phrases:
            params = replace(params, banned=params.banned + guard_phrases(persona, player_text))
        seed = TURN_SEED.get()
        return params if seed is None else replace(params, seed=seed + attempt)

    async def prepare(self, turn: TurnInput) -> PreparedTurn:
        prepared = await super().prepare(turn)
        if self.layout is None:
            return prepared
        options = dict(self.layout)
        persona = prepared.persona
        if options.pop("select", "words") == "embed" and self.embed is not None and persona.knowledge:
            facts = self._fact_vectors.get(persona.id)
            if facts is None:
                facts = self._fact_vectors[persona.id] = await asyncio.to_thread(self.embed, list(persona.knowledge))
            asked = (await asyncio.to_thread(self.embed, [prepared.player_text]))[0]
            order = np.argsort(-(facts @ asked))
            options["relevant"] = [persona.knowledge[i] for i in order]
        stored = await asyncio.to_thread(self.store.turns, prepared.session_id, HISTORY_LIMIT)
        engine = self.runner.engine
        messages, kept = build_messages(
            persona,
            [Turn(row.role, row.text) for row in stored],
            prepared.player_text,
            count_tokens=engine.count_tokens,
            budget=engine.context_tokens - self.sampling(persona, 0).max_new_tokens,
            **options,
        )
        return replace(prepared, messages=messages, history_turns=kept)


class Pipeline(Protocol):
    async def converse(self, persona: Persona, lines: Sequence[str], seeds: Sequence[int | None]) -> list[Reply]: ...


class ServicePipeline:
    """The server's own turn path: `TurnService.run` in a fresh session per job."""

    def __init__(self, service: TurnService) -> None:
        self.service = service

    async def converse(self, persona: Persona, lines: Sequence[str], seeds: Sequence[int | None]) -> list[Reply]:
        player_id = f"eval-{uuid.uuid4().hex[:12]}"
        session_id: str | None = None
        out: list[Reply] = []
        for line, seed in zip(lines, seeds, strict=True):
            TURN_SEED.set(seed)
            started = time.perf_counter()
            result: TurnResult | None = None
            async for event in self.service.run(TurnInput(persona.id, player_id, text=line, session_id=session_id)):
                if isinstance(event, TurnResult):
                    result = event
            assert result is not None
            session_id = result.session_id
            out.append(
                Reply(
                    result.text,
                    result.fallback,
                    result.regenerated,
                    result.usage.get("completion_tokens", 0),
                    time.perf_counter() - started,
                    result.timings_ms.get("first_sentence_ms"),
                    result.usage.get("candidates", 1),
                )
            )
        return out


MessagesFn = Callable[[Persona, list[Turn], str], list[Message]]


class RawPipeline:
    """The engine's raw output for the given messages: no guard, no trimming, no fallback."""

    def __init__(self, runner: EngineRunner, sampling: Callable[[Persona], SamplingParams], messages: MessagesFn):
        self.runner = runner
        self.sampling = sampling
        self.messages = messages

    async def converse(self, persona: Persona, lines: Sequence[str], seeds: Sequence[int | None]) -> list[Reply]:
        history: list[Turn] = []
        out: list[Reply] = []
        for line, seed in zip(lines, seeds, strict=True):
            started = time.perf_counter()
            stats = GenerationStats()
            params = self.sampling(persona)
            params = params if seed is None else replace(params, seed=seed)
            messages = self.messages(persona, history, line)
            parts = [d async for d in self.runner.stream(messages, params, stats)]
            text = "".join(parts).strip()
            out.append(Reply(text, completion_tokens=stats.completion_tokens, seconds=time.perf_counter() - started))
            history += [Turn("player", line), Turn("npc", text)]
        return out


def one_line_messages(persona: Persona, history: list[Turn], line: str) -> list[Message]:
    """The naive baseline's prompt: "You are NAME, ROLE." and the conversation."""
    messages = [Message("system", f"You are {persona.name}, {persona.role}.")]
    messages += [Message("user" if t.role == "player" else "assistant", t.text) for t in history]
    return [*messages, Message("user", line)]


async def run_jobs(
    name: str,
    pipeline: Pipeline,
    personas: Mapping[str, Persona],
    jobs: Sequence[Job],
    *,
    concurrency: int = 16,
    seed: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[Record]:
    """Every job through `pipeline`, `concurrency` jobs at a time; the records, measured."""
    gate = asyncio.Semaphore(concurrency)
    done = 0
    total = sum(len(j.lines) for j in jobs)

    async def one(number: int, job: Job) -> list[Record]:
        nonlocal done
        persona = personas[job.persona_id]
        async with gate:
            seeds = [turn_seed(seed, job.persona_id, number, i) for i in range(len(job.lines))]
            replies = await pipeline.converse(persona, job.lines, seeds)
        records = []
        for i, (line, reply) in enumerate(zip(job.lines, replies, strict=True)):
            record = Record(name, job.persona_id, job.kind, job.category, number, i, line, reply.text)
            record.fallback, record.regenerated = reply.fallback, reply.regenerated
            record.completion_tokens, record.seconds = reply.completion_tokens, round(reply.seconds, 2)
            record.first_sentence_ms, record.candidates = reply.first_sentence_ms, reply.candidates
            record.expect = list(job.expect)
            record.breaks = reply_breaks(reply.text, persona, job.lines[: i + 1])
            record.length_ok = length_ok(reply.text, persona)
            if job.expect:
                record.answered = answers(reply.text, job.expect)
            if job.kind == "conversation" and i > 0:
                record.repeated = repeats(reply.text, [r.text for r in replies[:i]])
            records.append(record)
        before, done = done, done + len(job.lines)
        if progress is not None and (done * 10 // total > before * 10 // total):
            progress(f"{name}: {done}/{total} turns")
        return records

    results = await asyncio.gather(*(one(n, job) for n, job in enumerate(jobs)))
    return [r for rs in results for r in rs]


# --- the report ------------------------------------------------------------------------------------------


def _rate(hits: int, n: int) -> dict[str, Any]:
    return {"rate": round(hits / n, 4) if n else None, "n": n, "hits": hits}


def summarize(
    records: Sequence[Record], personas: Mapping[str, Persona], embed: Callable[[list[str]], np.ndarray]
) -> dict[str, Any]:
    """Every metric over one variant's records, overall and per persona."""

    def metrics(rs: Sequence[Record]) -> dict[str, Any]:
        lore = [r for r in rs if r.answered is not None]
        later = [r for r in rs if r.repeated is not None]
        return {
            "turns": len(rs),
            "break_rate": _rate(sum(bool(r.breaks) for r in rs), len(rs)),
            "fallback_rate": _rate(sum(r.fallback for r in rs), len(rs)),
            "regenerated_rate": _rate(sum(r.regenerated for r in rs), len(rs)),
            "lore_recall": _rate(sum(bool(r.answered) for r in lore), len(lore)),
            "length_compliance": _rate(sum(r.length_ok for r in rs), len(rs)),
            "repetition": _rate(sum(bool(r.repeated) for r in later), len(later)),
            "distinct_2": round(distinct_n([r.reply for r in rs]), 4),
            "mean_chars": round(float(np.mean([len(r.reply) for r in rs])), 1) if rs else 0.0,
            "mean_candidates": round(float(np.mean([r.candidates for r in rs])), 2) if rs else 0.0,
        }

    summary = metrics(records)
    firsts = [r.first_sentence_ms for r in records if r.first_sentence_ms is not None]
    summary["first_sentence_ms"] = {
        "median": round(float(np.median(firsts)), 1) if firsts else None,
        "p90": round(float(np.percentile(firsts, 90)), 1) if firsts else None,
    }
    generated = [r for r in records if not r.fallback and r.reply]
    acc, per = identifiability(embed([r.reply for r in generated]), [r.persona_id for r in generated])
    acc_all, _ = identifiability(embed([r.reply for r in records]), [r.persona_id for r in records])
    summary["identifiability"] = {"accuracy": _round(acc), "n": len(generated), "with_fallbacks": _round(acc_all)}
    summary["break_reasons"] = dict(Counter(reason.split(":")[0] for r in records for reason in r.breaks).most_common())
    by_persona: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_persona[r.persona_id].append(r)
    summary["per_persona"] = {
        pid: {**metrics(rs), "identifiability": _round(per.get(pid, float("nan")))} for pid, rs in by_persona.items()
    }
    return summary


def _round(x: float) -> float | None:
    return None if np.isnan(x) else round(float(x), 4)


def greeting_compliance(personas: Mapping[str, Persona]) -> dict[str, Any]:
    """Each persona's greeting (sent as-is by the API) passes the break checks and its length limits."""
    failures = {
        pid: [*reply_breaks(p.greeting, p), *([] if length_ok(p.greeting, p) else ["length"])]
        for pid, p in personas.items()
    }
    failures = {pid: f for pid, f in failures.items() if f}
    return {**_rate(len(personas) - len(failures), len(personas)), "failures": failures}


ROWS = (
    ("character breaks", "break_rate", "<= 1%"),
    ("fallback lines used", "fallback_rate", ""),
    ("persona identifiability", "identifiability", ">= 90%"),
    ("lore recall", "lore_recall", ">= 70%"),
    ("length compliance", "length_compliance", "100%"),
    ("repetition across turns", "repetition", ""),
)


def _cell(value: Any) -> str:
    if isinstance(value, dict) and "accuracy" in value:
        acc = value["accuracy"]
        return "n/a" if acc is None else f"{acc:.1%}"
    if isinstance(value, dict):
        if value["rate"] is None:
            return "n/a"
        return f"{value['rate']:.1%} ({value['hits']}/{value['n']})"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: one column per variant, then break reasons and per-persona figures."""
    names = list(report["variants"])
    out = [
        f"Role-play evaluation, {report['date']}, {report['machine']}; model {report['model']}, seed "
        f"{report['seed']}, {len(report['personas'])} personas{', quick subset' if report['quick'] else ''}.",
        "",
        "| metric | target | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for label, key, target in ROWS:
        out.append(f"| {label} | {target} | " + " | ".join(_cell(report["variants"][n][key]) for n in names) + " |")
    for label, key in (("distinct-2", "distinct_2"), ("mean reply length, chars", "mean_chars")):
        out.append(f"| {label} | | " + " | ".join(str(report["variants"][n][key]) for n in names) + " |")
    for label, key in (("candidates per turn", "mean_candidates"), ("tokens decoded", "completion_tokens")):
        out.append(f"| {label} | | " + " | ".join(str(report["variants"][n].get(key, "")) for n in names) + " |")
    for stat in ("median", "p90"):
        cells = [str(report["variants"][n].get("first_sentence_ms", {}).get(stat)) for n in names]
        out.append(f"| first sentence, ms ({stat}) | | " + " | ".join(cells) + " |")
    out.append("| wall time, s | | " + " | ".join(str(report["variants"][n]["seconds"]) for n in names) + " |")
    g = report["greeting_compliance"]
    out += ["", f"Greeting compliance (persona greetings pass the checks and length limits): {_cell(g)}."]
    for n in names:
        v = report["variants"][n]
        reasons = ", ".join(f"{k} {c}" for k, c in v["break_reasons"].items()) or "none"
        out += ["", f"**{n}**: {report['descriptions'].get(n, '')} Break reasons: {reasons}.", ""]
        out += ["| persona | breaks | fallback | identifiability | lore | length | repetition |", "|---" * 7 + "|"]
        for pid, m in v["per_persona"].items():
            ident = "n/a" if m["identifiability"] is None else f"{m['identifiability']:.0%}"
            cells = [_cell(m[k]) for k in ("break_rate", "fallback_rate")] + [ident]
            cells += [_cell(m[k]) for k in ("lore_recall", "length_compliance", "repetition")]
            out.append(f"| {pid} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


# The `banned` variant: phrases the guard rejects, ruled out at decoding too (measured worse: not shipped).
GUARD_PHRASES = ("language model", "as an AI", "AI assistant", "virtual assistant", "assist you", "chatbot")
MACHINE_ONLY = ("AI", "artificial intelligence", "computer program", "my programming")


def guard_phrases(persona: Persona, player_text: str) -> tuple[str, ...]:
    """What this persona's reply to `player_text` must not contain, for decoding to rule out: model and assistant
    talk, AI words for a living persona, and its forbidden words the player did not say."""
    said = player_text.lower()
    own = [w for w in forbidden_words(persona) if w.lower() not in said]
    return (*GUARD_PHRASES, *(() if persona.is_machine else MACHINE_ONLY), *own)


# --- variants and the whole run --------------------------------------------------------------------------

ORIGINAL_LAYOUT: dict[str, Any] = {"facts": 0, "remind": False}  # the layout before the eval existed
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "baseline": (
        'The same model with a one-line system prompt ("You are NAME, ROLE."), raw output: no guard, no '
        "examples, no trimming.",
        {"raw": "one-line"},
    ),
    "unguarded": ("The shipped prompt, raw output (no guard): what the guard adds.", {"raw": "shipped"}),
    "shipped": (
        "The server's TurnService as shipped (prompt, sampling, reply candidates, guard, fallback lines, history).",
        {},
    ),
    "original-layout": (
        "Shipped, with the original prompt layout (no note before the player's line).",
        {"layout": ORIGINAL_LAYOUT},
    ),
    "facts": (
        "Shipped, plus a note before the player's line with the 3 facts sharing most words with it.",
        {"layout": {"facts": 3, "remind": False}},
    ),
    "facts-embed": (
        "Shipped, plus a note with the 3 facts nearest the player's line by MiniLM similarity.",
        {"layout": {"facts": 3, "remind": False, "select": "embed"}},
    ),
    "remind": (
        "Shipped, plus a note before the player's line reminding the model who it is.",
        {"layout": {"facts": 0, "remind": True}},
    ),
    "facts+remind": (
        "Shipped, plus a note with the reminder and the 3 facts sharing most words.",
        {"layout": {"facts": 3, "remind": True}},
    ),
    "facts-1": ("Shipped, with only the single most relevant fact in the note.", {"layout": {"facts": 1}}),
    "banned": (
        "Shipped, with the phrases the guard rejects also ruled out at decoding (model and assistant talk, AI "
        "words for living personas, `cannot_know` words the player did not say).",
        {"ban_guard_phrases": True},
    ),
    "cool": ("Shipped, sampling at temperature 0.4 for every persona.", {"sampling": {"temperature": 0.4}}),
    "single": (
        "Shipped with NPC_REPLY_CANDIDATES=1: one sampled reply, no re-ranking.",
        {"settings": {"reply_candidates": 1}},
    ),
    "rerank-2": (
        "Shipped with NPC_REPLY_CANDIDATES=2: the better first sentence of 2 by rerank.score, then that reply.",
        {"settings": {"reply_candidates": 2}},
    ),
    "rerank": (
        "Shipped with NPC_REPLY_CANDIDATES=4: the best first sentence of 4 by rerank.score, then that reply.",
        {"settings": {"reply_candidates": 4}},
    ),
    "rerank-8": (
        "Shipped with NPC_REPLY_CANDIDATES=8: the best first sentence of 8 by rerank.score, then that reply.",
        {"settings": {"reply_candidates": 8}},
    ),
    "lora": (
        "Shipped (4 candidates) with each persona's LoRA adapter from `npc-server finetune` applied.",
        {"settings": {"adapters": True}},
    ),
    "no-lora": ("Shipped (4 candidates) without LoRA adapters.", {"settings": {"adapters": False}}),
    "rerank-whole": (
        "4 candidates, chosen on their whole replies instead of their first sentences (no streaming).",
        {"settings": {"reply_candidates": 4}, "whole": True},
    ),
}
DESCRIPTIONS = {name: text for name, (text, _) in VARIANTS.items()}


def pipelines(
    names: Sequence[str],
    personas: Mapping[str, Persona],
    runner: EngineRunner,
    store: Any,
    settings: Any,
    embed: Embed | None = None,
) -> dict[str, Pipeline]:
    """The named variants over one engine runner and store."""
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    args = (dict(personas), runner, store, settings)
    shipped = EvalTurnService(*args)
    engine = runner.engine

    def sampling(persona: Persona) -> SamplingParams:
        return replace(shipped.sampling(persona, 0), adapter=None, banned=())  # the raw pipelines: the bare model

    def shipped_messages(persona: Persona, history: list[Turn], line: str) -> list[Message]:
        budget = engine.context_tokens - sampling(persona).max_new_tokens
        return build_messages(persona, history, line, count_tokens=engine.count_tokens, budget=budget)[0]

    made: dict[str, Pipeline] = {}
    for name in names:
        options = VARIANTS[name][1]
        if options.get("raw") == "one-line":
            made[name] = RawPipeline(runner, sampling, one_line_messages)
        elif options.get("raw") == "shipped":
            made[name] = RawPipeline(runner, sampling, shipped_messages)
        else:
            variant = (dict(personas), runner, store, settings.model_copy(update=options.get("settings", {})))
            service = EvalTurnService(
                *variant,
                layout=options.get("layout"),
                embed=embed,
                sampling=options.get("sampling"),
                whole=options.get("whole", False),
                ban_guard_phrases=options.get("ban_guard_phrases", False),
            )
            made[name] = ServicePipeline(service)
    return made


async def evaluate(
    settings: Any,
    personas: Mapping[str, Persona],
    variants: Sequence[str],
    *,
    quick: bool = False,
    concurrency: int = 16,
    jobs: Sequence[Job] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Load the engine and the embedder, run every variant over the same turns (`jobs`, default the fixed
    prompt set), and report."""
    import tempfile

    from npc_server.app import load_adapters, load_engine
    from npc_server.perception.text import TextAnalyzer
    from npc_server.store.sqlite import Store
    from npc_server.threads import in_own_thread

    say = progress or (lambda _: None)
    say("loading the language model and the sentence embedder")
    engine = await in_own_thread(load_engine, settings)
    await in_own_thread(load_adapters, engine, dict(personas), settings.model_copy(update={"adapters": True}))
    analyzer = await asyncio.to_thread(TextAnalyzer)
    runner = EngineRunner(engine)
    jobs = list(jobs) if jobs is not None else load_jobs(personas, quick=quick)
    report: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": machine(),
        "model": f"{engine.name} ({getattr(engine, 'dtype', '')})",
        "seed": settings.seed,
        "quick": quick,
        "personas": list(personas),
        "greeting_compliance": greeting_compliance(personas),
        "descriptions": {n: DESCRIPTIONS.get(n, "") for n in variants},
        "variants": {},
        "turns": {},
    }
    try:
        with tempfile.TemporaryDirectory(prefix="npc-eval-") as tmp:
            store = Store(Path(tmp) / "eval.sqlite3")
            try:
                made = pipelines(variants, personas, runner, store, settings, analyzer.embed)
                for name, pipeline in made.items():
                    started = time.perf_counter()
                    records = await run_jobs(
                        name, pipeline, personas, jobs, concurrency=concurrency, seed=settings.seed, progress=say
                    )
                    seconds = round(time.perf_counter() - started, 1)
                    summary = await asyncio.to_thread(summarize, records, personas, analyzer.embed)
                    summary["seconds"] = seconds
                    summary["completion_tokens"] = sum(r.completion_tokens for r in records)
                    report["variants"][name] = summary
                    report["turns"][name] = [asdict(r) for r in records]
                    say(f"{name}: done in {seconds} s, breaks {_cell(summary['break_rate'])}")
            finally:
                store.close()
    finally:
        runner.close()
    return report
