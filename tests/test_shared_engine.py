"""One ranker, many callers: threads and asyncio tasks share one long-lived engine and each gets exactly
its own judgements, equal to judging its pairs alone; cancelled callers free their waiting pairs; an
engine failure reaches every caller and the next call works; the engine (its cache) is made once."""

import asyncio
import gc
import subprocess
import sys
import threading
import time
import weakref

import pytest
from conftest import make_pairs
from plant import plant_lengths

from rank1_hf import Rank1
from rank1_hf.engine.kv_cache import PagedCache
from rank1_hf.prompt import build_prompt
from rank1_hf.testing import tiny_model

MAX_NEW = 24
REASONING = [3, 20, 7, 15, 11, 5, 18, 9]  # planted reasoning lengths, by prompt length
CALLERS, EACH = 8, 4


@pytest.fixture(scope="module")
def planted(tokenizers):
    """A tiny Qwen2 whose reasoning length is planted per prompt length (some rows never close </think>)."""
    tok = tokenizers["qwen"]
    model = tiny_model(tok, "qwen2", seed=0)
    pairs = make_pairs(CALLERS * EACH, seed=21)
    lengths = sorted({len(tok(build_prompt(q, p))["input_ids"]) for q, p in pairs})
    never = set(lengths[2::7])
    reasoning = {n: REASONING[k % len(REASONING)] for k, n in enumerate(lengths) if n not in never}
    handle = plant_lengths(model, tok, reasoning, never=never)
    yield model, tok, pairs
    handle.remove()


def chunks(pairs):
    return [pairs[k * EACH : (k + 1) * EACH] for k in range(CALLERS)]


def run_callers(caller, count: int, timeout: float) -> None:
    """``caller(k)`` for k < count, each in its own (daemon) thread at once; all must end in time."""
    threads = [threading.Thread(target=caller, args=(k,), daemon=True) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), "a caller never got its judgements"


def assert_alone(got, alone):
    """Same reasoning, same outcome, scores within 1e-4 (batches differ, so float rounding may)."""
    assert [(j.outcome, j.reasoning, j.reasoning_tokens) for j in got] == [
        (j.outcome, j.reasoning, j.reasoning_tokens) for j in alone]
    assert max(abs(a.score - b.score) for a, b in zip(got, alone)) <= 1e-4


@pytest.mark.parametrize("engine", ["continuous", "generate"])
def test_threads_each_get_their_own_judgements(planted, engine):
    model, tok, pairs = planted
    ranker = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, engine=engine, batch_size=8)
    alone = [ranker.judge(chunk) for chunk in chunks(pairs)]  # one call at a time
    got: list = [None] * CALLERS
    peaks: list = [None] * CALLERS
    start = threading.Barrier(CALLERS)

    def caller(k):
        start.wait()
        judged = ranker.judge_with_stats(chunks(pairs)[k])
        got[k], peaks[k] = judged.judgements, judged.stats.peak_rows

    run_callers(caller, CALLERS, timeout=300)
    for k in range(CALLERS):
        assert_alone(got[k], alone[k])
    # The callers' rows shared steps: some step ran more rows than one caller has.
    assert max(peaks) > EACH
    ranker.close()


@pytest.mark.parametrize("engine", ["continuous", "generate"])
def test_asyncio_tasks_each_get_their_own_judgements(planted, engine):
    model, tok, pairs = planted
    ranker = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, engine=engine, batch_size=8)
    alone = [ranker.judge(chunk) for chunk in chunks(pairs)]

    async def main():
        return await asyncio.gather(*(ranker.ajudge(chunk) for chunk in chunks(pairs)))

    got = asyncio.run(main())
    for k in range(CALLERS):
        assert_alone(got[k], alone[k])
    ranks = asyncio.run(ranker.arank(pairs[0][0], [p for _, p in pairs[:5]], top_k=3))
    assert ranks == ranker.rank(pairs[0][0], [p for _, p in pairs[:5]], top_k=3)
    scores = asyncio.run(ranker.apredict(pairs[:3]))
    assert scores.tolist() == ranker.predict(pairs[:3]).tolist()
    ranker.close()


class Prefills:
    """Counts the prompt rows each forward call prefills (calls wider than one token)."""

    def __init__(self, model, delay=0.0):
        self.rows, self.delay = 0, delay
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1 and not bool((ids == 151666).any()):  # not a closing pass (it holds </think>)
            self.rows += ids.shape[0]
        time.sleep(self.delay)


