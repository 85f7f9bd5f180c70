"""What the benchmark's two sides share."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field


@dataclass
class Sample:
    first_ms: float  # client-side: request sent -> first streamed text
    total_ms: float
    tokens: int
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float | None:
        """One stream's decode speed: the tokens after the first over the time after the first token. For
        npc-server the server's own timings (its first streamed text is a whole sentence); for the peer, from
        the first streamed token to the end."""
        if "generation_ms" in self.stages:
            decode_ms = self.stages["generation_ms"] - self.stages.get("first_token_ms", 0.0)
        else:
            decode_ms = self.total_ms - self.first_ms
        return (self.tokens - 1) / (decode_ms / 1000) if self.tokens > 1 and decode_ms > 0 else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
