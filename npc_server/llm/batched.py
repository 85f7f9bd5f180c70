"""A continuous-batching engine for Llama-architecture models (SmolLM2 and its family) on the CPU.

One scheduler thread owns the model. Every decode step runs all active sequences together, so the
weights are read once per step for every session that is generating. Sequences join between steps
(their prompt is prefilled on its own) and leave the moment they finish or are cancelled.

The KV cache lives in fixed slots, `[slots, kv_heads, context, head_dim]` per layer, with active
sequences kept in slots 0..B-1 so a step works on plain views. A prefix cache keeps the KV of recent
prompts: a new prompt that starts the same way (the persona's system prompt and examples, the same
session's earlier history) copies those positions instead of recomputing them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from npc_server.errors import NpcError
from npc_server.llm.adapters import AdapterSet
from npc_server.llm.engine import GenerationStats, Message, SamplingParams
from npc_server.llm.llama import Lora, PackedLlama
from npc_server.llm.local import Detokenizer, LocalEngine, sample
from npc_server.threads import use_cores

log = logging.getLogger(__name__)


class EngineBusy(NpcError):
    status = 503
    code = "busy"


@dataclass(eq=False)
class _Sequence:
    prompt: list[int]
    params: SamplingParams
    stats: GenerationStats
    cancel: threading.Event
    out: queue.SimpleQueue[int | BaseException | None] = field(default_factory=queue.SimpleQueue)
    submitted: float = field(default_factory=time.perf_counter)
    slot: int = 0
    length: int = 0  # positions filled in its KV slot
    last: int = 0  # the token to feed at the next step
    produced: int = 0
    seen: torch.Tensor | None = None  # prompt + generated ids, for the repetition penalty
    generator: torch.Generator | None = None
    adapter: int = 0  # its LoRA adapter's slot in the engine's AdapterSet; 0: none


KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [kv_heads, T, head_dim]


SUPERSEDED = 128  # tokens: an entry whose all but this many a new prompt repeats is dropped for it


class PrefixCache:
    """KV of recent prompts, evicted least-recently-used beyond a token budget. KV computed with a LoRA adapter
    only serves prompts run with the same adapter.

    A conversation's next prompt repeats its last one up to the note before the player's line, so an entry
    that a new prompt repeats all but its last few tokens of is superseded by the new one and dropped: the
    cache then holds about one entry per live conversation instead of one per turn, and persona prefixes
    are not pushed out by a few busy conversations."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.entries: OrderedDict[tuple[str | None, int], tuple[torch.Tensor, KV]] = OrderedDict()
        self.tokens = 0
        self.hits = 0
        self.reused_tokens = 0

    def _matches(self, prompt: torch.Tensor, adapter: str | None) -> Iterator[tuple[int, tuple[str | None, int]]]:
        """(positions shared with `prompt`, key) for each entry of the same adapter."""
        for key, (ids, _) in self.entries.items():
            if key[0] == adapter:
                n = min(len(ids), len(prompt))
                same = (ids[:n] == prompt[:n]).to(torch.int8)
                yield (n if bool(same.all()) else int(torch.argmin(same))), key

    def longest(self, prompt: torch.Tensor, adapter: str | None = None) -> tuple[int, KV | None]:
        best, best_kv, best_key = 0, None, None
        for match, key in self._matches(prompt, adapter):
            if match > best:
                best, best_kv, best_key = match, self.entries[key][1], key
        if best_key is not None:
            self.entries.move_to_end(best_key)
        return best, best_kv

    def add(self, prompt: torch.Tensor, kv: KV, adapter: str | None = None) -> None:
        key = (adapter, hash(tuple(prompt.tolist())))
        if key in self.entries or len(prompt) > self.max_tokens:
            return
        for match, old_key in list(self._matches(prompt, adapter)):
            if match >= len(self.entries[old_key][0]) - SUPERSEDED:
                self.tokens -= len(self.entries.pop(old_key)[0])
        self.entries[key] = (prompt, kv)
        self.tokens += len(prompt)
        while self.tokens > self.max_tokens:
            _, (old, _) = self.entries.popitem(last=False)
            self.tokens -= len(old)