def wait_until(condition, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_closed_iterator_frees_its_waiting_pairs(planted):
    model, tok, pairs = planted
    # speculate="off": Prefills counts every call wider than one token, as a verification step would be.
    ranker = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, engine="continuous", batch_size=2, speculate="off")
    prefills = Prefills(model, delay=0.01)
    try:
        judging = ranker.judge_iter(pairs[:16])
        next(judging)
        judging.close()
        worker = ranker.core.worker
        wait_until(lambda: worker.pending_prompts() == 0)
        started = prefills.rows
        time.sleep(0.3)
        assert prefills.rows == started < 16  # nothing of the closed call starts after it is closed
        # and the ranker goes on judging
        assert_alone(ranker.judge(pairs[:3]), Rank1.from_model(model, tok, max_new_tokens=MAX_NEW).judge(pairs[:3]))
    finally:
        prefills.handle.remove()
        ranker.close()


def test_a_cancelled_task_frees_its_waiting_pairs(planted):
    model, tok, pairs = planted
    # speculate="off": Prefills counts every call wider than one token, as a verification step would be.
    ranker = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, engine="continuous", batch_size=2, speculate="off")
    prefills = Prefills(model, delay=0.01)

    async def main():
        task = asyncio.create_task(ranker.ajudge(pairs[:16]))
        while prefills.rows == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        worker = ranker.core.worker
        while worker.pending_prompts():
            await asyncio.sleep(0.01)
        return await ranker.ajudge(pairs[:3])

    try:
        after = asyncio.run(asyncio.wait_for(main(), 60))
        assert prefills.rows < 16 + 3
        assert_alone(after, Rank1.from_model(model, tok, max_new_tokens=MAX_NEW).judge(pairs[:3]))
    finally:
        prefills.handle.remove()
        ranker.close()


@pytest.mark.parametrize("engine", ["continuous", "generate"])
def test_an_engine_failure_reaches_every_caller_and_the_next_call_works(planted, engine):
    model, tok, pairs = planted
    ranker = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, engine=engine, batch_size=4)
    callers = 3
    worker = ranker.core.worker
    fired = []
    head = model.get_output_embeddings()

    def hook(module, args, kwargs):
        # Fail once, when every caller's pairs are in the engine or waiting for it.
        if not fired and worker.pending_prompts() == callers * EACH:
            fired.append(True)
            raise RuntimeError("device lost (injected)")

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    errors: list = [None] * callers

    def caller(k):
        try:
            ranker.judge(chunks(pairs)[k])
        except RuntimeError as error:
            errors[k] = error

    try:
        run_callers(caller, callers, timeout=120)
    finally:
        handle.remove()
    assert fired and all(e is not None and "injected" in str(e) for e in errors)
    assert worker.pending_prompts() == 0
    wait_until(lambda: worker.engine_name is None)  # the failed engine is dropped
    assert model.get_output_embeddings() is head  # and gave the model its own output head back
    assert_alone(ranker.judge(pairs[:4]), Rank1.from_model(model, tok, max_new_tokens=MAX_NEW).judge(pairs[:4]))
    ranker.close()


def test_identical_pairs_in_flight_are_judged_once(planted):
    model, tok, pairs = planted
    ranker = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, engine="continuous", batch_size=4)
    worker = ranker.core.worker

    def hook(module, args, kwargs):  # the engine waits (bounded) until the second caller has joined
        deadline = time.monotonic() + 10
        while worker.joined == 0 and time.monotonic() < deadline:
            time.sleep(0.005)

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    prefills = Prefills(model)
    got: list = [None, None]

    def caller(k):
        got[k] = ranker.judge([pairs[5]])[0]

    try:
        run_callers(caller, 2, timeout=60)
    finally:
        handle.remove()
        prefills.handle.remove()
    assert worker.joined == 1 and prefills.rows == 1
    assert got[0] == got[1] and got[0] is not None
    ranker.close()


@pytest.fixture
def caches(monkeypatch):
    """Weak references to every PagedCache made while the test runs."""
    made = []
    real = PagedCache.__init__

    def spy(self, *args, **kwargs):
        made.append(weakref.ref(self))
        real(self, *args, **kwargs)

    monkeypatch.setattr(PagedCache, "__init__", spy)
    return made


