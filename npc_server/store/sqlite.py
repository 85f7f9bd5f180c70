"""Conversations in SQLite: sessions and their turns. Every write is one committed transaction (WAL), so a
crash loses at most the turn in flight. Calls block briefly; async callers use `asyncio.to_thread`."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    player_id TEXT NOT NULL,
    npc_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_pair ON sessions (player_id, npc_id, updated_at);
CREATE TABLE IF NOT EXISTS turns (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('player', 'npc')),
    text TEXT NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS turns_by_session ON turns (session_id, id);
"""


@dataclass(frozen=True)
class SessionRow:
    id: str
    player_id: str
    npc_id: str
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class TurnRow:
    role: str
    text: str
    meta: dict[str, Any]
    created_at: float


class SessionMismatch(Exception):
    """A session id that belongs to another player or NPC."""


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def open_session(self, player_id: str, npc_id: str, session_id: str | None) -> SessionRow:
        """The named session, a new one with that name, or the pair's latest session (or a new one)."""
        now = time.time()
        with self._lock, self._db:
            if session_id is None:
                row = self._db.execute(
                    "SELECT * FROM sessions WHERE player_id=? AND npc_id=? ORDER BY updated_at DESC LIMIT 1",
                    (player_id, npc_id),
                ).fetchone()
            else:
                row = self._db.execute("SELECT * FROM sessions WHERE id=?", (session_id,)).fetchone()
            if row is not None:
                found = SessionRow(*row)
                if (found.player_id, found.npc_id) != (player_id, npc_id):
                    raise SessionMismatch(session_id)
                return found
            new = SessionRow(session_id or uuid.uuid4().hex, player_id, npc_id, now, now)
            self._db.execute("INSERT INTO sessions VALUES (?, ?, ?, ?, ?)", _astuple(new))
            return new

    def get_session(self, session_id: str) -> SessionRow | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM sessions WHERE id=?", (session_id,)).fetchone()
        return SessionRow(*row) if row else None

    def delete_session(self, session_id: str) -> bool:
        with self._lock, self._db:
            return self._db.execute("DELETE FROM sessions WHERE id=?", (session_id,)).rowcount > 0

    def add_turns(self, session_id: str, turns: list[tuple[str, str, dict[str, Any]]]) -> None:
        """Append (role, text, meta) turns atomically: a player line is never stored without its reply."""
        now = time.time()
        with self._lock, self._db:
            self._db.executemany(
                "INSERT INTO turns (session_id, role, text, meta, created_at) VALUES (?, ?, ?, ?, ?)",
                [(session_id, role, text, json.dumps(meta), now) for role, text, meta in turns],
            )
            self._db.execute("UPDATE sessions SET updated_at=? WHERE id=?", (now, session_id))

    def turn_count(self, session_id: str) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM turns WHERE session_id=?", (session_id,)).fetchone()[0])

    def turns(self, session_id: str, limit: int | None = None) -> list[TurnRow]:
        """The session's turns in order; with `limit`, only the latest ones."""
        with self._lock:
            rows = self._db.execute(
                "SELECT role, text, meta, created_at FROM turns WHERE session_id=? ORDER BY id DESC LIMIT ?",
                (session_id, -1 if limit is None else limit),
            ).fetchall()
        return [TurnRow(role, text, json.loads(meta), at) for role, text, meta, at in reversed(rows)]


def _astuple(row: SessionRow) -> tuple[str, str, str, float, float]:
    return (row.id, row.player_id, row.npc_id, row.created_at, row.updated_at)
