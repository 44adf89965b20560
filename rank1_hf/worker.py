"""One engine for every caller: a thread that owns the engine and steps it while anyone waits.

Callers (threads, asyncio tasks) never touch the model. Each call opens a :class:`Ticket` and submits its
prompts; the worker thread queues them first come, first served, and every engine step runs rows of
whichever callers have work, so concurrent calls share decode steps. A finished row is handed to the
tickets waiting for it, and only to them:

- identical prompts waiting or in flight at the same time are judged once, for every ticket that asked;
- a cancelled ticket's prompts leave the queue, and its rows in flight leave their slots, unless
  another ticket waits for the same prompt;
- an engine error (out of memory is handled inside the engine) reaches every ticket with work in the
  engine as the error itself, and the next call gets a fresh engine.

The engine is made on first use and kept: its cache (and, on a GPU, its captured decode steps) serve
every later call until :meth:`EngineWorker.close`.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from .engine_types import EngineStats, Generation, Request
from .errors import Rank1Error

logger = logging.getLogger(__name__)


class Engine(Protocol):
    """What the worker needs of an engine (:class:`~rank1_hf.engine.ContinuousEngine`,
    :class:`~rank1_hf.generate.GenerateEngine`)."""

    name: str
    stats: EngineStats
    rows_stepped: int

    def wants(self) -> int: ...
    def step(self, waiting: deque[Request]) -> list[tuple[Request, Generation]]: ...
    def drop(self, ids: set[int]) -> None: ...
    def warmup(self) -> None: ...
    def close(self) -> None: ...


class Ticket:
    """One caller's share of the engine: ``deliver`` receives ``(caller's index, Generation)`` for each of
    its prompts, or an exception once if the engine fails; ``stats`` counts the engine's work while the
    ticket had prompts in it (steps shared with other callers count for each of them)."""

    def __init__(self, deliver: Callable[[Any], None]):
        self.deliver = deliver
        self.stats = EngineStats()
        self.cancelled = False


@dataclass
class _Job:
    request: Request
    waiters: list[tuple[Ticket, int]] = field(default_factory=list)  # (ticket, caller's index)


class EngineWorker:
    """The thread that owns one engine, made by ``make_engine`` on first use (in the thread itself)."""

    def __init__(self, make_engine: Callable[[], Engine]):
        self._make_engine = make_engine
        self._engine: Engine | None = None
        self._lock = threading.Condition()
        self._pending: deque[_Job] = deque()  # submitted, not yet given to the engine
        self._jobs: dict[int, _Job] = {}  # pending or in the engine, by request id
        self._by_ids: dict[tuple[int, ...], _Job] = {}  # the same, by prompt ids (identical prompts join)
        self._calls: deque[tuple[Callable[[Engine], Any], list]] = deque()  # run in the thread (warmup)
        self._next_id = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        self.joined = 0  # prompts that joined an identical one already waiting or in flight
        self.judged = 0  # prompts the engine finished (each distinct prompt once, however many waited)
        self.stats = EngineStats()  # all the work of this worker's engines (a replaced engine's too)
        _live.add(self)

    # ---- callers' side (any thread) ------------------------------------------------------------------

    def submit(self, ticket: Ticket, prompts: list[tuple[int, list[int], str]]) -> None:
        """Queue ``(caller's index, prompt ids, prompt string)`` for ``ticket``."""
        with self._lock:
            if self._closed:
                raise Rank1Error("this ranker is closed")
            for index, ids, prompt in prompts:
                key = tuple(ids)
                job = self._by_ids.get(key)
                if job is None:
                    job = _Job(Request(self._next_id, ids, prompt))
                    self._next_id += 1
                    self._jobs[job.request.id] = self._by_ids[key] = job
                    self._pending.append(job)
                else:
                    self.joined += 1
                job.waiters.append((ticket, index))
            self._start()
            self._lock.notify()

    def cancel(self, ticket: Ticket) -> None:
        """The ticket's caller is gone: nothing more is delivered to it, and its prompts that no other
        ticket waits for are dropped (from the queue now, from the engine's slots at its next step)."""
        with self._lock:
            ticket.cancelled = True
            self._lock.notify()

    def call(self, fn: Callable[[Engine], Any]) -> Any:
        """Run ``fn(engine)`` in the worker thread between steps and return its result (or raise its error)."""
        box: list = []
        done = threading.Event()
        with self._lock:
            if self._closed:
                raise Rank1Error("this ranker is closed")
            self._calls.append((fn, [box, done]))
            self._start()
            self._lock.notify()
        done.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def close(self, timeout: float | None = None) -> None:
        """Stop the thread (after its current step) and free the engine; waiting tickets get an error."""
        with self._lock:
            self._closed = True
            self._lock.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def engine_name(self) -> str | None:
        return self._engine.name if self._engine is not None else None

    def pending_prompts(self) -> int:
        """Prompts waiting or in the engine."""
        with self._lock:
            return len(self._jobs)

    # ---- the thread ----------------------------------------------------------------------------------

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="rank1-engine", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._closed or self._calls or self._jobs):
                    self._lock.wait()
                if self._closed:
                    self._fail_all(Rank1Error("this ranker was closed while judging"))
                    self._drop_engine()
                    return
                calls = list(self._calls)
                self._calls.clear()
            for fn, (box, done) in calls:
                try:
                    box.append(fn(self._engine_now()))
                except BaseException as error:  # noqa: BLE001 - handed to the caller
                    box.append(error)
                done.set()
            if self._jobs:
                self._step()

    def _drop_engine(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()

    def _engine_now(self) -> Engine:
        if self._engine is None:
            self._engine = self._make_engine()
        return self._engine

    def _step(self) -> None:
        try:
            engine = self._engine_now()
            with self._lock:
                dropped = self._sweep_cancelled()
                waiting = deque(job.request for job in self._take(engine.wants()))
            if dropped:
                engine.drop(dropped)
            before = engine.stats.copy()
            finished = engine.step(waiting)
        except Exception as error:  # noqa: BLE001 - an engine failure goes to its callers
            logger.error("the engine failed: %s", error)
            with self._lock:
                self._fail_all(error)
            self._drop_engine()  # the next call starts a fresh engine
            return
        with self._lock:
            # What the step did not take (or gave back after out of memory) goes back to the queue's front.
            self._pending.extendleft(reversed([self._jobs[r.id] for r in waiting]))
            for ticket in self._open_tickets():
                ticket.stats.add_since(engine.stats, before, engine.rows_stepped)
            self.stats.add_since(engine.stats, before, engine.rows_stepped)
            done = [(self._forget(request), generation) for request, generation in finished]
            self.judged += len(done)
        for job, generation in done:
            for ticket, index in job.waiters:
                if not ticket.cancelled:
                    _deliver(ticket, (index, generation))

    def _take(self, count: int) -> list[_Job]:
        taken = []
        while self._pending and len(taken) < count:
            taken.append(self._pending.popleft())
        return taken

    def _sweep_cancelled(self) -> set[int]:
        """Drop cancelled tickets' waiters; the ids of in-flight requests nobody waits for any more."""
        dropped: set[int] = set()
        for job in list(self._jobs.values()):
            if any(t.cancelled for t, _ in job.waiters):
                job.waiters = [(t, i) for t, i in job.waiters if not t.cancelled]
                if not job.waiters:
                    self._forget(job.request)
                    dropped.add(job.request.id)
        if dropped:
            self._pending = deque(job for job in self._pending if job.request.id not in dropped)
        return dropped

    def _forget(self, request: Request) -> _Job:
        job = self._jobs.pop(request.id)
        del self._by_ids[tuple(request.ids)]
        return job

    def _open_tickets(self) -> set[Ticket]:
        return {ticket for job in self._jobs.values() for ticket, _ in job.waiters}

    def _fail_all(self, error: BaseException) -> None:
        tickets = {ticket for job in self._jobs.values() for ticket, _ in job.waiters}
        self._pending.clear()
        self._jobs.clear()
        self._by_ids.clear()
        for ticket in tickets:
            if not ticket.cancelled:
                _deliver(ticket, error)


def _deliver(ticket: Ticket, item: Any) -> None:
    try:
        ticket.deliver(item)
    except Exception as error:  # noqa: BLE001 - a caller's broken channel (a closed event loop) must not stop the engine
        logger.debug("a result could not be delivered: %s", error)


# Workers still running at interpreter exit are stopped first, so no step is cut off mid-way by finalization.
_live: "weakref.WeakSet[EngineWorker]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for worker in list(_live):
        worker.close(timeout=10)
