"""A persistent store of rank1 judgements in one SQLite file.

A judgement costs seconds to minutes of GPU time, so every finished batch is written here and
looked up before any new generation. Rows are keyed by two hashes:

* ``settings_key``: everything that determines a judgement (model, a fingerprint of its weights,
  revision, quantization, dtype, max_new_tokens, context_size, prompt template, ...). The settings
  themselves are kept in the ``settings`` table, so ``SELECT * FROM settings`` tells what a key means.
* ``pair_key``: the exact final query text and passage text the model read.

Durability and concurrency:

* WAL journal mode (the default, ``journal="wal"``) with ``synchronous=NORMAL``: a commit is in the WAL
  file (in the OS page cache) before ``put_many`` returns, so a process crash or SIGKILL never loses a
  committed batch and never corrupts the file; only an OS crash or power loss can drop the last few
  commits (still without corruption). Each ``put_many`` is one transaction, so a kill loses at most the
  batch in flight. WAL needs shared memory between the processes using the file, so it works on one
  machine only.
* ``journal="delete"``: SQLite's rollback journal, for a file on a network filesystem (NFS, Lustre, ...):
  safe there as long as one process writes the file and nobody reads it while that writer runs. The
  rerank CLI gives every shard job and every launcher rank its own file in this mode.
* ``readonly=True`` opens an existing store to look judgements up and never writes to it (no schema, no
  journal change), e.g. another job's finished store on a shared filesystem.
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

from ..errors import Rank1Error
from ..judgement import Judgement

# Well under SQLite's bound-parameter limit (999 in old builds).
_CHUNK = 500
# "wal": fast, one machine only; "delete": SQLite's rollback journal, safe on network filesystems.
JOURNAL_MODES = ("wal", "delete")
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


def settings_difference(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """One ``"name: X in the store, Y in this run"`` line per setting that differs (sorted by name)."""
    absent = object()
    out = []
    for name in sorted(set(stored) | set(wanted)):
        a, b = stored.get(name, absent), wanted.get(name, absent)
        if a != b:
            there, here = ("absent" if v is absent else _short(v) for v in (a, b))
            out.append(f"{name}: {there} in the store, {here} in this run")
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit - 3] + "..."


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

    def __init__(self, path: str | Path, busy_timeout_s: float = 60.0, *, journal: str = "wal",
                 readonly: bool = False) -> None:
        self.path = Path(path)
        if journal not in JOURNAL_MODES:
            raise ValueError(f"journal must be one of {JOURNAL_MODES}, got {journal!r}")
        self.readonly = readonly
        if readonly:
            self._open_readonly(busy_timeout_s)
            return
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
            self._set_journal(journal, busy_timeout_s)
            self._conn.execute("PRAGMA synchronous = NORMAL")
            with self._transaction():
                self._create_schema()
        except (sqlite3.Error, Rank1Error) as e:
            self._conn.close()
            if isinstance(e, Rank1Error):
                raise
            raise Rank1Error(f"cannot use the judgement store {self.path}: {e}") from e

    def _open_readonly(self, busy_timeout_s: float) -> None:
        if not self.path.is_file():
            raise Rank1Error(f"judgement store {self.path} does not exist")
        try:
            self._conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                         timeout=busy_timeout_s, isolation_level=None,
                                         check_same_thread=False)
            self._lock = threading.RLock()
            tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.Error as e:
            raise Rank1Error(f"cannot read the judgement store {self.path}: {e}") from e
        if not {"settings", "judgements"} <= tables:
            self._conn.close()
            raise Rank1Error(f"{self.path} is not a rank1-hf judgement store (no judgements table)")

    def _set_journal(self, journal: str, busy_timeout_s: float) -> None:
        """Switch the file to the journal mode asked for (a no-op when it already is in it).

        While another process is switching a fresh file, SQLite answers "database is locked" at
        once, without calling the busy handler, so the wait is done here.
        """
        deadline = time.monotonic() + busy_timeout_s
        while True:
            try:
                mode = self._conn.execute(f"PRAGMA journal_mode = {journal.upper()}").fetchone()[0]
                break
            except sqlite3.OperationalError as e:
                if e.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        if mode.lower() != journal:
            raise sqlite3.OperationalError(f"could not switch to the {journal} journal mode (got {mode})")

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

    def all_settings(self) -> dict[str, dict[str, Any]]:
        """Every settings record in the store: key -> settings."""
        with self._lock:
            rows = self._conn.execute("SELECT key, settings_json FROM settings").fetchall()
        return {key: json.loads(text) for key, text in rows}

    def check_settings(self, settings: Mapping[str, Any]) -> None:
        """Refuse (Rank1Error) a store that holds judgements, none of them made with ``settings``.

        For a store given only to reuse judgements from: one made with other settings is most likely the
        wrong file, and it would silently contribute nothing. The message names the settings that differ.
        """
        key = settings_key(settings)
        with self._lock:
            used = [r[0] for r in self._conn.execute("SELECT DISTINCT settings_key FROM judgements")]
        if not used or key in used:
            return
        recorded = self.all_settings()
        diffs = [settings_difference(recorded[k], settings) for k in used if k in recorded]
        closest = min(diffs, key=len) if diffs else []
        detail = "; ".join(closest) if closest else f"settings key {used[0]} (not recorded), this run {key}"
        raise Rank1Error(f"judgement store {self.path} was made with other settings than this run: {detail}")

    def has_many(self, settings_key: str, pair_keys: Iterable[str]) -> set[str]:
        """Which of ``pair_keys`` are stored (reads the keys only, not the judgements)."""
        keys = list(dict.fromkeys(pair_keys))
        found: set[str] = set()
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start:start + _CHUNK]
            marks = ", ".join("?" * len(chunk))
            with self._lock:
                rows = self._conn.execute(
                    f"SELECT pair_key FROM judgements WHERE settings_key = ? AND pair_key IN ({marks})",
                    (settings_key, *chunk),
                ).fetchall()
            found.update(r[0] for r in rows)
        return found

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

