"""Batch judging on Ray Data: a pool of actors, one ranker each, behind the rerank pipeline.

- :class:`JudgeBatch` is the callable class for ``Dataset.map_batches``: each actor loads the ranker once
  and turns a batch of rows with ``query``, ``passage`` and (optionally) ``instruction`` columns into the
  same rows plus the judgement's fields (:data:`JUDGEMENT_COLUMNS`: score, outcome, reasoning, token
  counts, ...). Any other column (ids, keys) passes through. Use it in your own Ray Data jobs::

      ds.map_batches(JudgeBatch, fn_constructor_kwargs={"model": "jhu-clsp/rank1-7b"},
                     compute=ActorPoolStrategy(size=8), num_gpus=1, batch_size=64)

- :class:`RayRanker` stands in for a :class:`~rank1_hf.ranker.Rank1` in
  :func:`rank1_hf.pipeline.judge_items`: its :meth:`~RayRanker.judge_iter` sends the pairs the stores
  lack (the pipeline plans them) to the actor pool and yields each judgement as its batch comes back, so
  the pipeline commits them to the store as they finish and writes the same run and traces as a
  single-process run. Its :meth:`~RayRanker.settings` (the store key) come from one ranker loaded on the
  cluster once at the start, so the driver needs no GPU and never loads the model itself.

Several batches may run in one actor at once (``concurrent_batches``): they share the ranker's engine,
so the slowest pair of one batch does not leave the GPU idle until the next batch arrives.

Faults: Ray Data restarts a pool actor that dies (``max_restarts=-1``) and sends the batches that were in
it again (``max_task_retries=-1``). Only the driver writes the store, so a pair is judged twice only when
its batch had not come back yet, and never when the store already held it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Iterator, Mapping, Sequence

from ..engine.types import EngineStats
from ..errors import Rank1Error
from ..judgement import Judgement
from ..options import JudgeOptions, LoadOptions
from ..prompt import Pair

logger = logging.getLogger(__name__)

#: The columns :class:`JudgeBatch` adds: the fields of :class:`~rank1_hf.judgement.Judgement`.
JUDGEMENT_COLUMNS = tuple(f.name for f in dataclasses.fields(Judgement))


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as error:
        raise Rank1Error(f"judging on Ray needs the [ray] extra (pip install 'rank1-hf[ray]'): {error}") from None
    return ray


def load_ranker(model: str, load: LoadOptions | None, judge: JudgeOptions | None, threads: int | None,
                store: str | None = None) -> Any:
    """A :class:`~rank1_hf.ranker.Rank1` in this Ray worker (torch's thread count first, when given)."""
    from ..ranker import Rank1

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return Rank1(model, load=load or LoadOptions(), judge=judge or JudgeOptions(), show_progress_bar=False,
                 store=store)


def _values(batch: Any, name: str) -> list[Any] | None:
    """One column of a batch as a Python list (None when absent), from a numpy dict or a ``pyarrow.Table``."""
    if isinstance(batch, Mapping):
        column = batch.get(name)
    else:
        column = batch[name] if name in batch.column_names else None  # pyarrow.Table
    if column is None:
        return None
    return column.to_pylist() if hasattr(column, "to_pylist") else [v.item() if hasattr(v, "item") else v for v in column]


class JudgeBatch:
    """``Dataset.map_batches`` callable: loads the ranker once per actor, judges a batch of rows.

    Args:
        model: hub id or local directory, as for :class:`~rank1_hf.ranker.Rank1`.
        load, judge: the ranker's :class:`~rank1_hf.options.LoadOptions` and
            :class:`~rank1_hf.options.JudgeOptions`.
        threads: torch's CPU thread count in the actor (default: torch's choice).

    Batches come as numpy dicts (Ray Data's default) or ``pyarrow`` tables. A row's ``instruction`` may be
    None (or the column absent): no instruction. The batch's pairs go to the ranker together, and calls
    from several threads of one actor share its engine.
    """

    def __init__(self, model: str, load: LoadOptions | None = None, judge: JudgeOptions | None = None,
                 threads: int | None = None) -> None:
        self.ranker = load_ranker(model, load, judge, threads)

    def __call__(self, batch: Any) -> Any:
        """The batch's rows with the judgement's columns added, as a ``pyarrow.Table`` (None stays null)."""
        import pyarrow

        queries, passages = _values(batch, "query"), _values(batch, "passage")
        if queries is None or passages is None:
            raise Rank1Error("JudgeBatch needs 'query' and 'passage' columns")
        instructions = _values(batch, "instruction") or [None] * len(queries)
        judgements = self.ranker.judge(list(zip(queries, passages, instructions)), show_progress_bar=False)
        names = batch.keys() if isinstance(batch, Mapping) else batch.column_names
        out = {name: _values(batch, name) for name in names}  # the caller's columns pass through
        for name in JUDGEMENT_COLUMNS:
            out[name] = [getattr(j, name) for j in judgements]
        return pyarrow.Table.from_pydict(out)


class PoolJudging:
    """What :meth:`RayRanker.judge_iter` returns: (input index, judgement) as batches come back, and
    ``stats``: only ``generated_tokens`` (the judgements' reasoning tokens); the engine counts stay on the
    actors."""

    def __init__(self, pairs: Iterator[tuple[int, Judgement]]) -> None:
        self.stats = EngineStats()
        self._pairs = pairs

    def __iter__(self) -> "PoolJudging":
        return self

    def __next__(self) -> tuple[int, Judgement]:
        i, judgement = next(self._pairs)
        self.stats.generated_tokens += judgement.reasoning_tokens
        return i, judgement

    def close(self) -> None:
        self._pairs.close()  # type: ignore[attr-defined]


class RayRanker:
    """The part of :class:`~rank1_hf.ranker.Rank1` the rerank pipeline uses, judging on a Ray actor pool.

    Args:
        model, load, judge, threads: each actor's ranker (see :class:`JudgeBatch`).
        address: the Ray cluster (``ray.init``'s address: None starts or finds a local one, "auto" joins the
            running cluster, "ray://host:10001" a remote one). Ignored when Ray is already initialized
            (then :meth:`close` leaves it running).
        actors: pool size, or (min, max) for a pool that grows with the work.
        gpus_per_actor, cpus_per_actor: each actor's resources (a GPU actor holds one model on its GPU;
            default: 1 GPU when the cluster has GPUs, else none).
        rows_per_batch: pairs per batch sent to an actor (default: twice the ranker's batch size); also
            the pipeline's commit size, since each batch comes back whole.
        concurrent_batches: batches one actor works on at once, sharing its engine.
        init: more ``ray.init`` keywords (e.g. ``num_cpus``) when this ranker starts Ray.
    """

    def __init__(self, model: str, load: LoadOptions | None = None, judge: JudgeOptions | None = None, *,
                 threads: int | None = None, address: str | None = None, actors: int | tuple[int, int] = 1,
                 gpus_per_actor: float | None = None, cpus_per_actor: float = 1.0, rows_per_batch: int | None = None,
                 concurrent_batches: int = 2, init: Mapping[str, Any] | None = None) -> None:
        ray = _ray()
        sizes = (actors, actors) if isinstance(actors, int) else tuple(actors)
        if len(sizes) != 2 or not 1 <= sizes[0] <= sizes[1]:
            raise Rank1Error(f"actors must be N >= 1 or (min, max) with 1 <= min <= max, got {actors!r}")
        if concurrent_batches < 1 or (rows_per_batch is not None and rows_per_batch < 1):
            raise Rank1Error("concurrent_batches and rows_per_batch must be at least 1")
        self.model, self.load, self.judge, self.threads = model, load or LoadOptions(), judge or JudgeOptions(), threads
        self._started = not ray.is_initialized()
        if self._started:
            ray.init(address=address, **dict(init or {}))
        if gpus_per_actor is None:
            gpus_per_actor = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        self.sizes, self.gpus, self.cpus, self.concurrent = sizes, gpus_per_actor, cpus_per_actor, concurrent_batches
        probe = ray.remote(_probe).options(num_gpus=gpus_per_actor, num_cpus=cpus_per_actor, max_retries=2)
        self._settings, engine_batch = ray.get(probe.remote(model, self.load, self.judge, threads))
        self.rows_per_batch = rows_per_batch or 2 * engine_batch
        self.pairs_sent = 0  # pairs handed to the pool (a batch retried after a fault counts once)
        logger.info("Ray: %s actors x %s GPU, %d pairs per batch, %d batches per actor at once",
                    f"{sizes[0]}" if sizes[0] == sizes[1] else f"{sizes[0]}-{sizes[1]}", gpus_per_actor,
                    self.rows_per_batch, concurrent_batches)

    # ---- what the pipeline reads ------------------------------------------------------------------------

    def settings(self, dataset_prompt: str | None = None) -> dict[str, Any]:
        """The actors' ranker settings (the store key), read from one ranker loaded at the start."""
        if dataset_prompt is not None and dataset_prompt != self.dataset_prompt:
            raise Rank1Error("a Ray ranker judges with its own dataset prompt only")
        return dict(self._settings)

    @property
    def dataset_prompt(self) -> str | None:
        return self.judge.dataset_prompt

    @property
    def batch_size(self) -> int:
        """Pairs per batch sent to an actor (a batch comes back whole: the pipeline commits that many)."""
        return self.rows_per_batch

    def judge_iter(self, pairs: Sequence[Pair], batch_size: int | None = None,
                   show_progress_bar: bool | None = None, *, dataset_prompt: str | None = None) -> PoolJudging:
        """(input index, judgement) for ``pairs`` ((query, passage[, instruction])), as each batch comes
        back from the pool, in no particular order."""
        self.settings(dataset_prompt)  # the same check
        return PoolJudging(self._judged(list(pairs)))

    def _judged(self, pairs: list[Pair]) -> Iterator[tuple[int, Judgement]]:
        if not pairs:
            return
        self.pairs_sent += len(pairs)
        ray = _ray()
        from ray.data import ActorPoolStrategy, DataContext

        DataContext.get_current().enable_progress_bars = False  # the pipeline has its own bar
        rows = [{"index": i, "query": p[0], "passage": p[1], "instruction": p[2] if len(p) > 2 else None}
                for i, p in enumerate(pairs)]
        # One block per batch: each batch is its own task, retried alone, and comes back as soon as it is done.
        blocks = math.ceil(len(rows) / self.rows_per_batch)
        pool = ActorPoolStrategy(min_size=self.sizes[0], max_size=self.sizes[1],
                                 max_concurrent_calls_per_actor=self.concurrent,
                                 enable_true_multi_threading=self.concurrent > 1)
        judged = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
            JudgeBatch, fn_constructor_kwargs={"model": self.model, "load": self.load, "judge": self.judge,
                                               "threads": self.threads},
            compute=pool, num_gpus=self.gpus, num_cpus=self.cpus, batch_size=self.rows_per_batch,
            # Ray Data's pool defaults restart a dead actor and resend its batches (max_restarts and
            # max_task_retries -1; passing them is deprecated); tests/test_ray.py kills an actor to hold them.
            batch_format="pyarrow")
        for batch in judged.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                yield row["index"], Judgement.from_dict(row)

    def close(self) -> None:
        """Shut Ray down when this ranker started it (the pool's actors end with their job)."""
        if self._started:
            _ray().shutdown()
            self._started = False

    def __enter__(self) -> "RayRanker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _probe(model: str, load: LoadOptions, judge: JudgeOptions, threads: int | None) -> tuple[dict[str, Any], int]:
    """(settings, engine batch size) of the ranker the actors will load (a Ray task)."""
    with load_ranker(model, load, judge, threads) as ranker:
        return ranker.settings(), ranker.batch_size
