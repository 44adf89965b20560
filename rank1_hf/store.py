"""A persistent store of rank1 judgements in one SQLite file.

A judgement costs seconds to minutes of GPU time, so every finished batch is written here and
looked up before any new generation. Rows are keyed by two hashes:

* ``settings_key``: everything that determines a judgement (model, revision, quantization, dtype,
  max_new_tokens, context_size, prompt template, ...). The settings themselves are kept in the
  ``settings`` table, so ``SELECT * FROM settings`` tells what a key means.
* ``pair_key``: the exact final query text and passage text the model read.

Durability and concurrency:

* WAL journal mode with ``synchronous=NORMAL``: a commit is in the WAL file (in the OS page cache)
  before ``put_many`` returns, so a process crash or SIGKILL never loses a committed batch and never
  corrupts the file; only an OS crash or power loss can drop the last few commits (still without
  corruption). Each ``put_many`` is one transaction, so a kill loses at most the batch in flight.
* One store object may be used from several threads (a web service's workers): its connection is
  shared behind a lock, so transactions never interleave.
* Writers take the write lock up front (``BEGIN IMMEDIATE``) and wait up to ``busy_timeout_s`` for
  it, so several processes can share one store: they queue instead of failing with
  "database is locked".
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Iterable, Iterator, Mapping, Sequence

from .errors import Rank1Error
from .judgement import Judgement

# Well under SQLite's bound-parameter limit (999 in old builds).
_CHUNK = 500
# Optional per-row trace columns a caller may fill through put_many(meta=...).
META_FIELDS = ("qid", "docid", "elapsed_s")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    settings_json TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS judgements (
    settings_key TEXT NOT NULL,
    pair_key TEXT NOT NULL,
    score REAL NOT NULL,
    outcome TEXT NOT NULL,
    reasoning TEXT NOT NULL,
    reasoning_tokens INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    true_logit REAL,
    false_logit REAL,
    truncated INTEGER NOT NULL,
    qid TEXT,
    docid TEXT,
    created REAL NOT NULL,
    elapsed_s REAL,
    PRIMARY KEY (settings_key, pair_key)
);
"""

_JUDGEMENT_COLUMNS = (
    "score", "outcome", "reasoning", "reasoning_tokens", "prompt_tokens",
    "true_logit", "false_logit", "truncated",
)


def _canonical_json(settings: Mapping[str, Any]) -> str:
    """JSON that is byte-identical for equal dicts, whatever their key order."""
    try:
        return json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"settings must be plain JSON values (str, int, float, bool, None, "
                        f"lists, dicts): {e}") from e


def settings_key(settings: Mapping[str, Any]) -> str:
    """A stable 16-hex-digit key for everything that determines a judgement.

    The caller builds ``settings``; any changed value (or added/removed field) gives another key.
    """
    return hashlib.sha256(_canonical_json(settings).encode("utf-8")).hexdigest()[:16]


def pair_key(query: str, passage: str) -> str:
    """The sha256 hex of the exact final query text and passage text.

    The query is length-prefixed so that no split of the same characters between query and passage
    (not even one involving a separator character) can collide.
    """
    q = query.encode("utf-8")
    h = hashlib.sha256()
    h.update(f"{len(q)}:".encode("ascii"))
    h.update(q)
    h.update(passage.encode("utf-8"))
    return h.hexdigest()


def _check_floats(j: Judgement) -> None:
    # SQLite stores NaN as NULL, which would come back as None (or break NOT NULL): refuse it here.
    for name in ("score", "true_logit", "false_logit"):
        v = getattr(j, name)
        if v is not None and math.isnan(v):
            raise ValueError(f"Judgement.{name} is NaN; it cannot be stored")


