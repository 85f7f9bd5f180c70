"""A continuous-batching engine for Llama-architecture models (SmolLM2 and its family) on the CPU.

One scheduler thread owns the model. Every decode step runs all active sequences together, so the
weights are read once per step for every session that is generating. Sequences join between steps and
leave the moment they finish or are cancelled. Joining sequences are prefilled together too: one forward
computes the next chunk of every waiting prompt that fits the chunk budget, so a burst of players waits
for a few forwards rather than one per player.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from npc_server.errors import NpcError
from npc_server.llm.adapters import AdapterSet
from npc_server.llm.engine import GenerationStats, Message, SamplingParams
from npc_server.llm.llama import Lora, PackedLlama, give_back_freed_memory
from npc_server.llm.local import NOTHING_BANNED, Banned, Detokenizer, LocalEngine, sample
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
    banned: Banned = NOTHING_BANNED  # token sequences it must not generate


KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [kv_heads, T, head_dim]
Parts = list[tuple[KV, int, int]]  # KV for positions start..stop, in order: together, a prompt's first positions
Key = tuple[str | None, int]  # a prefix-cache entry: (adapter, hash of the prompt ids)


SUPERSEDED = 128  # tokens: an entry whose all but this many a new prompt repeats is dropped for it


class PrefixCache:
    """KV of recent prompts, evicted least-recently-used beyond a token budget. KV computed with a LoRA adapter
    only serves prompts run with the same adapter.

    A conversation's next prompt repeats its last one up to the note before the player's line, so an entry
    that a new prompt repeats all but its last few tokens of is superseded by the new one and dropped: the
    cache then holds about one entry per live conversation instead of one per turn. Entries `pin`ned (every
    persona's fixed prompt, at start-up) are never superseded or evicted and do not count against the budget:
    however many conversations push each other out, a turn starts at least from its persona's prefix. An entry
    that starts with a pinned one keeps only the KV after it (the persona's ~900 tokens are not held once per
    conversation), so the budget holds about twice the conversations."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        # key -> (prompt ids, KV of positions start.., start, the pinned entry holding positions ..start)
        self.entries: OrderedDict[Key, tuple[torch.Tensor, KV, int, Key | None]] = OrderedDict()
        self.pinned: set[Key] = set()
        self.tokens = 0  # KV positions held by entries not pinned
        self.hits = 0
        self.reused_tokens = 0

    def _matches(self, prompt: torch.Tensor, adapter: str | None) -> Iterator[tuple[int, Key]]:
        """(positions shared with `prompt`, key) for each entry of the same adapter."""
        for key, (ids, *_) in self.entries.items():
            if key[0] == adapter:
                n = min(len(ids), len(prompt))
                same = (ids[:n] == prompt[:n]).to(torch.int8)
                yield (n if bool(same.all()) else int(torch.argmin(same))), key

    def longest(self, prompt: torch.Tensor, adapter: str | None = None) -> tuple[int, Parts]:
        """Positions of `prompt` cached, and their KV."""
        best, best_key = 0, None
        for match, key in self._matches(prompt, adapter):
            if match > best:
                best, best_key = match, key
        if best_key is None:
            return 0, []
        self.entries.move_to_end(best_key)
        ids, kv, start, base = self.entries[best_key]
        parts = [(self.entries[base][1], 0, start)] if base is not None else []
        return best, [*parts, (kv, start, len(ids))]

    def add(self, prompt: torch.Tensor, read: Callable[[int], KV], adapter: str | None = None) -> None:
        """Cache `prompt`, whose KV from a position on `read` copies."""
        key = (adapter, hash(tuple(prompt.tolist())))
        if key in self.entries or len(prompt) > self.max_tokens:
            return
        base, start = None, 0
        for match, old_key in list(self._matches(prompt, adapter)):
            if old_key in self.pinned:
                if match > start:
                    base, start = old_key, match
            elif match >= len(self.entries[old_key][0]) - SUPERSEDED:
                self._drop(old_key)
        self.entries[key] = (prompt, read(start), start, base)
        self.tokens += len(prompt) - start
        for old_key in [k for k in self.entries if k not in self.pinned]:  # oldest first
            if self.tokens <= self.max_tokens:
                break
            self._drop(old_key)

    def _drop(self, key: Key) -> None:
        ids, _, start, _ = self.entries.pop(key)
        self.tokens -= len(ids) - start

    def pin(self) -> None:
        """Keep every entry cached now for good (see the class)."""
        for key, (ids, _, start, _) in self.entries.items():
            if key not in self.pinned:
                self.pinned.add(key)
                self.tokens -= len(ids) - start


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
        quantize: bool = False,
        threads: int = 2,
    ) -> None:
        super().__init__(folder, dtype=dtype, context_tokens=context_tokens, threads=threads)
        config = self.model.config
        if config.model_type != "llama":
            raise ValueError(f"the batched engine runs Llama-architecture models, not {config.model_type}")
        self.max_concurrency = max_batch + max_waiting
        self.max_batch = max_batch
        self.packed = PackedLlama(self.model, quantize=quantize)
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
        self._filling: list[_Sequence] = []  # being prefilled, in slots B and above, oldest first
        self.prefill_chunk = prefill_chunk
        self._wake = threading.Event()
        self._stop = False
        self.adapters = AdapterSet(self.packed.part_shapes, self.dtype)
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
        give_back_freed_memory()  # the stacks it replaced

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
        seq = _Sequence(prompt, params, stats, cancel, banned=self.banned(params.banned))
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
            if not self._active and not self._filling and self._waiting.empty():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self._retire()
                self._admit()
                if self._filling:
                    self._prefill()
                if self._active:
                    self._step()
            except Exception as exc:  # a bug must not leave callers waiting forever
                log.exception("scheduler step failed")
                for seq in [*self._active, *self._filling]:
                    seq.out.put(exc)
                self._active.clear()
                self._filling.clear()

    def _admit(self) -> None:
        """Take waiting sequences into free slots above the active ones, starting each from the longest
        cached prefix of its prompt."""
        while len(self._active) + len(self._filling) < self.max_batch:
            try:
                seq = self._waiting.get_nowait()
            except queue.Empty:
                return
            if seq.cancel.is_set():
                seq.stats.finish_reason = "cancelled"
                seq.out.put(None)
                continue
            taken = {f.slot for f in self._filling}
            seq.slot = next(s for s in range(len(self._active), self.max_batch) if s not in taken)
            prompt = torch.tensor(seq.prompt)
            reused, parts = self.prefix_cache.longest(prompt, seq.params.adapter)
            reused = min(reused, len(seq.prompt) - 1)  # at least one position to compute logits from
            if parts and reused > 0:
                self._write_slot(seq.slot, parts, reused)
                self.prefix_cache.hits += 1
                self.prefix_cache.reused_tokens += reused
            seq.length = reused
            seq.stats.extra["prefix_reused_tokens"] = float(reused)
            seq.stats.extra["queue_ms"] = (time.perf_counter() - seq.submitted) * 1000
            seq.seen = prompt
            if seq.params.seed is not None:
                seq.generator = torch.Generator().manual_seed(seq.params.seed)
            self._filling.append(seq)

    @torch.inference_mode()
    def _prefill(self) -> None:
        """One forward over the next chunk of the filling sequences, oldest first, as many as fit
        `prefill_chunk` tokens (rows padded to the longest chunk). Chunks keep the active sequences decoding
        between them, and a cancel is seen within one chunk."""
        for seq in [s for s in self._filling if s.cancel.is_set()]:
            seq.stats.finish_reason = "cancelled"
            seq.out.put(None)
            self._filling.remove(seq)
        rows: list[tuple[_Sequence, int]] = []
        for seq in self._filling:
            n = min(len(seq.prompt) - seq.length, self.prefill_chunk)
            if rows and (len(rows) + 1) * max(n, *(m for _, m in rows)) > self.prefill_chunk:
                break
            rows.append((seq, n))
        if not rows:
            return
        ids = torch.zeros(len(rows), max(n for _, n in rows), dtype=torch.long)
        for i, (seq, n) in enumerate(rows):
            assert seq.seen is not None
            ids[i, :n] = seq.seen[seq.length : seq.length + n]
        starts, slots = [seq.length for seq, _ in rows], [seq.slot for seq, _ in rows]
        lora = self._lora([seq for seq, _ in rows])
        hidden = self._forward_prefill(ids, torch.tensor([n for _, n in rows]), starts, slots, lora)
        done = []
        for i, (seq, n) in enumerate(rows):
            seq.length += n
            if seq.length == len(seq.prompt):
                done.append(i)
        if done:
            logits = self.packed.logits(hidden[done])
            for row, i in enumerate(done):
                self._activate(rows[i][0], logits[row])

    def _activate(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """A sequence whose prompt is filled: emit its first token, cache its prompt's KV and move it to the slot
        after the active ones (the filling sequence there takes its old slot)."""
        assert seq.seen is not None
        prompt = seq.seen
        self._emit(seq, logits)  # first: copying the KV below takes a few ms
        end, slot, old = seq.length, len(self._active), seq.slot
        if old != slot:
            other = next((f for f in self._filling if f.slot == slot), None)
            if other is None:
                self._copy_slot(old, slot, end)
            else:  # swap, through a copy of this one's KV
                kv = self._read_slot(old, 0, end)
                self._copy_slot(slot, old, other.length)
                other.slot = old
                self._write_slot(slot, [(kv, 0, end)], end)
            seq.slot = slot
        self.prefix_cache.add(prompt, lambda start: self._read_slot(slot, start, end), seq.params.adapter)
        self._filling.remove(seq)
        self._active.append(seq)

    def _read_slot(self, slot: int, start: int, end: int) -> KV:
        pairs = zip(self._k, self._v, strict=True)
        return [(k[slot, :, start:end].clone(), v[slot, :, start:end].clone()) for k, v in pairs]

    def _write_slot(self, slot: int, parts: Parts, length: int) -> None:
        """The first `length` positions of `parts`' keys and values into `slot`."""
        for kv, start, stop in parts:
            stop = min(stop, length)
            if stop <= start:
                continue
            for layer, (k, v) in enumerate(kv):
                self._k[layer][slot, :, start:stop] = k[:, : stop - start]
                self._v[layer][slot, :, start:stop] = v[:, : stop - start]
        self._finite[slot] = max(self._finite[slot], length)

    def _copy_slot(self, source: int, target: int, length: int) -> None:
        for k, v in zip(self._k, self._v, strict=True):
            k[target, :, :length] = k[source, :, :length]
            v[target, :, :length] = v[source, :, :length]
        self._finite[target] = max(self._finite[target], length)

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
                self._copy_slot(last, i, moved.length)
                moved.slot = i
                self._active[i] = moved
            self._active.pop()

    @torch.inference_mode()
    def _step(self) -> None:
        batch = self._active
        tokens = torch.tensor([s.last for s in batch])
        positions = torch.tensor([s.length for s in batch])
        logits = self._forward_decode(tokens, positions, self._lora(batch))
        self.steps += 1
        self.batched_tokens += len(batch)
        for i, seq in enumerate(batch):
            seq.length += 1
            self._emit(seq, logits[i])

    def _lora(self, rows: list[_Sequence]) -> Lora:
        """The rows' adapters for a forward: none, one for all rows, or one slot per row."""
        slots = [seq.adapter for seq in rows]
        if not any(slots):
            return None
        return (slots[0] if len(set(slots)) == 1 else torch.tensor(slots), self.adapters)

    def _emit(self, seq: _Sequence, logits: torch.Tensor) -> None:
        if seq.cancel.is_set():
            return
        assert seq.seen is not None
        token = sample(logits.float(), seq.seen, seq.params, seq.generator, seq.banned)
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

    def _forward_prefill(
        self, ids: torch.Tensor, counts: torch.Tensor, starts: list[int], slots: list[int], lora: Lora = None
    ) -> torch.Tensor:
        """Prefill row i's first counts[i] ids [N, W] into slots[i] after starts[i] cached positions; returns
        each row's hidden state at its last id [N, hidden]."""
        n, width = ids.shape
        positions = torch.tensor(starts)[:, None] + torch.arange(width)[None]  # [N, W]
        end = max(s + int(c) for s, c in zip(starts, counts, strict=True))
        self._make_finite(slots, end)
        # Row i's query at position p sees keys 0..p of its own slot.
        mask = (torch.arange(end)[None, None, :] <= positions[:, :, None])[:, None]
        rows, cols = (torch.arange(width)[None] < counts[:, None]).nonzero(as_tuple=True)  # the unpadded ids
        at_slot, at_position = torch.tensor(slots)[rows], positions[rows, cols]
        # a view where the slots are consecutive, as when a burst of players arrives; else a copy
        chosen = slice(slots[0], slots[0] + n) if slots == list(range(slots[0], slots[0] + n)) else slots

        def write(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            self._k[layer][at_slot, :, at_position] = k.transpose(1, 2)[rows, cols]
            self._v[layer][at_slot, :, at_position] = v.transpose(1, 2)[rows, cols]
            return self._k[layer][chosen, :, :end], self._v[layer][chosen, :, :end]

        hidden = self.packed.forward(ids, positions, write, mask, lora)
        return hidden[torch.arange(n), counts - 1]

    def _make_finite(self, slots: list[int], end: int) -> None:
        """Attention runs (masked) over every key up to `end` in each of these slots, and never-written memory
        could hold NaN, which masking does not cancel: zero what was never written."""
        for slot in slots:
            if self._finite[slot] < end:
                for k, v in zip(self._k, self._v, strict=True):
                    k[slot, :, self._finite[slot] : end] = 0
                    v[slot, :, self._finite[slot] : end] = 0
                self._finite[slot] = end

    def _forward_decode(self, tokens: torch.Tensor, positions: torch.Tensor, lora: Lora = None) -> torch.Tensor:
        """One step for the active slots 0..B-1: tokens [B] at positions [B]; returns logits [B, V]."""
        b = len(tokens)
        longest = int(positions.max()) + 1
        self._make_finite(list(range(b)), longest)
        # one stream sees every key it wrote; several, each its own up to its position
        mask = (torch.arange(longest)[None, :] <= positions[:, None])[:, None, None, :] if b > 1 else None
        # each new key's row in the cache seen as [slots * kv_heads * context, head_dim]: one index_copy_ a
        # layer (~3 us; indexing with slots and positions takes ~7)
        _, heads, context, width = self._k[0].shape
        at = ((torch.arange(b)[:, None] * heads + torch.arange(heads)) * context + positions[:, None]).flatten()

        def write(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            self._k[layer].view(-1, width).index_copy_(0, at, k.reshape(-1, width))
            self._v[layer].view(-1, width).index_copy_(0, at, v.reshape(-1, width))
            return self._k[layer][:b, :, :longest], self._v[layer][:b, :, :longest]

        hidden = self.packed.forward(tokens[:, None], positions[:, None], write, mask, lora)
        return self.packed.logits(hidden[:, -1])
