"""Flow control for live sessions: the bounded outgoing queue, rate limits, and the per-app hub."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from npc_server.live.protocol import ServerEvent


class Outbox:
    """Events waiting to be sent to one client, oldest first, at most `capacity` of them.

    A client that reads too slowly first loses droppable events (face and partial-voice affect updates,
    partial transcripts); when only events that must arrive are left, `on_overflow` is called once and the
    session is closed. Nothing here ever blocks the event loop or another session.
    """

    def __init__(self, capacity: int, on_overflow: Callable[[], None]) -> None:
        self.capacity = capacity
        self.on_overflow = on_overflow
        self.dropped = 0
        self._items: deque[tuple[str, bool]] = deque()
        self._ready = asyncio.Event()
        self._closed = False
        self._overflowed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, event: ServerEvent, *, droppable: bool = False) -> None:
        if self._closed or self._overflowed:
            return
        if len(self._items) >= self.capacity and (droppable or not self._drop_one()):
            self.dropped += 1
            if not droppable:
                self._overflowed = True
                self.on_overflow()
            return
        self._items.append((event.model_dump_json(), droppable))
        self._ready.set()

    def _drop_one(self) -> bool:
        for i, (_, droppable) in enumerate(self._items):
            if droppable:
                del self._items[i]
                self.dropped += 1
                return True
        return False

    async def get(self) -> str | None:
        """The next event's JSON; None once the outbox is closed and empty."""
        while not self._items:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()[0]

    def close(self) -> None:
        """Accept nothing more; `get` drains what is queued, then returns None."""
        self._closed = True
        self._ready.set()


class TokenBucket:
    """`rate` tokens a second, holding at most `burst`."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = time.monotonic()

    def take(self, amount: float = 1.0) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < amount:
            return False
        self._tokens -= amount
        return True


class LiveHub:
    """What the live sessions of one app share: the connection count and one slot for optional work.

    Optional work (partial transcripts, face updates between turns) runs only when the slot is free, so on a
    busy server it is skipped instead of queueing up behind, or ahead of, the turns themselves.
    """

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.active = 0
        self._optional: asyncio.Lock | None = None

    def enter(self) -> bool:
        if self.active >= self.max_connections:
            return False
        self.active += 1
        return True

    def leave(self) -> None:
        self.active -= 1

    @property
    def optional(self) -> asyncio.Lock:
        if self._optional is None:  # made inside the running loop
            self._optional = asyncio.Lock()
        return self._optional
