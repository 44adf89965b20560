"""The rerank job as plain functions: first-stage run in, rank1 judgements, reranked run out.

Usable from Python as well as from the CLI::

    from rank1_hf import Rank1
    from rank1_hf.pipeline import load_items, judge_items, reranked_run, trace_rows
    from rank1_hf.io.store import JudgementStore

    items = load_items("run.trec", "queries.jsonl", "corpus.jsonl", top_k=100)
    ranker = Rank1("jhu-clsp/rank1-7b")
    with JudgementStore("judgements.sqlite") as store:
        result = judge_items(ranker, items, store)
    run = reranked_run(items, result.judgements)

Resuming: every judgement is written to the :class:`~rank1_hf.io.store.JudgementStore` in small
transactions as it finishes (every ``flush_every`` judgements or ``flush_seconds``, and always on the
way out, KeyboardInterrupt included), and looked up there before anything is generated. Rerunning the
same job after a crash or a SIGKILL recomputes only the pairs that were in flight.

Shards: pair -> shard is a stable hash of the pair's store key (:func:`shard_index`), not its position in
the input, so a shard is the same set of judgements whatever else is in the job, and a rerun with another
number of shards still finds every finished judgement (reuse is by key, from any store given). A job may
read several stores (:func:`judge_items`' ``sources``) and writes only its own.

Two ways to spread a job over machines, both ending in outputs identical to a single-process run's:

* Array jobs (``rank1-hf rerank --shard I/N --store shardI.sqlite``): each job judges its shard into its
  own store; a final plain run given all the stores judges nothing new and writes the outputs.
* A launcher (``torchrun`` / ``accelerate launch``, one node or several: RANK/WORLD_SIZE set):
  :func:`judge_across_ranks`. Rank r of N writes its own store file beside the base store
  (:func:`rank_store_path`, one writer per file, rollback journal: safe on NFS), then a ``.done`` marker
  naming the job; rank 0, once every rank's marker for this job is there, reads all the rank files and
  builds the outputs. No ``torch.distributed`` is needed: the shared directory is the only thing the
  processes share.

Ranking rule: :func:`rank1_hf.io.formats.ranked` (score descending, ties by docid descending, as trec_eval
re-sorts), for the first-stage top-k, the reranked run, the traces and the evaluation alike, so the file on
disk, the traces and every evaluation tool agree. Only the top-k pairs are reranked; the documents below
them can follow in their first-stage order (:func:`reranked_run`'s ``rest``, the CLI's default). The run
file's scores are made strictly decreasing (:func:`rank1_hf.io.formats.untied_scores`); the traces keep each
judgement's raw score.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from .io import formats, reuse
from .engine.types import EngineStats
from .errors import Rank1Error
from .judgement import Judgement
from .io.store import JudgementStore, settings_key

if TYPE_CHECKING:  # importing the ranker pulls in torch; the pipeline itself does not need it
    from .ranker import Rank1

logger = logging.getLogger(__name__)

#: One line each in the run summary: what an outcome means.
OUTCOME_MEANINGS = {
    "answered": "the model closed </think> itself; the score was read right after it",
    "forced": "the reasoning stopped before </think> (the token cap or the model's end-of-sequence); it was cut "
              "back to its last sentence and </think> added, and the score read after that, as rank1's "
              "reference does",
    "fallback": "no score could be read (non-finite logits); the score is 0.5",
}

#: A trace record: the judgement, where the pair stood before and after, and the texts it was made from
#: (a passage costs about what its reasoning does, and carrying it spares readers a join against a corpus
#: that may hold millions of passages). ``reasoning`` is the text the score was read after (cut back to its
#: last sentence for a forced pair); ``full_reasoning`` everything generated.
TRACE_FIELDS = (
    "qid", "docid", "rank", "score", "outcome", "reasoning", "full_reasoning", "reasoning_tokens",
    "prompt_tokens", "truncated", "true_logit", "false_logit", "first_stage_rank", "first_stage_score",
    "query", "instruction", "passage",
)


@dataclass(frozen=True, slots=True)  # slots: a job can hold 700,000 of these
class Item:
    """One (query, passage) pair of the first-stage run, with its texts."""

    qid: str
    docid: str
    query: str
    passage: str
    instruction: str | None
    first_stage_rank: int  # 1-based, within its query after top_k
    first_stage_score: float


def shard_index(pair_key: str, count: int) -> int:
    """The shard (0-based, of ``count``) a pair belongs to: its store key (a sha256 hex) modulo ``count``.

    Stable across runs, machines and Python processes, and independent of where the pair is in the input.
    """
    return int(pair_key[:16], 16) % count


@dataclass(frozen=True)
class Shard:
    """Which slice of the pairs this process judges: those whose :func:`shard_index` is ``rank``."""

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

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``"I/N"``: shard I (0-based) of N."""
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
            raise Rank1Error(f"--shard must be I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
        return cls(int(m.group(1)), int(m.group(2)))

    def owns(self, pair_key: str) -> bool:
        return self.world_size == 1 or shard_index(pair_key, self.world_size) == self.rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class Summary:
    """What a job (or one shard of it) did. Counts of judgements are of distinct texts (identical pairs are
    judged once)."""

    pairs: int = 0
    distinct: int = 0
    reused: int = 0  # found in a store when the job started
    judged_now: int = 0  # missing when the job started (by all processes together)
    judged_here: int = 0  # by this process
    outcomes: Counter = field(default_factory=Counter)
    truncated: list[tuple[str, str]] = field(default_factory=list)
    no_documents: list[str] = field(default_factory=list)  # qids the run names with no documents (read_job)
    elapsed_s: float = 0.0
    judging_s: float = 0.0  # time this process spent in judge_iter
    draft_tokens: int = 0  # speculation: draft tokens verified by this process's engine
    accepted_tokens: int = 0  # and those kept

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
            *(f"  {k} {n}: {OUTCOME_MEANINGS[k]}" for k in ("answered", "forced", "fallback")
              if (n := self.outcomes.get(k, 0))),
            f"truncated: {len(self.truncated)}",
            f"elapsed: {self.elapsed_s:.1f} s ({rate})",
        ]
        if self.draft_tokens:
            out.append(f"speculation: {self.accepted_tokens} of {self.draft_tokens} draft tokens accepted "
                       f"({self.accepted_tokens / self.draft_tokens:.0%})")
        if self.outcomes and not self.outcomes.get("answered"):
            out.append("note: no pair was answered: every score was read after reasoning the model did not finish. "
                       "Raise --max-new-tokens (rank1's reasoning runs to about 1000 tokens; the reference allows "
                       "8192)")
        if self.truncated:
            # Passages longer than the context were cut (passage only, template kept whole); name a few.
            names = ", ".join(f"{q}/{d}" for q, d in self.truncated[:10])
            more = f" and {len(self.truncated) - 10} more" if len(self.truncated) > 10 else ""
            i = next(i for i, line in enumerate(out) if line.startswith("truncated:"))
            out[i] += f" (passage cut to fit context_size: {names}{more})"
        if self.no_documents:
            # A JSON run can name a query with no documents: nothing to judge, but not silently dropped.
            names = ", ".join(self.no_documents[:10])
            more = f" and {len(self.no_documents) - 10} more" if len(self.no_documents) > 10 else ""
            out.append(f"queries without documents in the run: {len(self.no_documents)} ({names}{more})")
        return out