def test_the_cache_is_made_once_for_every_call_and_freed_by_close(planted, caches):
    model, tok, pairs = planted
    with Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, engine="continuous", batch_size=4) as ranker:
        ranker.warmup()
        assert len(caches) == 1
        for k in range(3):
            ranker.judge(pairs[k * 3 : k * 3 + 3])
        assert len(caches) == 1  # warmup's cache served every call
    gc.collect()
    assert caches[0]() is None  # freed on leaving the with block
    assert ranker.judge(pairs[:2])  # a closed ranker starts a new engine when used again
    assert len(caches) == 2
    ranker.close()


def test_a_dropped_ranker_frees_its_engine(planted, caches):
    model, tok, pairs = planted
    ranker = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW)
    ranker.judge(pairs[:2])
    assert caches and caches[0]() is not None
    del ranker
    gc.collect()
    assert caches[0]() is None  # nothing keeps an unused ranker's engine (and its cache) alive


class ForwardThreads:
    """The threads the model's forward calls run in."""

    def __init__(self, model):
        self.seen: set = set()
        self.handle = model.register_forward_pre_hook(lambda *_: self.seen.add(threading.current_thread()))


def test_forward_calls_run_in_the_waiting_callers_thread(planted):
    """On a CPU, torch ops issued from a thread other than the caller's run up to 1.5x slower once the caller
    has an OpenMP team of its own (issue 29): a caller's judge() must step the engine in its own thread,
    and concurrent callers in theirs; asyncio callers in a thread that is not the event loop's."""
    model, tok, pairs = planted
    ranker = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, engine="continuous", batch_size=8)
    spy = ForwardThreads(model)
    try:
        ranker.judge(pairs[:6])
        assert spy.seen == {threading.current_thread()}

        spy.seen.clear()
        callers: list = [None] * 4
        start = threading.Barrier(4)

        def caller(k):
            callers[k] = threading.current_thread()
            start.wait()
            ranker.judge(chunks(pairs)[k])

        run_callers(caller, 4, timeout=120)
        assert spy.seen and spy.seen <= set(callers)

        spy.seen.clear()

        async def main():
            loop_thread = threading.current_thread()
            ticks = 0

            async def tick():  # the event loop keeps running while the engine steps
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.001)

            ticker = asyncio.create_task(tick())
            got = await ranker.ajudge(pairs[:8])
            ticker.cancel()
            return loop_thread, ticks, got

        loop_thread, ticks, got = asyncio.run(main())
        assert spy.seen and loop_thread not in spy.seen and len(got) == 8
        assert ticks > 10
    finally:
        spy.handle.remove()
        ranker.close()


def test_per_call_arguments_are_checked_like_the_options(planted):
    from rank1_hf import Rank1Error

    model, tok, pairs = planted
    ranker = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW)
    with pytest.raises(Rank1Error, match="batch_size must be a whole number"):
        ranker.judge(pairs[:1], batch_size=0)
    with pytest.raises(Rank1Error, match="dataset_prompt must be a string"):
        ranker.predict(pairs[:1], dataset_prompt=3)
    with pytest.raises(Rank1Error, match="top_k must be a whole number"):
        ranker.rank("q", ["a"], top_k=0)
    with pytest.raises(Rank1Error, match="pairs must be a list"):
        ranker.judge("what is a cat")
    with pytest.raises(Rank1Error, match="documents must be a list"):
        asyncio.run(ranker.arank("q", "a passage"))
    ranker.close()


def test_the_cli_imports_no_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, rank1_hf.cli; print('torch' in sys.modules)"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"




def test_async_judging_reuses_and_commits_to_the_store(planted, tmp_path):
    from rank1_hf.io.store import JudgementStore, settings_key

    model, tok, pairs = planted
    path = tmp_path / "s.sqlite"
    ranker = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, store=path)
    first = asyncio.run(ranker.ajudge_with_stats(pairs[:3] + pairs[:1]))
    assert first.reused == 1  # the repeated pair, judged once
    assert first.judgements[3] == first.judgements[0]
    with JudgementStore(path) as store:
        assert store.count(settings_key(ranker.settings())) == 3
    again = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, store=path)
    second = asyncio.run(again.ajudge_with_stats(pairs[:4]))
    assert second.reused == 3 and second.stats.steps > 0  # only the 4th pair was judged
    assert second.judgements[:3] == first.judgements[:3]
    assert_alone(second.judgements, Rank1.from_model(model, tok, max_new_tokens=MAX_NEW).judge(pairs[:4]))
    ranker.close()
    again.close()