class BatchedEngine(LocalEngine):
    """Same interface as LocalEngine; `generate` may be called from many threads at once."""

    def __init__(
        self,
        folder: Path,
        *,
        dtype: str = "auto",
        context_tokens: int = 2048,
        max_batch: int = 16,
        max_waiting: int = 64,
        prefix_cache_tokens: int = 16384,
        prefill_chunk: int = 256,
        int8: bool = False,
        threads: int = 2,
    ) -> None:
        super().__init__(folder, dtype=dtype, context_tokens=context_tokens, threads=threads)
        config = self.model.config
        if config.model_type != "llama":
            raise ValueError(f"the batched engine runs Llama-architecture models, not {config.model_type}")
        self.max_concurrency = max_batch + max_waiting
        self.max_batch = max_batch
        self.packed = PackedLlama(self.model, int8=int8)
        shape = (max_batch, self.packed.kv_heads, self.context_tokens, self.packed.head_dim)
        # torch.empty: pages are only touched (and counted in RSS) as sequences fill them.
        self._k = [torch.empty(shape, dtype=self.dtype) for _ in self.packed.layers]
        self._v = [torch.empty(shape, dtype=self.dtype) for _ in self.packed.layers]
        # Positions below this per-slot mark hold finite values. A decode step attends (masked) over every
        # slot up to the longest sequence, and never-written memory could hold NaN, which masking does not
        # cancel; so each slot is zeroed up to the longest length as the batch grows.
        self._finite = [0] * max_batch
        self.prefix_cache = PrefixCache(prefix_cache_tokens)
        self._waiting: queue.Queue[_Sequence] = queue.Queue(maxsize=max_waiting)
        self._active: list[_Sequence] = []  # decoding, in slots 0..B-1
        self._filling: _Sequence | None = None  # being prefilled, in slot B or above
        self.prefill_chunk = prefill_chunk
        self._wake = threading.Event()
        self._stop = False
        self.adapters = AdapterSet(self.packed.part_shapes)
        self.steps = 0
        self.batched_tokens = 0
        self._thread = threading.Thread(target=self._loop, name="llm-scheduler", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)

    def load_adapter(self, name: str, folder: Path) -> None:
        """Load a LoRA adapter (peft's files) that requests may then name in `SamplingParams.adapter`. Before
        serving: the stacks are replaced, not locked."""
        self.adapters.load(name, folder)

    # --- the caller's side -------------------------------------------------------------------------

    def generate(
        self,
        messages: list[Message],
        params: SamplingParams,
        stats: GenerationStats,
        cancel: threading.Event,
    ) -> Iterator[str]:
        started = time.perf_counter()
        prompt = self.encode(messages)
        if len(prompt) >= self.context_tokens:
            raise ValueError("prompt does not fit the context window")
        seq = _Sequence(prompt, params, stats, cancel)
        if params.adapter is not None:
            if params.adapter not in self.adapters:
                raise ValueError(f"no adapter named {params.adapter!r} is loaded")
            seq.adapter = self.adapters.index[params.adapter]
        stats.prompt_tokens = len(prompt)
        try:
            self._waiting.put_nowait(seq)
        except queue.Full:
            raise EngineBusy("the server is at capacity; retry shortly") from None
        self._wake.set()
        text = Detokenizer(self.tokenizer, params.stop)
        try:
            while True:
                item = seq.out.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                if not text.ids:
                    stats.first_token_ms = (time.perf_counter() - started) * 1000
                delta = text.push(item)
                if delta:
                    yield delta
                if text.stopped:
                    stats.finish_reason = "stop"
                    return
        finally:
            cancel.set()  # a consumer that stopped early (stop string, guard, client gone) frees the slot
            self._wake.set()

    # --- the scheduler thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        use_cores(self.threads)
        while not self._stop:
            if not self._active and self._filling is None and self._waiting.empty():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self._retire()
                budget = self.prefill_chunk  # prompt tokens computed between two decode steps
                while budget > 0:
                    if self._filling is None:
                        self._admit()
                    if self._filling is None:
                        break
                    budget -= self._prefill_chunk(budget)
                if self._active:
                    self._step()
            except Exception as exc:  # a bug must not leave callers waiting forever
                log.exception("scheduler step failed")
                for seq in [*self._active, *([self._filling] if self._filling else [])]:
                    seq.out.put(exc)
                self._active.clear()
                self._filling = None

    def _admit(self) -> None:
        """Take the next waiting sequence into the free slot after the active ones and start its prefill."""
        while len(self._active) < self.max_batch:
            try:
                seq = self._waiting.get_nowait()
            except queue.Empty:
                return
            if seq.cancel.is_set():
                seq.stats.finish_reason = "cancelled"
                seq.out.put(None)
                continue
            seq.slot = len(self._active)
            prompt = torch.tensor(seq.prompt)
            reused, kv = self.prefix_cache.longest(prompt, seq.params.adapter)
            reused = min(reused, len(seq.prompt) - 1)  # at least one position to compute logits from
            if kv is not None and reused > 0:
                for layer, (k, v) in enumerate(kv):
                    self._k[layer][seq.slot, :, :reused] = k[:, :reused]
                    self._v[layer][seq.slot, :, :reused] = v[:, :reused]
                self.prefix_cache.hits += 1
                self.prefix_cache.reused_tokens += reused
            seq.length = reused
            seq.stats.extra["prefix_reused_tokens"] = float(reused)
            seq.stats.extra["queue_ms"] = (time.perf_counter() - seq.submitted) * 1000
            seq.seen = prompt
            if seq.params.seed is not None:
                seq.generator = torch.Generator().manual_seed(seq.params.seed)
            self._filling = seq
            return

    @torch.inference_mode()
    def _prefill_chunk(self, budget: int) -> int:
        """Prefill up to `budget` more prompt tokens of the filling sequence; returns how many it computed.
        Chunks keep the active sequences decoding between them, and a cancel is seen within one chunk."""
        seq = self._filling
        assert seq is not None and seq.seen is not None
        if seq.cancel.is_set():
            seq.stats.finish_reason = "cancelled"
            seq.out.put(None)
            self._filling = None
            return 0
        start, end = seq.length, min(len(seq.prompt), seq.length + budget)
        lora = (seq.adapter, self.adapters) if seq.adapter else None
        logits = self._forward_prefill(seq.seen[start:end], seq.slot, start, lora)
        seq.length = end
        if end < len(seq.prompt):
            return end - start
        slot = len(self._active)
        if seq.slot != slot:  # active sequences left while it filled: move it next to them
            for k, v in zip(self._k, self._v, strict=True):
                k[slot, :, :end] = k[seq.slot, :, :end]
                v[slot, :, :end] = v[seq.slot, :, :end]
            self._finite[slot] = max(self._finite[slot], end)
            seq.slot = slot
        self.prefix_cache.add(
            seq.seen,
            [(k[slot, :, :end].clone(), v[slot, :, :end].clone()) for k, v in zip(self._k, self._v, strict=True)],
            seq.params.adapter,
        )
        self._filling = None
        self._active.append(seq)
        self._emit(seq, logits)
        return end - start

    def _retire(self) -> None:
        """Drop finished or cancelled sequences, moving the last slot into each hole."""
        i = 0
        while i < len(self._active):
            seq = self._active[i]
            done = seq.cancel.is_set() or seq.stats.finish_reason in ("stop", "length")
            if not done:
                i += 1
                continue
            if seq.cancel.is_set() and not seq.stats.finish_reason:
                seq.stats.finish_reason = "cancelled"
            seq.out.put(None)
            last = len(self._active) - 1
            if i != last:
                moved = self._active[last]
                for k, v in zip(self._k, self._v, strict=True):
                    k[i, :, : moved.length] = k[last, :, : moved.length]
                    v[i, :, : moved.length] = v[last, :, : moved.length]
                self._finite[i] = max(self._finite[i], moved.length)
                self._active[i] = moved
            self._active.pop()

    @torch.inference_mode()
    def _step(self) -> None:
        batch = self._active
        tokens = torch.tensor([s.last for s in batch])
        positions = torch.tensor([s.length for s in batch])
        slots = [s.adapter for s in batch]
        lora: Lora = None
        if any(slots):
            lora = (slots[0] if len(set(slots)) == 1 else torch.tensor(slots), self.adapters)
        logits = self._forward_decode(tokens, positions, lora)
        self.steps += 1
        self.batched_tokens += len(batch)
        for i, seq in enumerate(batch):
            seq.length += 1
            self._emit(seq, logits[i])

    def _emit(self, seq: _Sequence, logits: torch.Tensor) -> None:
        if seq.cancel.is_set():
            return
        assert seq.seen is not None
        token = sample(logits.float(), seq.seen, seq.params, seq.generator)
        if token in self._stop_ids:
            seq.stats.finish_reason = "stop"
            return
        seq.produced += 1
        seq.stats.completion_tokens = seq.produced
        seq.seen = torch.cat([seq.seen, torch.tensor([token])])
        seq.last = token
        seq.out.put(token)
        if seq.produced >= seq.params.max_new_tokens or seq.length + 1 >= self.context_tokens:
            seq.stats.finish_reason = "length"

    # --- the model ---------------------------------------------------------------------------------

    def _forward_prefill(self, ids: torch.Tensor, slot: int, start: int, lora: Lora = None) -> torch.Tensor:
        """Prefill ids [T] into `slot` after `start` cached positions; returns the last position's logits [V]."""
        end = start + len(ids)
        positions = torch.arange(start, end)[None]
        # Query i (absolute position start+i) sees keys 0..start+i.
        mask = (torch.arange(end)[None, :] <= positions[0][:, None])[None, None]

        def write(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            self._k[layer][slot, :, start:end] = k[0]
            self._v[layer][slot, :, start:end] = v[0]
            return self._k[layer][slot : slot + 1, :, :end], self._v[layer][slot : slot + 1, :, :end]

        hidden = self.packed.forward(ids[None], positions, write, mask, lora)
        self._finite[slot] = max(self._finite[slot], end)
        return self.packed.logits(hidden[0, -1])

    def _forward_decode(self, tokens: torch.Tensor, positions: torch.Tensor, lora: Lora = None) -> torch.Tensor:
        """One step for the active slots 0..B-1: tokens [B] at positions [B]; returns logits [B, V]."""
        b = len(tokens)
        longest = int(positions.max()) + 1
        for slot in range(b):
            if self._finite[slot] < longest:
                for k, v in zip(self._k, self._v, strict=True):
                    k[slot, :, self._finite[slot] : longest] = 0
                    v[slot, :, self._finite[slot] : longest] = 0
                self._finite[slot] = longest
        slots = torch.arange(b)
        mask = (torch.arange(longest)[None, :] <= positions[:, None])[:, None, None, :]

        def write(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            self._k[layer][slots, :, positions] = k[:, :, 0]
            self._v[layer][slots, :, positions] = v[:, :, 0]
            return self._k[layer][:b, :, :longest], self._v[layer][:b, :, :longest]

        hidden = self.packed.forward(tokens[:, None], positions[:, None], write, mask, lora)
        return self.packed.logits(hidden[:, -1])