@dataclass
class Result:
    """Judgements per (qid, docid): of every item, or of this shard's items only (a shard job)."""

    judgements: dict[tuple[str, str], Judgement]
    summary: Summary
    fingerprint: str = ""  # names the job: its settings and every pair (see Plan)
    stats: EngineStats = field(default_factory=EngineStats)  # this process's engine work (zero: none judged)


# ---------------------------------------------------------------------------------------------- items


def build_items(
    run: Mapping[str, Sequence[tuple[str, float]]],
    queries: Mapping[str, str],
    corpus: Mapping[str, str],
    instructions: Mapping[str, str] | None = None,
    top_k: int | None = None,
    run_path: formats.PathLike | None = None,
) -> list[Item]:
    """The job's pairs, query by query (sorted qid), each in first-stage order, cut to ``top_k``.

    Unknown qids/docids, empty texts and a repeated (qid, docid) are :class:`Rank1Error`.
    """
    if top_k is not None and top_k < 1:
        raise Rank1Error(f"top_k must be at least 1, got {top_k}")
    formats.check_run(run, queries, corpus, run_path)
    instructions = instructions or {}
    items: list[Item] = []
    for qid in sorted(run):
        ranked = formats.ranked(run[qid])[:top_k]
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
    run: formats.PathLike,
    queries: formats.PathLike,
    corpus: formats.PathLike,
    instructions: formats.PathLike | None = None,
    top_k: int | None = None,
) -> list[Item]:
    """Read the job's files (see :mod:`rank1_hf.io.formats` for the formats) and build its items.

    The run is read first; of the queries, instructions and corpus only the ids it names are kept, so a
    top-100 of MS MARCO holds its 700,000 pairs' texts, not the 8.8M-passage corpus. Queries the run names
    without documents have no items: :func:`read_job` also returns them.
    """
    return read_job(run, queries, corpus, instructions, top_k)[0]


