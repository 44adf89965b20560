"""The rerank job as plain functions: first-stage run in, rank1 judgements, reranked run out.

Usable from Python as well as from the CLI::

    from rank1_hf import Rank1
    from rank1_hf.pipeline import load_items, judge_items, reranked_run, trace_rows
    from rank1_hf.store import JudgementStore

    items = load_items("run.trec", "queries.jsonl", "corpus.jsonl", top_k=100)
    ranker = Rank1("jhu-clsp/rank1-7b")
    with JudgementStore("judgements.sqlite") as store:
        result = judge_items(ranker, items, store)
    run = reranked_run(items, result.judgements)

Resuming: every judgement is written to the :class:`~rank1_hf.store.JudgementStore` in small
transactions as it finishes (every ``flush_every`` judgements or ``flush_seconds``, and always on the
way out, KeyboardInterrupt included), and looked up there before anything is generated. Rerunning the
same job after a crash or a SIGKILL recomputes only the pairs that were in flight.

Data parallel: started N times with ``RANK``/``WORLD_SIZE`` set (``accelerate launch``, ``torchrun``),
each process judges a deterministic shard of the pairs into the same store, and rank 0 polls the store
until every pair is there, then builds the outputs, identical to a single-process run. No
``torch.distributed`` is needed: the SQLite store (WAL journal, busy timeout) is the only thing the
processes share. It must therefore be on a filesystem all of them see, with working POSIX locks: a local
disk on one machine. SQLite over NFS is not safe; for several machines, give each machine its own store
and its own slice of the queries (separate run files), or put one machine's store on a shared local disk.

Ranking rule: :func:`rank1_hf.runs.ranked` (score descending, ties by docid descending, as trec_eval
re-sorts), for the first-stage top-k, the reranked run, the traces and the evaluation alike, so the file on
disk, the traces and every evaluation tool agree. Only the top-k pairs are reranked and written. The run
file's scores are made strictly decreasing (:func:`rank1_hf.runs.untied_scores`); the traces keep each
judgement's raw score.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from . import runs
from .errors import Rank1Error
from .judgement import Judgement
from .prompt import query_text
from .store import JudgementStore, pair_key

if TYPE_CHECKING:  # importing the ranker pulls in torch; the pipeline itself does not need it
    from .ranker import Rank1

logger = logging.getLogger(__name__)

TRACE_FIELDS = (
    "qid", "docid", "score", "outcome", "reasoning", "reasoning_tokens", "prompt_tokens", "truncated",
    "true_logit", "false_logit",
)


@dataclass(frozen=True)
class Item:
    """One (query, passage) pair of the first-stage run, with its texts."""

    qid: str
    docid: str
    query: str
    passage: str
    instruction: str | None
    first_stage_rank: int  # 1-based, within its query after top_k
    first_stage_score: float


@dataclass(frozen=True)
class Shard:
    """Which slice of the work this process does: pair i (in job order) belongs to rank i % world_size."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Shard":
        """The shard set by ``accelerate launch`` / ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK), else 0 of 1."""
        env = os.environ if env is None else env
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise Rank1Error("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
        if world < 1 or not 0 <= rank < world:
            raise Rank1Error(f"bad RANK={rank} / WORLD_SIZE={world}")
        return cls(rank, world, local)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class Summary:
    """What a job did. Counts of judgements are of distinct texts (identical pairs are judged once)."""

    pairs: int = 0
    distinct: int = 0
    reused: int = 0  # found in the store when the job started
    judged_now: int = 0  # missing when the job started (by all processes together)
    judged_here: int = 0  # by this process
    outcomes: Counter = field(default_factory=Counter)
    truncated: list[tuple[str, str]] = field(default_factory=list)
    elapsed_s: float = 0.0
    judging_s: float = 0.0  # time this process spent in judge_iter

    @property
    def pairs_per_s(self) -> float | None:
        """Judgements made per second of wall time (None when nothing was judged)."""
        return self.judged_now / self.elapsed_s if self.judged_now and self.elapsed_s > 0 else None

    def lines(self) -> list[str]:
        """Human-readable ``key: value`` lines (stable keys: tests and scripts read them)."""
        rate = f"{self.pairs_per_s:.2f} pairs/s" if self.pairs_per_s is not None else "no pairs judged"
        out = [
            f"pairs: {self.pairs}" + (f" ({self.distinct} distinct texts)" if self.distinct != self.pairs else ""),
            f"reused from store: {self.reused}",
            f"judged now: {self.judged_now}",
            "outcomes: " + ", ".join(f"{k} {self.outcomes.get(k, 0)}" for k in ("answered", "forced", "fallback")),
            f"truncated: {len(self.truncated)}",
            f"elapsed: {self.elapsed_s:.1f} s ({rate})",
        ]
        if self.truncated:
            # Passages longer than the context were cut (passage only, template kept whole); name a few.
            names = ", ".join(f"{q}/{d}" for q, d in self.truncated[:10])
            more = f" and {len(self.truncated) - 10} more" if len(self.truncated) > 10 else ""
            out[4] += f" (passage cut to fit context_size: {names}{more})"
        return out


@dataclass
class Result:
    """Judgements per (qid, docid) for every item (only this shard's on a rank other than 0)."""

    judgements: dict[tuple[str, str], Judgement]
    summary: Summary


# ---------------------------------------------------------------------------------------------- items


def build_items(
    run: Mapping[str, Sequence[tuple[str, float]]],
    queries: Mapping[str, str],
    corpus: Mapping[str, str],
    instructions: Mapping[str, str] | None = None,
    top_k: int | None = None,
    run_path: runs.PathLike | None = None,
) -> list[Item]:
    """The job's pairs, query by query (sorted qid), each in first-stage order, cut to ``top_k``.

    Unknown qids/docids, empty texts and a repeated (qid, docid) are :class:`Rank1Error`.
    """
    if top_k is not None and top_k < 1:
        raise Rank1Error(f"top_k must be at least 1, got {top_k}")
    runs.check_run(run, queries, corpus, run_path)
    instructions = instructions or {}
    items: list[Item] = []
    for qid in sorted(run):
        ranked = runs.ranked(run[qid])[:top_k]
        seen: set[str] = set()
        for rank, (docid, score) in enumerate(ranked, 1):
            if docid in seen:
                raise Rank1Error(f"{run_path or 'run'}: duplicate pair qid {qid!r} docid {docid!r}")
            seen.add(docid)
            query, passage = queries[qid], corpus[docid]
            if not query.strip():
                raise Rank1Error(f"qid {qid!r} has an empty query")
            if not passage.strip():
                raise Rank1Error(f"docid {docid!r} has an empty passage")
            items.append(Item(qid, docid, query, passage, instructions.get(qid), rank, float(score)))
    return items


def load_items(
    run: runs.PathLike,
    queries: runs.PathLike,
    corpus: runs.PathLike,
    instructions: runs.PathLike | None = None,
    top_k: int | None = None,
) -> list[Item]:
    """Read the job's files (see :mod:`rank1_hf.runs` for the formats) and build its items."""
    first_stage = runs.read_run(run, top_k)
    return build_items(
        first_stage,
        runs.read_queries(queries),
        runs.read_corpus(corpus),
        runs.read_instructions(instructions) if instructions is not None else None,
        top_k,
        run_path=run,
    )


def item_key(ranker: "Rank1", item: Item) -> str:
    """The store's pair key: the final query text (instruction joined, dataset prompt applied) and passage."""
    return pair_key(query_text(item.query, item.instruction, ranker.dataset_prompt), item.passage)


# ---------------------------------------------------------------------------------------------- judging


class _Writer:
    """Buffers finished judgements and commits them in small transactions.

    A commit happens once ``every`` judgements are waiting, or when a judgement arrives ``seconds`` or
    more after the oldest waiting one, and always in :func:`judge_items`' ``finally``. So a SIGKILL (which
    skips ``finally``) loses at most ``every - 1`` finished judgements plus the ones in flight; a commit
    per judgement (``every=1``) costs a few milliseconds, nothing next to a judgement's seconds.
    """

    def __init__(self, store: JudgementStore, key: str, every: int, seconds: float) -> None:
        self.store, self.key, self.every, self.seconds = store, key, max(1, every), seconds
        self.buffer: list[tuple[str, Judgement]] = []
        self.meta: dict[str, dict[str, Any]] = {}
        self.since = time.monotonic()
        self.written = 0

    def add(self, pk: str, judgement: Judgement, qid: str, docid: str) -> None:
        if not self.buffer:
            self.since = time.monotonic()
        self.buffer.append((pk, judgement))
        self.meta[pk] = {"qid": qid, "docid": docid}
        if len(self.buffer) >= self.every or time.monotonic() - self.since >= self.seconds:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.store.put_many(self.key, self.buffer, self.meta)
            self.written += len(self.buffer)
            self.buffer, self.meta = [], {}


def judge_items(
    ranker: "Rank1",
    items: Sequence[Item],
    store: JudgementStore,
    *,
    batch_size: int | None = None,
    flush_every: int | None = None,
    flush_seconds: float = 5.0,
    shard: Shard | None = None,
    progress: Callable[[int], Any] | None = None,
    on_start: Callable[[int, int], Any] | None = None,
    poll_seconds: float = 1.0,
    wait_timeout_s: float | None = None,
) -> Result:
    """Judge every item, reusing the store; returns the judgements per (qid, docid) and a summary.

    Args:
        batch_size: pairs decoded together (the ranker's default when None).
        flush_every: judgements per store transaction (default: the batch size).
        flush_seconds: commit at least this often while judgements keep coming.
        shard: this process's slice (default: from the RANK/WORLD_SIZE environment).
        progress: called with 1 per judgement made by this process (e.g. a tqdm bar's ``update``).
        on_start: called once with (pairs this process will judge, pairs reused) before judging.
        poll_seconds, wait_timeout_s: how rank 0 of several waits for the others' judgements (forever
            when wait_timeout_s is None; a Rank1Error after it).
    """
    started = time.monotonic()
    shard = shard or Shard.from_env()
    if len({(it.qid, it.docid) for it in items}) != len(items):
        raise Rank1Error("duplicate (qid, docid) pairs in the items")
    skey = store.register_settings(ranker.settings())
    keys = [item_key(ranker, it) for it in items]
    # First item per distinct text, in job order: identical texts under different ids are judged once.
    first: dict[str, Item] = {}
    for pk, it in zip(keys, items):
        first.setdefault(pk, it)
    distinct = list(first)
    found = store.get_many(skey, distinct)
    # Shard over all distinct pairs, not over the missing ones: processes start at different times and
    # see different "missing" sets, and a split of those could leave a pair to nobody.
    mine = [pk for i, pk in enumerate(distinct) if i % shard.world_size == shard.rank and pk not in found]
    summary = Summary(pairs=len(items), distinct=len(distinct), reused=len(found),
                      judged_now=len(distinct) - len(found), judged_here=len(mine))
    if found:
        logger.info("judgement store %s: %d of %d distinct pairs reused", store.path, len(found), len(distinct))
    if on_start is not None:
        on_start(len(mine), len(found))

    writer = _Writer(store, skey, flush_every or batch_size or ranker.batch_size, flush_seconds)
    made: dict[str, Judgement] = {}
    try:
        if mine:
            judging = time.monotonic()
            todo = [(first[pk].query, first[pk].passage, first[pk].instruction) for pk in mine]
            for i, judgement in ranker.judge_iter_logged(todo, batch_size=batch_size, show_progress_bar=False):
                pk = mine[i]
                made[pk] = judgement
                writer.add(pk, judgement, first[pk].qid, first[pk].docid)
                if progress is not None:
                    progress(1)
            summary.judging_s = time.monotonic() - judging
    finally:
        writer.flush()  # also on KeyboardInterrupt and errors: finished work is never thrown away

    if shard.is_main and shard.world_size > 1:
        # Rank 0 builds the outputs from the store, the one copy every process agrees on.
        stored = _wait_for_all(store, skey, distinct, poll_seconds, wait_timeout_s)
    else:
        stored = {**found, **made}
    judgements = {(it.qid, it.docid): stored[pk] for pk, it in zip(keys, items) if pk in stored}
    for it in items:
        j = judgements.get((it.qid, it.docid))
        if j is not None:
            summary.outcomes[j.outcome] += 1
            if j.truncated:
                summary.truncated.append((it.qid, it.docid))
    summary.elapsed_s = time.monotonic() - started
    return Result(judgements, summary)


def _wait_for_all(
    store: JudgementStore, skey: str, keys: list[str], poll_seconds: float, timeout_s: float | None
) -> dict[str, Judgement]:
    """All judgements for ``keys``, polling the store while other processes are still writing them."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        stored = store.get_many(skey, keys)
        if len(stored) == len(keys):
            return stored
        if deadline is not None and time.monotonic() > deadline:
            raise Rank1Error(
                f"gave up waiting for {len(keys) - len(stored)} judgements from the other processes; "
                f"rerun to finish them (the store {store.path} keeps what is done)"
            )
        time.sleep(poll_seconds)


# ---------------------------------------------------------------------------------------------- outputs


def reranked_run(items: Sequence[Item], judgements: Mapping[tuple[str, str], Judgement]) -> runs.Run:
    """qid -> [(docid, score)], ranked by :func:`rank1_hf.runs.ranked` (see the module docstring)."""
    run: runs.Run = {}
    for it in items:
        run.setdefault(it.qid, []).append((it.docid, judgements[(it.qid, it.docid)].score))
    return {qid: runs.ranked(docs) for qid, docs in sorted(run.items())}


def first_stage_run(items: Sequence[Item]) -> runs.Run:
    """The input run as the job saw it (after top_k), for comparing against the reranked one."""
    run: runs.Run = {}
    for it in items:
        run.setdefault(it.qid, []).append((it.docid, it.first_stage_score))
    return run


def trace_rows(items: Sequence[Item], judgements: Mapping[tuple[str, str], Judgement]) -> list[dict[str, Any]]:
    """One record per pair (fields :data:`TRACE_FIELDS`), in the order of the reranked run."""
    rows = []
    for qid, docs in reranked_run(items, judgements).items():
        for docid, _ in docs:
            d = judgements[(qid, docid)].to_dict()
            rows.append({name: (qid if name == "qid" else docid if name == "docid" else d[name]) for name in TRACE_FIELDS})
    return rows


def write_outputs(
    items: Sequence[Item],
    judgements: Mapping[tuple[str, str], Judgement],
    output: runs.PathLike,
    traces: runs.PathLike | None,
    tag: str = "rank1",
) -> runs.Run:
    """Write the reranked TREC run and (optionally) the JSONL traces, each atomically; returns the run."""
    run = reranked_run(items, judgements)
    runs.write_run(output, run, tag)
    if traces is not None:
        runs.write_jsonl(traces, trace_rows(items, judgements))
    return run


def check_writable(path: runs.PathLike) -> None:
    """Fail early (before hours of judging) when ``path`` clearly cannot be written."""
    p = Path(path)
    if p.is_dir():
        raise Rank1Error(f"{p}: cannot write: is a directory")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise Rank1Error(f"{p}: cannot write: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise Rank1Error(f"{p}: cannot write: directory {parent} is not writable")
