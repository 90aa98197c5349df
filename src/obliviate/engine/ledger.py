"""The request ledger: an append-only, hash-chained event log in SQLite (WAL mode).

Each event stores the hash of the previous event, so editing, deleting or reordering any row
breaks the chain at that row. The state of every request (pending, applied, rolled back) is
derived from the events, never stored as a mutable column.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..request import Request

GENESIS = "0" * 64

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    request_id INTEGER,
    payload TEXT NOT NULL,
    model_hash TEXT,
    at TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
"""

EVENT_KINDS = ("init", "add", "apply", "rollback", "evaluate", "attack")


@dataclass(frozen=True)
class Event:
    seq: int
    kind: str
    request_id: int | None
    payload: dict
    model_hash: str | None
    at: str
    prev_hash: str
    hash: str


def _event_hash(seq, kind, request_id, payload_text, model_hash, at, prev_hash) -> str:
    canonical = json.dumps([seq, kind, request_id, payload_text, model_hash, at, prev_hash])
    return hashlib.sha256(canonical.encode()).hexdigest()


class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------ writing
    def append(self, kind: str, payload: dict, request_id: int | None = None, model_hash: str | None = None) -> Event:
        """Append one event atomically; the row is the commit point of whatever it records."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"Unknown ledger event kind {kind!r}; expected one of {EVENT_KINDS}")
        payload_text = json.dumps(payload, sort_keys=True, default=str)
        at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            row = self._db.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
            digest = _event_hash(seq, kind, request_id, payload_text, model_hash, at, prev)
            self._db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (seq, kind, request_id, payload_text, model_hash, at, prev, digest))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return Event(seq, kind, request_id, json.loads(payload_text), model_hash, at, prev, digest)

    # ------------------------------------------------------------------ reading
    def events(self) -> list[Event]:
        rows = self._db.execute("SELECT seq, kind, request_id, payload, model_hash, at, prev_hash, hash FROM events ORDER BY seq")
        return [Event(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], r[6], r[7]) for r in rows]

    def check_chain(self) -> list[str]:
        """Problems with the hash chain, one message per broken row (empty when intact)."""
        problems, prev = [], GENESIS
        rows = self._db.execute("SELECT seq, kind, request_id, payload, model_hash, at, prev_hash, hash FROM events ORDER BY seq").fetchall()
        for index, (seq, kind, request_id, payload_text, model_hash, at, prev_hash, digest) in enumerate(rows, start=1):
            if seq != index:
                problems.append(f"ledger row {seq}: expected sequence number {index} (a row was deleted or inserted)")
            if prev_hash != prev:
                problems.append(f"ledger row {seq} ({kind}): does not link to the row before it (history rewritten)")
            if _event_hash(seq, kind, request_id, payload_text, model_hash, at, prev_hash) != digest:
                problems.append(f"ledger row {seq} ({kind}, request {request_id}): contents do not match its hash (row edited)")
            prev = digest
        return problems


@dataclass(frozen=True)
class LedgerState:
    """What the events say now: requests, the stack of applied ones in model order, and the
    event that produced the current weights."""

    requests: dict[int, Request]
    status: dict[int, str]  # pending | applied | rolled_back
    applied: tuple[int, ...]  # request ids in the order they are in the model
    apply_events: dict[int, Event]  # the apply event currently in force per applied request
    model_event: Event | None  # the last event that set the weights (init, apply or rollback)
    metrics: dict[int, dict]  # latest evaluation per applied request (by request id; 0 = base)

    @property
    def forgotten(self) -> tuple[str, ...]:
        """Targets of the requests now in the model, in order."""
        return tuple(t for rid in self.applied for t in self.requests[rid].targets)

    @property
    def pending(self) -> tuple[int, ...]:
        return tuple(i for i in sorted(self.requests) if self.status[i] == "pending")


def derive_state(events: list[Event]) -> LedgerState:
    requests: dict[int, Request] = {}
    status: dict[int, str] = {}
    applied: list[int] = []
    apply_events: dict[int, Event] = {}
    metrics: dict[int, dict] = {}
    model_event = None
    for e in events:
        if e.kind == "init":
            model_event = e
        elif e.kind == "add":
            requests[e.request_id] = Request.from_json(e.payload["request"])
            status[e.request_id] = "pending"
        elif e.kind == "apply":
            status[e.request_id] = "applied"
            applied.append(e.request_id)
            apply_events[e.request_id] = e
            model_event = e
            if e.payload.get("metrics"):
                metrics[e.request_id] = e.payload["metrics"]
        elif e.kind == "rollback":
            keep = applied.index(e.payload["to"]) + 1 if e.payload["to"] else 0
            for rid in applied[keep:]:
                status[rid] = "rolled_back"
                apply_events.pop(rid)
                metrics.pop(rid, None)
            applied = applied[:keep]
            model_event = e
        elif e.kind == "evaluate":
            metrics[e.payload["after"]] = e.payload["metrics"]
    return LedgerState(requests, status, tuple(applied), apply_events, model_event, metrics)