def read_job(
    run: formats.PathLike,
    queries: formats.PathLike,
    corpus: formats.PathLike,
    instructions: formats.PathLike | None = None,
    top_k: int | None = None,
) -> tuple[list[Item], list[str]]:
    """:func:`load_items`' items, and the qids the run names with no documents (for the summary,
    :attr:`Summary.no_documents`)."""
    first_stage = formats.read_run(run, top_k)
    docids = {docid for docs in first_stage.values() for docid, _ in docs}
    wanted = {qid for qid, docs in first_stage.items() if docs}
    items = build_items(
        first_stage,
        formats.read_queries(queries, keep=wanted),
        formats.read_corpus(corpus, keep=docids),
        formats.read_instructions(instructions, keep=wanted) if instructions is not None else None,
        top_k,
        run_path=run,
    )
    return items, formats.empty_queries(first_stage)


def item_key(ranker: "Rank1", item: Item) -> str:
    """The store's pair key: the final query text (instruction joined, dataset prompt applied) and passage."""
    return reuse.text_key(item.query, item.passage, item.instruction, ranker.dataset_prompt)


# ---------------------------------------------------------------------------------------------- judging


@dataclass
class Plan:
    """What one shard of a job has to do, worked out from the stores (nothing judged)."""

    settings_key: str
    keys: list[str]  # the store key of every item, in item order
    first: dict[str, Item]  # the first item of each distinct key in this shard, in job order
    found: set[str]  # distinct keys of this shard already in some store
    todo: list[str]  # distinct keys of this shard still to judge, in job order
    fingerprint: str  # names the whole job (settings and every pair), whatever the shard


def plan_job(ranker: "Rank1", items: Sequence[Item], stores: Sequence[JudgementStore], shard: Shard) -> Plan:
    """Which of ``shard``'s pairs are already in one of ``stores`` and which are left to judge.

    Only ``ranker.settings()`` and ``ranker.dataset_prompt`` are used, and the stores are asked for keys,
    not judgements, so planning a 700,000-pair job needs no model and little memory.
    """
    if len({(it.qid, it.docid) for it in items}) != len(items):
        raise Rank1Error("duplicate (qid, docid) pairs in the items")
    skey = settings_key(ranker.settings())
    keys = [item_key(ranker, it) for it in items]
    job = hashlib.sha256(skey.encode("ascii"))
    for pk in keys:
        job.update(pk.encode("ascii"))
    planned = reuse.plan(keys, stores, skey, wanted=shard.owns)
    first = {pk: items[i] for pk, i in planned.first.items()}
    return Plan(skey, keys, first, planned.found, planned.todo, job.hexdigest()[:16])


