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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
