"""One engine for every caller, stepped by whichever caller is waiting for it.

Callers (threads, asyncio tasks) never touch the model directly. Each call opens a :class:`Ticket` and
submits its prompts; they queue first come, first served, and every engine step runs rows of whichever
callers have work, so concurrent calls share decode steps. A finished row is handed to the tickets
waiting for it, and only to them:

- identical prompts waiting or in flight at the same time are judged once, for every ticket that asked;
- a cancelled ticket's prompts leave the queue, and its rows in flight leave their slots, unless
  another ticket waits for the same prompt;
- an engine error (out of memory is handled inside the engine), or any error in the bookkeeping around
  a step, reaches every ticket with work in the engine, and the next call gets a fresh engine.

Who steps the engine: a caller that waits for its results drives the engine itself, in its own thread,
while no other thread does (:meth:`EngineWorker.drive`); the others wait for the driver's steps, and the
next one takes over when the driver has what it waited for. So one caller's ``judge()`` runs every forward
call in the caller's thread: on a CPU, torch ops issued from a second thread, once the main thread has its
own OpenMP team, run up to 1.5x slower (benchmarks/thread_cost.py). asyncio callers must not block their
event loop: their ticket is stepped by a background thread that drives while work is left and then ends.

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

from .types import EngineStats, Generation, Request
from ..errors import Rank1Error

logger = logging.getLogger(__name__)


class Engine(Protocol):
    """What the worker needs of an engine (:class:`~rank1_hf.engine.continuous.ContinuousEngine`,
    :class:`~rank1_hf.engine.generate.GenerateEngine`)."""

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
    """The engine of one ranker, made by ``make_engine`` on first use, and the queue of every caller."""

    def __init__(self, make_engine: Callable[[], Engine]):
        self._make_engine = make_engine
        self._engine: Engine | None = None
        self._lock = threading.Condition()
        self._pending: deque[_Job] = deque()  # submitted, not yet given to the engine
        self._jobs: dict[int, _Job] = {}  # pending or in the engine, by request id
        self._by_ids: dict[tuple[int, ...], _Job] = {}  # the same, by prompt ids (identical prompts join)
        self._dropped: set[int] = set()  # request ids nobody waits for, to leave the engine before its next step
        self._next_id = 0
        self._closed = False
        self._driver: threading.Thread | None = None  # the thread stepping the engine now
        self._background: threading.Thread | None = None  # drives for asyncio callers while work is left
        self.joined = 0  # prompts that joined an identical one already waiting or in flight
        self.judged = 0  # prompts the engine finished (each distinct prompt once, however many waited)
        self.stats = EngineStats()  # all the work of this worker's engines (a replaced engine's too)
        _live.add(self)

    # ---- callers' side (any thread) ------------------------------------------------------------------

    def submit(self, ticket: Ticket, prompts: list[tuple[int, list[int], str]], background: bool = False) -> None:
        """Queue ``(caller's index, prompt ids, prompt string)`` for ``ticket``. A caller that does not
        :meth:`drive` itself (an asyncio task) asks for ``background`` stepping."""
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
            if background and self._background is None:
                self._background = threading.Thread(target=self._drive_in_background, name="rank1-engine",
                                                    daemon=True)
                self._background.start()
            self._lock.notify_all()

    def drive(self, until: Callable[[], bool]) -> None:
        """Return once ``until()`` holds, or once no work is left; meanwhile step the engine in this
        thread whenever no other thread does, and wait for the driver's steps when one does."""
        me = threading.current_thread()
        with self._lock:
            while self._driver is not None and not until():
                self._lock.wait()
            if until() or not self._jobs:
                return
            self._driver = me
        try:
            while True:
                self._step()
                with self._lock:
                    self._lock.notify_all()  # waiters check what this step delivered
                    if until() or not self._jobs or self._closed:
                        return
        finally:
            self._release()

    def cancel(self, ticket: Ticket) -> None:
        """The ticket's caller is gone: nothing more is delivered to it, and its prompts that no other
        ticket waits for leave the queue now and the engine's slots before its next step."""
        with self._lock:
            ticket.cancelled = True
            self._sweep_cancelled()
            idle = self._driver is None and self._dropped and self._engine is not None
            if idle:
                self._driver = threading.current_thread()
            self._lock.notify_all()
        if idle:  # else the driver drops them before its next step
            try:
                self._guarded(lambda: self._drop_cancelled(self._engine))
            finally:
                self._release()

    def call(self, fn: Callable[[Engine], Any]) -> Any:
        """Run ``fn(engine)`` in this thread between steps and return its result (or raise its error)."""
        me = threading.current_thread()
        with self._lock:
            while self._driver is not None:
                self._lock.wait()
            if self._closed:
                raise Rank1Error("this ranker is closed")
            self._driver = me
        try:
            return fn(self._engine_now())
        finally:
            self._release()

    def close(self, timeout: float | None = None) -> None:
        """Free the engine (after the step in progress, if any); waiting tickets get an error."""
        with self._lock:
            self._closed = True
            self._fail_all(Rank1Error("this ranker was closed while judging"))
            self._lock.notify_all()
            idle = self._driver is None
            if idle:
                self._driver = threading.current_thread()
        if idle:  # else the driver drops it after its step
            self._release()
        background = self._background
        if background is not None and background is not threading.current_thread():
            background.join(timeout)

    @property
    def engine_name(self) -> str | None:
        return self._engine.name if self._engine is not None else None

    def pending_prompts(self) -> int:
        """Prompts waiting or in the engine."""
        with self._lock:
            return len(self._jobs)

    # ---- the driver's side ---------------------------------------------------------------------------

    def _release(self) -> None:
        """The driver leaves; the engine of a closed worker goes with it."""
        with self._lock:
            try:
                if self._closed:
                    self._drop_engine()
            finally:
                self._driver = None
                self._lock.notify_all()

    def _drive_in_background(self) -> None:
        while True:
            self.drive(lambda: self._closed)
            with self._lock:
                if self._closed or not self._jobs:  # a later submit starts a new one
                    self._background = None
                    return

    def _drop_engine(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()

    def _engine_now(self) -> Engine:
        if self._engine is None:
            self._engine = self._make_engine()
        return self._engine

    def _step(self) -> None:
        """One engine step and its deliveries."""
        done: list = []

        def step() -> None:
            engine = self._engine_now()
            self._drop_cancelled(engine)
            with self._lock:
                waiting = deque(job.request for job in self._take(engine.wants()))
            before = engine.stats.copy()
            finished = engine.step(waiting)
            with self._lock:
                # What the step did not take (or gave back after out of memory) goes back to the queue's front.
                self._pending.extendleft(reversed([self._jobs[r.id] for r in waiting if r.id in self._jobs]))
                for ticket in self._open_tickets():
                    ticket.stats.add_since(engine.stats, before, engine.rows_stepped)
                self.stats.add_since(engine.stats, before, engine.rows_stepped)
                for request, generation in finished:
                    if request.id in self._jobs:  # not cancelled meanwhile
                        done.append((self._jobs.pop(request.id), generation))
                        del self._by_ids[tuple(request.ids)]
                self.judged += len(done)

        self._guarded(step)
        for job, generation in done:
            for ticket, index in job.waiters:
                if not ticket.cancelled:
                    _deliver(ticket, (index, generation))

    def _guarded(self, work: Callable[[], None]) -> None:
        """Run the driver's ``work``. Any error, in the engine or in the bookkeeping around it, fails every
        waiting ticket and drops the engine (the next call gets a fresh one); an interrupt (Ctrl-C in the
        driving caller) is raised on after that."""
        try:
            work()
        except BaseException as error:  # noqa: BLE001 - an engine failure goes to its callers
            logger.error("the engine failed: %s", error or type(error).__name__)
            reason = error if isinstance(error, Exception) else Rank1Error(
                f"judging was interrupted ({type(error).__name__})")
            with self._lock:
                self._fail_all(reason)
            self._drop_engine()
            if not isinstance(error, Exception):
                raise

    def _drop_cancelled(self, engine: Engine) -> None:
        with self._lock:
            dropped, self._dropped = self._dropped, set()
        if dropped:
            engine.drop(dropped)

    def _take(self, count: int) -> list[_Job]:
        taken = []
        while self._pending and len(taken) < count:
            taken.append(self._pending.popleft())
        return taken

    def _sweep_cancelled(self) -> None:
        """Drop cancelled tickets' waiters, and the jobs nobody waits for any more (their ids, which may be
        in the engine, go to ``_dropped``)."""
        for job in list(self._jobs.values()):
            if any(t.cancelled for t, _ in job.waiters):
                job.waiters = [(t, i) for t, i in job.waiters if not t.cancelled]
                if not job.waiters:
                    del self._jobs[job.request.id], self._by_ids[tuple(job.request.ids)]
                    self._dropped.add(job.request.id)
        if self._dropped:
            self._pending = deque(job for job in self._pending if job.request.id not in self._dropped)

    def _open_tickets(self) -> set[Ticket]:
        return {ticket for job in self._jobs.values() for ticket, _ in job.waiters}

    def _fail_all(self, error: BaseException) -> None:
        tickets = self._open_tickets()
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


# Workers still in use at interpreter exit are closed first, so no step is cut off mid-way by finalization.
_live: "weakref.WeakSet[EngineWorker]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for worker in list(_live):
        worker.close(timeout=10)
