"""The request ledger: an append-only, hash-chained event log in SQLite (WAL mode).

Each event stores the hash of the previous event, so editing, deleting or reordering any row
breaks the chain at that row. The state of every request (pending, applied, rolled back) is
derived from the events, never stored as a mutable column.

A chain alone cannot stop someone who rewrites history and recomputes every hash after it, nor
notice that its last rows were cut off. Two anchors close that gap:

- the head (sequence number and hash of the last row), written to ``ledger.head`` beside the
  database at every commit and printed by ``obliviate status``: a head recorded anywhere must
  still be a row of the chain, so rows can be appended but not changed or cut off;
- an optional key (``OBLIVIATE_LEDGER_KEY`` or ``OBLIVIATE_LEDGER_KEY_FILE``, never stored):
  each row, and the head in ``ledger.head``, then carries HMAC-SHA256(key, hash), which nobody
  without the key can forge.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..errors import LedgerError
from ..request import Request
from .files import atomic_write_text

GENESIS = "0" * 64
HEAD_FILE = "ledger.head"
KEY_VARIABLE = "OBLIVIATE_LEDGER_KEY"
KEY_FILE_VARIABLE = "OBLIVIATE_LEDGER_KEY_FILE"

SCHEMA = """CREATE TABLE events (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    request_id INTEGER,
    payload TEXT NOT NULL,
    model_hash TEXT,
    at TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    mac TEXT
)"""

EVENT_KINDS = ("init", "add", "apply", "rollback", "evaluate", "attack")
_COLUMNS = "seq, kind, request_id, payload, model_hash, at, prev_hash, hash"


def ledger_key() -> bytes | None:
    """The signing key from the environment: ``OBLIVIATE_LEDGER_KEY`` (the key itself) or
    ``OBLIVIATE_LEDGER_KEY_FILE`` (a file holding it); None when neither is set."""
    if os.environ.get(KEY_VARIABLE):
        return os.environ[KEY_VARIABLE].encode()
    if os.environ.get(KEY_FILE_VARIABLE):
        path = Path(os.environ[KEY_FILE_VARIABLE])
        if not path.is_file():
            raise FileNotFoundError(f"{KEY_FILE_VARIABLE} names {path}, which is not a file; point it at the ledger key.")
        key = path.read_bytes().strip()
        if not key:
            raise ValueError(f"The ledger key file {path} is empty.")
        return key
    return None


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


@dataclass(frozen=True)
class Head:
    """The last row of the chain, as ``status`` prints it and ``verify --expect`` takes it."""

    seq: int
    hash: str

    def __str__(self) -> str:
        return f"{self.seq}:{self.hash}"

    @classmethod
    def parse(cls, text: str) -> "Head":
        match = re.fullmatch(r"\s*(\d{1,18}):([0-9a-f]{64})\s*", text)
        if not match:
            raise ValueError(f"{text[:80]!r} is not a ledger head; expected SEQ:HASH as `obliviate status` prints it "
                             "(a row number, a colon and 64 hex digits).")
        return cls(int(match[1]), match[2])


def _event_hash(seq, kind, request_id, payload_text, model_hash, at, prev_hash) -> str:
    canonical = json.dumps([seq, kind, request_id, payload_text, model_hash, at, prev_hash])
    return hashlib.sha256(canonical.encode()).hexdigest()


def _signature(key: bytes, digest: str) -> str:
    return hmac.new(key, digest.encode(), hashlib.sha256).hexdigest()


def _signed_by(key: bytes, digest, mac) -> bool:
    """Whether ``mac`` (as stored: any type, if someone edited it) signs ``digest`` with ``key``."""
    return isinstance(mac, str) and isinstance(digest, str) and hmac.compare_digest(mac, _signature(key, digest))


def _normalised(sql: str | None) -> str:
    return " ".join((sql or "").split())


class Ledger:
    """Opens an existing ledger (``create`` makes a new one). ``key`` signs appended rows and must
    be the key the ledger was signed with, if any."""

    def __init__(self, path: str | Path, key: bytes | None = None, create: bool = False):
        self.path = Path(path)
        self.key = key
        if not create and not self.path.is_file():
            raise LedgerError(f"{self.path} is missing: the store has lost its history. Restore it from a backup.")
        mode = "rwc" if create else "rw"
        try:
            self._db = sqlite3.connect(f"file:{self.path}?mode={mode}", uri=True, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA trusted_schema=OFF")  # no functions or virtual tables run from the schema
            if create:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute(SCHEMA)
            self._check_schema()
            self._db.execute("PRAGMA synchronous=FULL")
        except sqlite3.DatabaseError as error:
            raise LedgerError(f"{self.path} is not a readable ledger database ({error}). "
                              "Restore it from a backup; obliviate will not work on a damaged history.") from None

    def _check_schema(self) -> None:
        """Refuse anything obliviate did not create: a trigger or view would run inside our writes."""
        objects = self._db.execute("SELECT type, name, sql FROM sqlite_master").fetchall()
        unexpected = [f"{kind} {name!r}" for kind, name, sql in objects
                      if (kind, name) != ("table", "events") or _normalised(sql) != _normalised(SCHEMA)]
        if unexpected or not objects:
            found = ", ".join(unexpected) if unexpected else "no events table"
            raise LedgerError(f"{self.path} does not have the schema obliviate creates (found {found}). "
                              "Someone changed the database; restore it from a backup.")

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
            row = self._db.execute("SELECT seq, hash, mac FROM events ORDER BY seq DESC LIMIT 1").fetchone()
            if row:
                self._check_signing(row[1], row[2])
            seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
            digest = _event_hash(seq, kind, request_id, payload_text, model_hash, at, prev)
            mac = _signature(self.key, digest) if self.key else None
            self._db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (seq, kind, request_id, payload_text, model_hash, at, prev, digest, mac))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        # fold the write-ahead log into the database now: ledger.sqlite alone then holds the whole
        # history (for backups), and no later reader changes its bytes by checkpointing on close
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        head_mac = _signature(self.key, f"head {Head(seq, digest)}") if self.key else ""
        atomic_write_text(f"{Head(seq, digest)} {head_mac}".strip() + "\n", self.path.parent / HEAD_FILE)
        return Event(seq, kind, request_id, json.loads(payload_text), model_hash, at, prev, digest)

    def _check_signing(self, last_hash: str, last_mac: str | None) -> None:
        """A signed ledger stays signed, with its own key; an unsigned one stays unsigned."""
        if last_mac and not self.key:
            raise LedgerError(f"{self.path} is signed; set {KEY_VARIABLE} or {KEY_FILE_VARIABLE} to its key to write to it.")
        if last_mac and not _signed_by(self.key, last_hash, last_mac):
            raise LedgerError(f"The key in {KEY_VARIABLE}/{KEY_FILE_VARIABLE} is not the key {self.path} was signed with.")
        if not last_mac and self.key:
            raise LedgerError(f"{self.path} is not signed, but a ledger key is set; unset {KEY_VARIABLE} and "
                              f"{KEY_FILE_VARIABLE} to write to it, or create a new store with the key set.")

    # ------------------------------------------------------------------ reading
    def events(self) -> list[Event]:
        events = []
        for r in self._db.execute(f"SELECT {_COLUMNS} FROM events ORDER BY seq"):
            try:
                events.append(Event(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], r[6], r[7]))
            except (TypeError, ValueError):
                raise LedgerError(f"{self.path}: row {r[0]} holds a payload that is not JSON (the row was edited). "
                                  "Restore the ledger from a backup.") from None
        return events

    def head(self) -> Head | None:
        row = self._db.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        return Head(*row) if row else None

    def check_recorded_head(self) -> list[str]:
        """The head written beside the database at each commit must be in the chain and, with a
        key, carry its signature. A crash between commit and this write leaves it one row behind,
        which is still in the chain."""
        path = self.path.parent / HEAD_FILE
        if not path.is_file():
            return [f"{path} is missing (it records the ledger's last row at each commit)"]
        head_text, _, mac = path.read_text().strip().partition(" ")
        try:
            head = Head.parse(head_text)
        except ValueError:
            return [f"{path} is damaged: {head_text[:80]!r} is not SEQ:HASH"]
        if self.key and self.signed and not _signed_by(self.key, f"head {head}", mac):
            return [f"{path} is not signed with the ledger key (the head was rewritten)"]
        return self.check_head(head, HEAD_FILE)

    @property
    def signed(self) -> bool:
        return self._db.execute("SELECT mac FROM events ORDER BY seq LIMIT 1").fetchone() not in (None, (None,))

    def check_chain(self) -> list[str]:
        """Problems with the hash chain, one message per broken row (empty when intact)."""
        problems, prev = [], GENESIS
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM events ORDER BY seq").fetchall()
        for index, (seq, kind, request_id, payload_text, model_hash, at, prev_hash, digest) in enumerate(rows, start=1):
            if seq != index:
                problems.append(f"ledger row {seq}: expected sequence number {index} (a row was deleted or inserted)")
            if prev_hash != prev:
                problems.append(f"ledger row {seq} ({kind}): does not link to the row before it (history rewritten)")
            if _event_hash(seq, kind, request_id, payload_text, model_hash, at, prev_hash) != digest:
                problems.append(f"ledger row {seq} ({kind}, request {request_id}): contents do not match its hash (row edited)")
            prev = digest
        return problems

    def check_signatures(self) -> list[str]:
        """Rows whose signature is missing or was not made with this ledger's key: with the key,
        a history rewritten and rechained by someone without it shows here."""
        if not self.signed:
            return [f"{self.path} is not signed, but a ledger key is set: the store was made without a key, "
                    "or its signatures were stripped"]
        problems = []
        for seq, digest, mac in self._db.execute("SELECT seq, hash, mac FROM events ORDER BY seq"):
            if mac is None:
                problems.append(f"ledger row {seq} is not signed (a signed ledger signs every row)")
            elif not _signed_by(self.key, digest, mac):
                problems.append(f"ledger row {seq}: signature does not match (row forged, or signed with another key)")
        return problems

    def check_head(self, head: Head, source: str) -> list[str]:
        """A head recorded earlier must still be in the chain: history may grow, never change or shrink."""
        row = self._db.execute("SELECT hash FROM events WHERE seq = ?", (head.seq,)).fetchone()
        if row is None:
            return [f"ledger row {head.seq} named by {source} is gone (rows were deleted from the end of the ledger)"]
        if row[0] != head.hash:
            return [f"ledger row {head.seq} does not have the hash {source} recorded (history rewritten)"]
        return []


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