def judge_items(
    ranker: "Rank1",
    items: Sequence[Item],
    store: JudgementStore,
    *,
    sources: Sequence[JudgementStore] = (),
    flush_every: int | None = None,
    flush_seconds: float = 5.0,
    shard: Shard | None = None,
    progress: Callable[[int], Any] | None = None,
    on_start: Callable[[int, int], Any] | None = None,
) -> Result:
    """Judge this shard's items, reusing ``store`` and ``sources``; new judgements go to ``store`` only.

    Returns the judgements per (qid, docid) of this shard's items (of all items when the shard is 0 of 1)
    and a summary of this shard.

    Args:
        sources: more stores to reuse judgements from (only read; the first store holding a pair wins).
        flush_every: judgements per store transaction (default: the ranker's batch size).
        flush_seconds: commit at least this often while judgements keep coming.
        shard: this process's slice (default: from the RANK/WORLD_SIZE environment).
        progress: called with 1 per judgement made by this process (e.g. a tqdm bar's ``update``).
        on_start: called once with (pairs this process will judge, pairs reused) before judging.
    """
    started = time.monotonic()
    shard = shard or Shard.from_env()
    stores = [store, *sources]
    store.register_settings(ranker.settings())
    plan = plan_job(ranker, items, stores, shard)
    mine = plan.todo
    summary = Summary(pairs=sum(1 for pk in plan.keys if shard.owns(pk)), distinct=len(plan.first),
                      reused=len(plan.found), judged_now=len(mine), judged_here=len(mine))
    if plan.found:
        logger.info("judgement stores %s: %d of %d distinct pairs reused",
                    ", ".join(str(s.path) for s in stores), len(plan.found), len(plan.first))
    if on_start is not None:
        on_start(len(mine), len(plan.found))

    writer = reuse.Writer(store, plan.settings_key, flush_every or ranker.batch_size, flush_seconds)
    made: dict[str, Judgement] = {}
    stats = EngineStats()
    try:
        if mine:
            judging = time.monotonic()
            first = plan.first
            todo = [(first[pk].query, first[pk].passage, first[pk].instruction) for pk in mine]
            judged = ranker.judge_iter(todo, show_progress_bar=False)
            for i, judgement in judged:
                pk = mine[i]
                made[pk] = judgement
                writer.add(pk, judgement, {"qid": first[pk].qid, "docid": first[pk].docid})
                if progress is not None:
                    progress(1)
            summary.judging_s = time.monotonic() - judging
            stats = judged.stats
            summary.draft_tokens, summary.accepted_tokens = stats.draft_tokens, stats.accepted_tokens
    finally:
        writer.flush()  # also on KeyboardInterrupt and errors: finished work is never thrown away

    stored = {**reuse.fetch(stores, plan.settings_key, plan.found), **made}
    judgements = {(it.qid, it.docid): stored[pk] for pk, it in zip(plan.keys, items) if pk in stored}
    _count_outcomes(summary, items, judgements)
    summary.elapsed_s = time.monotonic() - started
    return Result(judgements, summary, plan.fingerprint, stats)


def _count_outcomes(summary: Summary, items: Sequence[Item], judgements: Mapping[tuple[str, str], Judgement]) -> None:
    for it in items:
        j = judgements.get((it.qid, it.docid))
        if j is not None:
            summary.outcomes[j.outcome] += 1
            if j.truncated:
                summary.truncated.append((it.qid, it.docid))


# ---------------------------------------------------------------------------------------------- many ranks


def rank_store_path(base: formats.PathLike, shard: Shard) -> Path:
    """Rank r of N's own store beside the base store: ``judgements.sqlite`` -> ``judgements.rank3-of-8.sqlite``."""
    base = Path(base)
    return base.with_name(f"{base.stem}.rank{shard.rank}-of-{shard.world_size}{base.suffix}")


def rank_store_paths(base: formats.PathLike) -> dict[Path, Shard]:
    """The rank stores beside ``base`` (of runs with any number of ranks), with the shard each was for."""
    base = Path(base)
    name = re.compile(re.escape(base.stem) + r"\.rank(\d+)-of-(\d+)" + re.escape(base.suffix))
    out = {}
    for path in sorted(base.parent.glob(f"{glob.escape(base.stem)}.rank*-of-*{glob.escape(base.suffix)}")):
        m = name.fullmatch(path.name)
        if m and int(m.group(1)) < int(m.group(2)):
            out[path] = Shard(int(m.group(1)), int(m.group(2)))
    return out


def done_path(store_path: formats.PathLike) -> Path:
    """The marker a rank writes beside its store when its shard of the job is finished."""
    return Path(f"{store_path}.done")


