"""The shared engine's queue and its drivers, with a scripted engine (no model): order, joins, cancels,
failures anywhere in a step, and who steps the engine."""

import queue
import threading
from collections import deque

import pytest

from rank1_hf.engine.types import EngineStats, Generation
from rank1_hf.errors import Rank1Error
from rank1_hf.engine.worker import EngineWorker, Ticket


class ScriptedEngine:
    """Takes up to ``slots`` requests a step; a request finishes ``steps`` steps after it was taken. The
    first step gives back (as after out of memory or preemption) the requests named in ``give_back``."""

    name = "scripted"

    def __init__(self, slots=2, steps=1, give_back=()):
        self.slots, self.steps, self.give_back = slots, steps, set(give_back)
        self.stats = EngineStats()
        self.rows_stepped = 0
        self.rows: dict[int, list] = {}  # request id -> [request, steps left]
        self.taken: list[int] = []  # request ids in the order the engine took them
        self.dropped: set[int] = set()
        self.threads: set = set()

    def wants(self):
        return self.slots - len(self.rows)

    def step(self, waiting: deque):
        self.threads.add(threading.current_thread())
        while waiting and len(self.rows) < self.slots:
            request = waiting.popleft()
            self.taken.append(request.id)
            self.rows[request.id] = [request, self.steps]
        for rid in [r for r in self.rows if r in self.give_back]:
            self.give_back.discard(rid)
            waiting.appendleft(self.rows.pop(rid)[0])
        self.stats.steps += 1
        self.rows_stepped = len(self.rows)
        done = []
        for rid, row in list(self.rows.items()):
            row[1] -= 1
            if row[1] <= 0:
                del self.rows[rid]
                done.append((row[0], Generation([rid], None, (1.0, 0.0))))
        return done

    def drop(self, ids):
        self.dropped |= ids
        for rid in ids:
            self.rows.pop(rid, None)

    def warmup(self):
        pass

    def close(self):
        pass


def collect(worker, ticket_results, n, timeout=10.0):
    """Drive until ``n`` items arrived (bounded), then return them."""
    got = []
    deadline = threading.Event()
    timer = threading.Timer(timeout, deadline.set)
    timer.start()
    try:
        while len(got) < n and not deadline.is_set():
            worker.drive(lambda: not ticket_results.empty())
            while not ticket_results.empty():
                got.append(ticket_results.get())
    finally:
        timer.cancel()
    assert len(got) == n, f"got {len(got)} of {n}"
    return got


def open_ticket():
    results = queue.SimpleQueue()
    return Ticket(results.put), results


def test_requests_given_back_return_to_the_front_of_the_queue():
    engine = ScriptedEngine(slots=2, steps=3, give_back={1})
    worker = EngineWorker(lambda: engine)
    ticket, results = open_ticket()
    worker.submit(ticket, [(k, [10 + k], f"p{k}") for k in range(5)])
    collect(worker, results, 5)
    # 0 and 1 taken; 1 given back goes before 2, 3, 4 (not after them).
    assert engine.taken[:3] == [0, 1, 1]
    assert engine.taken == [0, 1, 1, 2, 3, 4]


def test_a_cancel_keeps_a_prompt_another_caller_joined():
    engine = ScriptedEngine(slots=1, steps=2)
    worker = EngineWorker(lambda: engine)
    first, first_results = open_ticket()
    second, second_results = open_ticket()
    worker.submit(first, [(0, [1], "a"), (1, [2], "b")])
    worker.submit(second, [(0, [2], "b")])  # joins the first caller's "b"
    worker.cancel(first)
    (item,) = collect(worker, second_results, 1)
    assert item[0] == 0 and item[1].tokens == [1]  # "b" (request 1) was judged for the second caller
    assert worker.pending_prompts() == 0
    assert 0 in engine.dropped or 0 not in engine.taken  # "a", which nobody waits for, was dropped
    assert first_results.empty()


