"""Reusing judgements: what the stores already hold, each distinct text judged once, new ones committed as
they come. The one path for ``Rank1(store=...)``, the pipeline (:func:`rank1_hf.pipeline.judge_items`)
and the server.

A pair's key is :func:`rank1_hf.io.store.pair_key` of its final query text (instruction joined, dataset
prompt applied) and its passage text, under the settings key of the ranker's
:meth:`~rank1_hf.ranker.Rank1.settings`; two pairs with the same key are the same judgement.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from ..judgement import Judgement
from ..prompt import Pair, query_text, unpack_pair
from .store import JudgementStore, pair_key


def text_key(query: str, passage: str, instruction: str | None, dataset_prompt: str | None) -> str:
    """The store key of one pair's texts: its final query text (instruction joined, dataset prompt applied)
    and its passage text."""
    return pair_key(query_text(query, instruction, dataset_prompt), passage)


def pair_keys(pairs: Sequence[Pair], dataset_prompt: str | None) -> list[str]:
    """The store key of each pair (checked and unpacked as judging unpacks it)."""
    return [pair_key(*unpack_pair(pair, dataset_prompt)) for pair in pairs]


@dataclass
class Reuse:
    """Which of a call's pairs are stored and which are left to judge (nothing judged, nothing read)."""

    keys: list[str]  # every pair's key, in input order
    first: dict[str, int]  # the first input index of each distinct key wanted, in input order
    found: set[str]  # distinct wanted keys some store holds
    todo: list[str]  # distinct wanted keys left to judge, in input order


def plan(keys: Sequence[str], stores: Sequence[JudgementStore], settings_key: str,
         wanted: Callable[[str], bool] = lambda key: True) -> Reuse:
    """Look the ``wanted`` keys up in ``stores`` (keys only, so planning a huge job needs little memory)."""
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key not in first and wanted(key):
            first[key] = i
    found: set[str] = set()
    for store in stores:
        found |= store.has_many(settings_key, (key for key in first if key not in found))
    return Reuse(list(keys), first, found, [key for key in first if key not in found])


def fetch(stores: Sequence[JudgementStore], settings_key: str, keys: Iterable[str]) -> dict[str, Judgement]:
    """The judgements of ``keys``, each from the first store that holds it."""
    wanted = set(keys)
    got: dict[str, Judgement] = {}
    for store in stores:
        if not wanted:
            break
        found = store.get_many(settings_key, wanted)
        got.update(found)
        wanted -= found.keys()
    return got


class Writer:
    """Buffers finished judgements and commits them in small transactions.

    A commit happens once ``every`` judgements are waiting, or when a judgement arrives ``seconds`` or
    more after the oldest waiting one, and always on :meth:`flush` (call it in a ``finally``). So a
    SIGKILL loses at most ``every - 1`` finished judgements plus the ones in flight; a commit per
    judgement (``every=1``) costs a few milliseconds, nothing next to a judgement's seconds.
    """

    def __init__(self, store: JudgementStore, settings_key: str, every: int = 1, seconds: float = 5.0) -> None:
        self.store, self.key, self.every, self.seconds = store, settings_key, max(1, every), seconds
        self.buffer: list[tuple[str, Judgement]] = []
        self.meta: dict[str, dict[str, Any]] = {}
        self.since = time.monotonic()
        self.written = 0

    def add(self, key: str, judgement: Judgement, meta: dict[str, Any] | None = None) -> None:
        if not self.buffer:
            self.since = time.monotonic()
        self.buffer.append((key, judgement))
        if meta is not None:
            self.meta[key] = meta
        if len(self.buffer) >= self.every or time.monotonic() - self.since >= self.seconds:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.store.put_many(self.key, self.buffer, self.meta or None)
            self.written += len(self.buffer)
            self.buffer, self.meta = [], {}