def judge_across_ranks(
    ranker: "Rank1",
    items: Sequence[Item],
    base_store: formats.PathLike,
    shard: Shard,
    *,
    sources: Sequence[JudgementStore] = (),
    poll_seconds: float = 1.0,
    wait_timeout_s: float | None = None,
    **judging: Any,
) -> Result:
    """One rank of a launcher job: judge this rank's shard into its own store, then (rank 0) collect all.

    Rank r of N writes only :func:`rank_store_path` (rollback journal: one writer per file is safe on a
    network filesystem) and, when its shard is done, :func:`done_path`, holding the job's fingerprint and
    how many pairs it judged. It reuses the base store (when it exists), ``sources`` and the rank stores
    of runs with another N; the rank stores of this N hold other shards only and are not read while their
    writers may be running. Rank 0 then waits for every rank's marker of this job (``wait_timeout_s``:
    Rank1Error after that many seconds; None: forever), reads every rank store of this N and returns all
    the judgements; any other rank returns its own. ``judging``: :func:`judge_items`' options.
    """
    base = Path(base_store)
    own = rank_store_path(base, shard)
    done_path(own).unlink(missing_ok=True)  # before this rank writes anything: an old marker is stale now
    readers = [JudgementStore(base, readonly=True)] if base.is_file() else []
    try:
        readers += [JudgementStore(p, readonly=True) for p, s in rank_store_paths(base).items()
                    if s.world_size != shard.world_size]
        with JudgementStore(own, journal="delete") as store:
            result = judge_items(ranker, items, store, sources=[*sources, *readers], shard=shard, **judging)
        # Written after the store is closed: on NFS, close-to-open consistency then shows rank 0 the file
        # complete once it sees the marker.
        formats.write_jsonl(done_path(own), [{"job": result.fingerprint, "judged": result.summary.judged_here}])
        if not shard.is_main:
            return result
        judged = _wait_for_ranks(base, shard.world_size, result.fingerprint, poll_seconds, wait_timeout_s)
        reused = list(readers)
        for r in range(shard.world_size):
            readers.append(JudgementStore(rank_store_path(base, Shard(r, shard.world_size)), readonly=True))
        return _collect(ranker, items, [*readers[len(reused):], *sources, *reused], result, sum(judged))
    finally:
        for reader in readers:
            reader.close()


