"""The language-model interface every backend implements, and the async bridge to its worker thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, Protocol

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    repetition_penalty: float = 1.15
    max_new_tokens: int = 80
    stop: tuple[str, ...] = ()
    banned: tuple[str, ...] = ()  # phrases decoding never produces (local engines; see local.banned_sequences)
    seed: int | None = None
    adapter: str | None = None  # a LoRA adapter the engine has loaded (batched engine only)


@dataclass
class GenerationStats:
    """Filled in by the backend while it generates."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_ms: float = 0.0
    finish_reason: str = ""  # "stop" (end of turn or stop string), "length", "cancelled"
    extra: dict[str, float] = field(default_factory=dict)


class Engine(Protocol):
    """A chat model. `generate` blocks and is only ever called from the engine's worker thread."""

    name: str
    context_tokens: int
    max_concurrency: int  # generate() calls that may run at once (1: the engine is not thread-safe)

    def count_tokens(self, messages: list[Message]) -> int: ...

    def generate(
        self,
        messages: list[Message],
        params: SamplingParams,
        stats: GenerationStats,
        cancel: threading.Event,
    ) -> Iterator[str]: ...


class EngineRunner:
    """Runs one engine on its own worker thread and streams text deltas to asyncio consumers.

    Closing the async iterator early (client gone, guard satisfied) sets the cancel flag, and the
    worker stops at its next decode step.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._executor = ThreadPoolExecutor(max_workers=engine.max_concurrency, thread_name_prefix="llm")

    async def stream(
        self, messages: list[Message], params: SamplingParams, stats: GenerationStats
    ) -> AsyncGenerator[str, None]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        cancel = threading.Event()

        def work() -> None:
            try:
                for delta in self.engine.generate(messages, params, stats, cancel):
                    loop.call_soon_threadsafe(queue.put_nowait, ("delta", delta))
                    if cancel.is_set():
                        break
                loop.call_soon_threadsafe(queue.put_nowait, ("end", None))
            except BaseException as exc:  # handed to the consumer, re-raised there
                loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))

        future = loop.run_in_executor(self._executor, work)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "delta":
                    yield str(value)
                elif kind == "end":
                    break
                else:
                    assert isinstance(value, BaseException)
                    raise value
        finally:
            cancel.set()
            await asyncio.shield(future)

    async def count_tokens(self, messages: list[Message]) -> int:
        return await asyncio.to_thread(self.engine.count_tokens, messages)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()