class JudgementStore:
    """Judgements on disk, keyed by (settings_key, pair_key); safe to share between processes.

    Use as a context manager, or call ``close()``.
    """

    def __init__(self, path: str | Path, busy_timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: no implicit transactions; put_many opens its own. Threads share the
            # connection behind self._lock (sqlite3 refuses cross-thread use unless told otherwise).
            self._conn = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None,
                                         check_same_thread=False)
            self._lock = threading.RLock()
        except (OSError, sqlite3.Error) as e:
            raise Rank1Error(f"cannot open the judgement store {self.path}: {e}") from e
        try:
            # busy_timeout first, so that the statements below also wait for other processes.
            self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            self._use_wal(busy_timeout_s)
            self._conn.execute("PRAGMA synchronous = NORMAL")
            with self._transaction():
                self._create_schema()
        except (sqlite3.Error, Rank1Error) as e:
            self._conn.close()
            if isinstance(e, Rank1Error):
                raise
            raise Rank1Error(f"cannot use the judgement store {self.path}: {e}") from e

    def _use_wal(self, busy_timeout_s: float) -> None:
        """Switch the file to WAL mode (a no-op when it already is).

        While another process is switching a fresh file, SQLite answers "database is locked" at
        once, without calling the busy handler, so the wait is done here.
        """
        deadline = time.monotonic() + busy_timeout_s
        while True:
            try:
                mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as e:
                if e.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        if mode.lower() != "wal":
            raise sqlite3.OperationalError(f"could not switch to WAL journal mode (got {mode})")

    def _create_schema(self) -> None:
        # executescript() would commit our transaction, so run the statements one by one.
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                self._conn.execute(statement)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error).

        IMMEDIATE takes the write lock at the start, where busy_timeout makes us wait for it; a
        deferred transaction that upgrades from read to write can fail at once with SQLITE_BUSY.
        """
        try:
            with self._lock:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield
                except BaseException:
                    # SQLite may already have rolled back by itself (e.g. disk full).
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
        except sqlite3.OperationalError as e:
            # Disk full, read-only file, lock held past busy_timeout...: the user's to fix.
            raise Rank1Error(f"cannot write to the judgement store {self.path}: {e}") from e

    def register_settings(self, settings: Mapping[str, Any]) -> str:
        """Record ``settings`` under its key (once) and return the key."""
        key = settings_key(settings)
        with self._transaction():
            self._conn.execute(
                "INSERT OR IGNORE INTO settings (key, settings_json, created) VALUES (?, ?, ?)",
                (key, _canonical_json(settings), time.time()),
            )
        return key

    def get_settings(self, key: str) -> dict[str, Any] | None:
        """The settings recorded under ``key``, or None if never registered."""
        with self._lock:
            row = self._conn.execute("SELECT settings_json FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def get_many(self, settings_key: str, pair_keys: Iterable[str]) -> dict[str, Judgement]:
        """The stored judgements among ``pair_keys`` (missing ones are simply absent)."""
        keys = list(dict.fromkeys(pair_keys))
        found: dict[str, Judgement] = {}
        cols = ", ".join(_JUDGEMENT_COLUMNS)
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start:start + _CHUNK]
            marks = ", ".join("?" * len(chunk))
            with self._lock:
                rows = self._conn.execute(
                    f"SELECT pair_key, {cols} FROM judgements"
                    f" WHERE settings_key = ? AND pair_key IN ({marks})",
                    (settings_key, *chunk),
                ).fetchall()
            for pk, *values in rows:
                d = dict(zip(_JUDGEMENT_COLUMNS, values))
                d["truncated"] = bool(d["truncated"])
                found[pk] = Judgement.from_dict(d)
        return found

    def put_many(
        self,
        settings_key: str,
        items: Sequence[tuple[str, Judgement]],
        meta: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> int:
        """Store a batch in one transaction (all or nothing); returns how many rows were new.

        A pair already stored under ``settings_key`` is left as it is (its first judgement and
        creation time are kept), so writing the same pair twice, or from two processes, is harmless.
        ``meta`` optionally maps a pair_key to trace fields: ``qid``, ``docid``, ``elapsed_s``.
        """
        meta = meta or {}
        now = time.time()
        rows = []
        for pk, j in items:
            _check_floats(j)
            m = meta.get(pk, {})
            unknown = set(m) - set(META_FIELDS)
            if unknown:
                raise ValueError(f"unknown meta fields {sorted(unknown)}; known: {META_FIELDS}")
            d = j.to_dict()
            rows.append((settings_key, pk, *(d[c] for c in _JUDGEMENT_COLUMNS),
                         m.get("qid"), m.get("docid"), now, m.get("elapsed_s")))
        cols = ("settings_key", "pair_key", *_JUDGEMENT_COLUMNS, "qid", "docid", "created",
                "elapsed_s")
        sql = (f"INSERT OR IGNORE INTO judgements ({', '.join(cols)})"
               f" VALUES ({', '.join('?' * len(cols))})")
        with self._transaction():
            cur = self._conn.executemany(sql, rows)
        return cur.rowcount

    def count(self, settings_key: str) -> int:
        """How many judgements are stored under ``settings_key``."""
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM judgements WHERE settings_key = ?",
                                      (settings_key,)).fetchone()[0]

    def close(self) -> None:
        """Close the connection (the last one to close folds the WAL back into the file)."""
        self._conn.close()

    def __enter__(self) -> "JudgementStore":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