def test_a_cancelled_callers_prompts_leave_at_once_when_nobody_drives():
    engine = ScriptedEngine(slots=1, steps=5)
    worker = EngineWorker(lambda: engine)
    ticket, results = open_ticket()
    other, other_results = open_ticket()
    worker.submit(ticket, [(k, [k], str(k)) for k in range(3)])
    worker.submit(other, [(0, [9], "9")])
    worker.drive(lambda: engine.stats.steps >= 1)  # request 0 is in the engine now
    worker.cancel(ticket)
    assert worker.pending_prompts() == 1  # only the other caller's prompt is left
    assert 0 in engine.dropped  # its row left the engine without waiting for a step
    collect(worker, other_results, 1)


@pytest.mark.parametrize("where", ["drop", "stats", "step"])
def test_an_error_anywhere_in_a_step_reaches_every_caller_and_the_next_call_gets_a_fresh_engine(where):
    engines = []

    class Broken(ScriptedEngine):
        def drop(self, ids):
            if where == "drop":
                raise RuntimeError("bookkeeping broke (injected)")
            super().drop(ids)

        def step(self, waiting):
            if where == "step":
                raise RuntimeError("engine broke (injected)")
            out = super().step(waiting)
            if where == "stats":
                self.rows_stepped = None  # the worker's accounting after the step fails
            return out

    def make():
        engines.append(Broken(slots=1, steps=3) if not engines else ScriptedEngine())
        return engines[-1]

    worker = EngineWorker(make)
    tickets = [open_ticket() for _ in range(3)]
    for k, (ticket, _) in enumerate(tickets):
        worker.submit(ticket, [(0, [k], str(k))])
    if where == "drop":  # a cancelled request in the engine sends the worker through drop
        extra, _ = open_ticket()
        worker.submit(extra, [(0, [99], "99")])
        worker.drive(lambda: bool(engines) and engines[0].stats.steps >= 1)
        worker.cancel(extra)
    errors = []
    for ticket, results in tickets:
        (item,) = collect(worker, results, 1)
        errors.append(item)
    assert all(isinstance(e, Exception) for e in errors)  # the error itself, once to each caller
    assert where == "stats" or all("injected" in str(e) for e in errors)
    assert worker.pending_prompts() == 0 and worker.engine_name is None
    ticket, results = open_ticket()
    worker.submit(ticket, [(0, [5], "5")])
    (item,) = collect(worker, results, 1)
    assert len(engines) == 2 and engines[1].taken == item[1].tokens  # a fresh engine judged it


def test_concurrent_callers_step_in_their_own_threads_and_share_steps():
    engine = ScriptedEngine(slots=8, steps=4)
    worker = EngineWorker(lambda: engine)
    threads, got = [], {}
    start = threading.Barrier(4)

    def caller(k):
        ticket, results = open_ticket()
        start.wait()
        worker.submit(ticket, [(i, [k, i], f"{k}.{i}") for i in range(2)])
        got[k] = collect(worker, results, 2)

    for k in range(4):
        threads.append(threading.Thread(target=caller, args=(k,), daemon=True))
        threads[-1].start()
    for t in threads:
        t.join(timeout=20)
    assert len(got) == 4
    assert engine.threads <= set(threads)  # never a thread of the worker's own
    assert engine.stats.steps < 4 * 4  # the callers' rows shared steps


def test_a_closed_worker_fails_its_waiting_callers_and_refuses_new_work():
    engine = ScriptedEngine(slots=1, steps=50)
    worker = EngineWorker(lambda: engine)
    ticket, results = open_ticket()
    worker.submit(ticket, [(0, [1], "a"), (1, [2], "b")])
    worker.drive(lambda: engine.stats.steps >= 2)
    worker.close()
    assert isinstance(results.get(timeout=5), Rank1Error)
    assert worker.engine_name is None
    with pytest.raises(Rank1Error, match="closed"):
        worker.submit(ticket, [(0, [3], "c")])