def _wait_for_ranks(
    base: Path, world_size: int, fingerprint: str, poll_seconds: float, timeout_s: float | None
) -> list[int]:
    """Each rank's count of pairs judged, once every rank has marked this job done."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        judged: list[int] = []
        for r in range(world_size):
            marker = _read_marker(done_path(rank_store_path(base, Shard(r, world_size))))
            if marker is None or marker.get("job") != fingerprint:
                break
            judged.append(int(marker.get("judged", 0)))
        if len(judged) == world_size:
            return judged
        if deadline is not None and time.monotonic() > deadline:
            raise Rank1Error(
                f"gave up waiting for {world_size - len(judged)} or more of the {world_size} ranks (no "
                f"{done_path(rank_store_path(base, Shard(len(judged), world_size))).name} for this job); "
                f"rerun to finish them (the rank stores beside {base} keep what is done)"
            )
        time.sleep(poll_seconds)


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # not there yet (written atomically, so never half there)


def _collect(ranker: "Rank1", items: Sequence[Item], stores: Sequence[JudgementStore], own: Result,
             judged_now: int) -> Result:
    """Rank 0's result: every item's judgement, from the rank stores and the ones reused."""
    started = time.monotonic()
    keys = [item_key(ranker, it) for it in items]
    skey = settings_key(ranker.settings())
    stored = reuse.fetch(stores, skey, keys)
    missing = len(set(keys) - stored.keys())
    if missing:
        raise Rank1Error(f"{missing} judgements are in none of the rank stores although every rank is done; "
                         "rerun the job to judge them")
    judgements = {(it.qid, it.docid): stored[pk] for pk, it in zip(keys, items)}
    distinct = len(stored)
    summary = Summary(pairs=len(items), distinct=distinct, reused=distinct - judged_now, judged_now=judged_now,
                      judged_here=own.summary.judged_here, judging_s=own.summary.judging_s)
    _count_outcomes(summary, items, judgements)
    summary.elapsed_s = own.summary.elapsed_s + time.monotonic() - started
    return Result(judgements, summary, own.fingerprint, own.stats)


# ---------------------------------------------------------------------------------------------- outputs


def reranked_run(items: Sequence[Item], judgements: Mapping[tuple[str, str], Judgement],
                 rest: Mapping[str, Sequence[tuple[str, float]]] | None = None) -> formats.Run:
    """qid -> [(docid, score)], ranked by :func:`rank1_hf.io.formats.ranked` (see the module docstring).

    ``rest``: the first-stage documents below the top-k (:func:`first_stage_rest`), ranked after the
    reranked ones in their first-stage order, with scores -1, -2, ... (below any rank1 score, which lies
    in [0, 1]), so the run is as deep as its input and evaluates like with like.
    """
    run: formats.Run = {}
    for it in items:
        run.setdefault(it.qid, []).append((it.docid, judgements[(it.qid, it.docid)].score))
    out = {qid: formats.ranked(docs) for qid, docs in run.items()}
    for qid, docs in (rest or {}).items():
        if docs:
            out.setdefault(qid, []).extend((docid, -float(i)) for i, (docid, _) in enumerate(docs, 1))
    return dict(sorted(out.items()))


def first_stage_rest(run_path: formats.PathLike, top_k: int) -> formats.Run:
    """The first-stage documents of each query below its top ``top_k``, in first-stage order."""
    return {qid: docs[top_k:] for qid, docs in formats.read_run(run_path).items() if docs[top_k:]}


def first_stage_run(items: Sequence[Item], rest: Mapping[str, Sequence[tuple[str, float]]] | None = None) -> formats.Run:
    """The input run as the job saw it (after top_k, and ``rest`` below it when given), for comparing
    against the reranked one."""
    run: formats.Run = {}
    for it in items:
        run.setdefault(it.qid, []).append((it.docid, it.first_stage_score))
    for qid, docs in (rest or {}).items():
        run.setdefault(qid, []).extend(docs)
    return run


def trace_rows(items: Sequence[Item], judgements: Mapping[tuple[str, str], Judgement]) -> list[dict[str, Any]]:
    """One record per judged pair (fields :data:`TRACE_FIELDS`), in the order of the reranked run."""
    by_pair = {(it.qid, it.docid): it for it in items}
    rows = []
    for qid, docs in reranked_run(items, judgements).items():
        for rank, (docid, _) in enumerate(docs, 1):
            it, j = by_pair[(qid, docid)], judgements[(qid, docid)]
            d = j.to_dict()
            d.update(qid=qid, docid=docid, rank=rank, reasoning=j.scored_reasoning, full_reasoning=j.reasoning,
                     first_stage_rank=it.first_stage_rank, first_stage_score=it.first_stage_score,
                     query=it.query, instruction=it.instruction, passage=it.passage)
            rows.append({name: d[name] for name in TRACE_FIELDS})
    return rows


def write_outputs(
    items: Sequence[Item],
    judgements: Mapping[tuple[str, str], Judgement],
    output: formats.PathLike,
    traces: formats.PathLike | None,
    tag: str = "rank1",
    rest: Mapping[str, Sequence[tuple[str, float]]] | None = None,
) -> formats.Run:
    """Write the reranked TREC run (with ``rest`` below the reranked documents, see :func:`reranked_run`)
    and (optionally) the JSONL traces of the judged pairs, each atomically; returns the run."""
    run = reranked_run(items, judgements, rest)
    formats.write_run(output, run, tag)
    if traces is not None:
        formats.write_jsonl(traces, trace_rows(items, judgements))
    return run


def check_writable(path: formats.PathLike) -> None:
    """Fail early (before hours of judging) when ``path`` clearly cannot be written. Missing folders are
    fine (the writers make them) when the nearest existing one is writable."""
    p = Path(path)
    if p.is_dir():
        raise Rank1Error(f"{p}: cannot write: is a directory")
    parent = p.parent if str(p.parent) else Path(".")
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise Rank1Error(f"{p}: cannot write: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise Rank1Error(f"{p}: cannot write: directory {parent} is not writable")
