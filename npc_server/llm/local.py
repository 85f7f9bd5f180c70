"""A local Hugging Face causal LM run with torch, with its own decode loop (streaming, stop, cancel)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from npc_server.llm.engine import GenerationStats, Message, SamplingParams
from npc_server.threads import use_cores

log = logging.getLogger(__name__)


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class LocalEngine:
    """Greedy or sampled decoding over any transformers causal LM with a KV cache, one request at a time."""

    max_concurrency = 1

    def __init__(self, folder: Path, *, dtype: str = "auto", context_tokens: int = 2048, threads: int = 2) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype == "auto":
            dtype = "bfloat16" if cpu_has_bf16() else "float32"
        self.dtype = getattr(torch, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=self.dtype).eval()
        self.name = folder.name
        self.threads = threads  # torch threads for the thread that runs the model (see npc_server.threads)
        config_window = int(getattr(self.model.config, "max_position_embeddings", context_tokens))
        self.context_tokens = min(context_tokens, config_window)
        self._stop_ids = self._end_of_turn_ids()
        self._banned: dict[tuple[str, ...], Banned] = {}

    def banned(self, phrases: tuple[str, ...]) -> Banned:
        """The token sequences of `phrases`, tokenised once per distinct tuple of phrases."""
        if phrases not in self._banned:
            if len(self._banned) >= 1024:  # a bound, should callers vary the phrases turn by turn
                self._banned.clear()
            self._banned[phrases] = banned_sequences(self.tokenizer, phrases)
        return self._banned[phrases]

    def _end_of_turn_ids(self) -> set[int]:
        ids: set[int] = set()
        eos = self.model.generation_config.eos_token_id
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != self.tokenizer.unk_token_id:
                ids.add(token_id)
        return ids

    def encode(self, messages: list[Message]) -> list[int]:
        """Token ids of the conversation in the model's own chat template, ready for the reply."""
        chat = [{"role": m.role, "content": m.content} for m in messages]
        ids: Any = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # some versions return a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def count_tokens(self, messages: list[Message]) -> int:
        return len(self.encode(messages))

    def warm(self) -> None:
        stats = GenerationStats()
        params = SamplingParams(temperature=0.0, max_new_tokens=4)
        for _ in self.generate([Message("user", "Hello.")], params, stats, threading.Event()):
            pass

    @torch.inference_mode()
    def generate(
        self,
        messages: list[Message],
        params: SamplingParams,
        stats: GenerationStats,
        cancel: threading.Event,
    ) -> Iterator[str]:
        started = time.perf_counter()
        use_cores(self.threads)
        prompt = self.encode(messages)
        budget = self.context_tokens - len(prompt)
        if budget <= 0:
            raise ValueError("prompt does not fit the context window")
        max_new = min(params.max_new_tokens, budget)
        stats.prompt_tokens = len(prompt)
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None

        input_ids = torch.tensor([prompt])
        seen = torch.tensor(prompt)
        banned = self.banned(params.banned)
        past = None
        text = Detokenizer(self.tokenizer, params.stop)
        stats.finish_reason = "length"
        for step in range(max_new):
            if cancel.is_set():
                stats.finish_reason = "cancelled"
                return
            out = self.model(input_ids=input_ids, cache=past, use_cache=True, logits_to_keep=1)
            past = out.cache
            logits = out.logits[0, -1].float()
            token = sample(logits, seen, params, generator, banned)
            if step == 0:
                stats.first_token_ms = (time.perf_counter() - started) * 1000
            if token in self._stop_ids:
                stats.finish_reason = "stop"
                return
            stats.completion_tokens = step + 1
            seen = torch.cat([seen, torch.tensor([token])])
            input_ids = torch.tensor([[token]])
            delta = text.push(token)
            if delta:
                yield delta
            if text.stopped:
                stats.finish_reason = "stop"
                return


class Detokenizer:
    """Generated token ids to text deltas: holds back an unfinished multi-byte character and cuts the text
    at the first stop string (which is never emitted)."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        full = str(self.tokenizer.decode(self.ids, skip_special_tokens=False))
        if full.endswith("\ufffd"):
            return ""
        delta, self.text = full[len(self.text) :], full
        hits = [i for i in (full.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return delta[: max(0, min(hits) - (len(full) - len(delta)))]
        return delta


class Banned:
    """Token sequences decoding must not produce, arranged so a step checks them in a few dictionary lookups:
    a sequence's last token is ruled out wherever the tokens before it have just been generated."""

    def __init__(self, sequences: Iterable[tuple[int, ...]] = ()) -> None:
        self.sequences = sorted(set(sequences))
        self.always = torch.tensor([s[0] for s in self.sequences if len(s) == 1], dtype=torch.long)
        self.after: dict[tuple[int, ...], list[int]] = {}
        for s in self.sequences:
            if len(s) > 1:
                self.after.setdefault(s[:-1], []).append(s[-1])
        self.lengths = sorted({len(key) for key in self.after})

    def __bool__(self) -> bool:
        return bool(self.sequences)

    def apply(self, logits: torch.Tensor, seen: torch.Tensor) -> None:
        logits[self.always] = float("-inf")
        if self.lengths:
            tail = tuple(seen[-self.lengths[-1] :].tolist())
            for n in self.lengths:
                tokens = self.after.get(tail[-n:])
                if tokens:
                    logits[tokens] = float("-inf")


NOTHING_BANNED = Banned()


def banned_sequences(tokenizer: Any, phrases: tuple[str, ...]) -> Banned:
    """The token sequences that spell each phrase in running text: as written, capitalised and lower-cased,
    each alone and after a space (a phrase tokenises differently at a word's start). The model can still
    spell a phrase with other tokens; the guard's checks catch those."""
    sequences: set[tuple[int, ...]] = set()
    for phrase in phrases:
        for variant in {phrase, phrase[:1].upper() + phrase[1:], phrase[:1].lower() + phrase[1:]}:
            for text in (variant, " " + variant):
                ids = tuple(tokenizer.encode(text, add_special_tokens=False))
                if ids:
                    sequences.add(ids)
    return Banned(sequences)


def sample(
    logits: torch.Tensor,
    seen: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    banned: Banned = NOTHING_BANNED,
) -> int:
    """One token from float logits [V]: banned sequences, repetition penalty, then greedy or
    temperature/top-k/top-p sampling."""
    if banned:
        banned.apply(logits, seen)
    if params.repetition_penalty != 1.0:
        prev = logits[seen]
        logits[seen] = torch.where(prev > 0, prev / params.repetition_penalty, prev * params.repetition_penalty)
    if params.temperature <= 0.0:
        return int(torch.argmax(logits))
    if params.top_k > 0:  # sample among the k best only: cheap, and the vocabulary is never sorted
        values, ids = torch.topk(logits, min(params.top_k, logits.numel()))
    else:
        values, ids = torch.sort(logits, descending=True)
    probs = torch.softmax(values / params.temperature, dim=-1)
    if params.top_p < 1.0:
        cumulative = torch.cumsum(probs, dim=-1)
        probs = torch.where(cumulative - probs > params.top_p, torch.zeros_like(probs), probs)
    return int(ids[torch.multinomial(probs, 1, generator=generator)])
