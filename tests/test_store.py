"""The judgement store: round trips, keys, crash durability, and two processes at once."""

from __future__ import annotations

import math
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rank1_hf.errors import Rank1Error
from rank1_hf.judgement import Judgement
from rank1_hf.io.store import JudgementStore, pair_key, settings_key

REPO = Path(__file__).resolve().parents[1]

SETTINGS = {
    "model": "jhu-clsp/rank1-7b",
    "revision": "abc123",
    "quantization": None,
    "dtype": "bfloat16",
    "max_new_tokens": 8192,
    "context_size": 16384,
    "prompt_template": "Determine if the following passage is relevant to the query...",
    "dataset_prompt": None,
}

# A child process that writes batches of `size` judgements for keys start, start+1, ...
# ("go" file: wait for it, so that two children start together; batches=0: write until killed).
# The stub package skips rank1_hf/__init__.py, which imports torch (seconds per child): the
# children need only the store, judgement and errors modules, imported from the real files.
WRITER = """
import sys, time, types
from pathlib import Path
sys.modules["rank1_hf"] = types.ModuleType("rank1_hf")
sys.modules["rank1_hf"].__path__ = [sys.argv[6]]
from rank1_hf.judgement import Judgement
from rank1_hf.io.store import JudgementStore

db, go, start, batches, size = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
while not Path(go).exists():
    time.sleep(0.01)
with JudgementStore(db) as store:
    b = 0
    while batches == 0 or b < batches:
        items = [(f"k{i}", Judgement(i / 7, "answered", "why " * 500 + str(i), i, 2 * i,
                                     float(i), -float(i), False))
                 for i in range(start + b * size, start + (b + 1) * size)]
        store.put_many("s", items)
        b += 1
        print(b, flush=True)
"""


def _writer(db: Path, go: Path, start: int, batches: int, size: int) -> subprocess.Popen[str]:
    args = [str(db), str(go), str(start), str(batches), str(size), str(REPO / "rank1_hf")]
    return subprocess.Popen([sys.executable, "-c", WRITER, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _integrity(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


def test_round_trip_is_exact(tmp_path: Path) -> None:
    judgements = [
        Judgement(1 / 3, "answered", "Le passage répond 🙂\n<b>oui</b> \x00 end", 123, 4567,
                  21.123456789012345, -3.0000000000000004, False),
        Judgement(5e-324, "forced", "", 0, 1, -math.inf, 1e308, True),
        Judgement(0.5, "fallback", "ünïcödé 漢字", 8192, 16384, None, None, False),
    ]
    keys = [pair_key(f"query {i}", "passage") for i in range(len(judgements))]
    with JudgementStore(tmp_path / "s.db") as store:
        key = store.register_settings(SETTINGS)
        assert store.put_many(key, list(zip(keys, judgements)),
                              meta={keys[0]: {"qid": "q1", "docid": "d1", "elapsed_s": 2.5}}) == 3
    with JudgementStore(tmp_path / "s.db") as store:  # reopened: really on disk
        got = store.get_many(key, keys + ["missing"])
        assert got == dict(zip(keys, judgements))
        assert type(got[keys[0]].truncated) is bool
        assert store.count(key) == 3
        assert store.get_settings(key) == SETTINGS


def test_same_pair_twice_is_harmless_and_first_kept(tmp_path: Path) -> None:
    first = Judgement(0.9, "answered", "first", 1, 2, 3.0, 1.0, False)
    again = Judgement(0.1, "answered", "again", 1, 2, 1.0, 3.0, False)
    with JudgementStore(tmp_path / "s.db") as store:
        assert store.put_many("s", [("k", first), ("k", first)]) == 1
        assert store.put_many("s", [("k", again)]) == 0
        assert store.get_many("s", ["k"]) == {"k": first}
        assert store.count("s") == 1


def test_failed_batch_writes_nothing(tmp_path: Path) -> None:
    j = Judgement(0.5, "answered", "r", 1, 2, 0.0, 0.0, False)
    with JudgementStore(tmp_path / "s.db") as store:
        # The last row cannot be bound, after the first ones were inserted: all must roll back.
        with pytest.raises(sqlite3.Error):
            store.put_many("s", [("a", j), ("b", j)], meta={"b": {"qid": object()}})
        with pytest.raises(ValueError):
            store.put_many("s", [("c", Judgement(math.nan, "answered", "", 0, 0, None, None, False))])
        assert store.count("s") == 0
        assert store.put_many("s", [("a", j)]) == 1  # and the store is still usable


def test_settings_keys_keep_pairs_apart(tmp_path: Path) -> None:
    other = {**SETTINGS, "max_new_tokens": 1024}
    pk = pair_key("q", "p")
    a = Judgement(0.9, "answered", "long", 900, 50, 2.0, 0.0, False)
    b = Judgement(0.2, "forced", "short", 1024, 50, 0.0, 1.4, False)
    with JudgementStore(tmp_path / "s.db") as store:
        ka, kb = store.register_settings(SETTINGS), store.register_settings(other)
        assert ka != kb
        store.put_many(ka, [(pk, a)])
        store.put_many(kb, [(pk, b)])
        assert store.get_many(ka, [pk]) == {pk: a}
        assert store.get_many(kb, [pk]) == {pk: b}
        assert store.count(ka) == store.count(kb) == 1


def test_settings_key_stable_and_sensitive() -> None:
    reordered = dict(reversed(list(SETTINGS.items())))
    assert settings_key(reordered) == settings_key(SETTINGS)
    assert settings_key({"a": {"x": 1, "y": 2}}) == settings_key({"a": {"y": 2, "x": 1}})
    base = settings_key(SETTINGS)
    for field in SETTINGS:
        changed = {**SETTINGS, field: "something else"}
        assert settings_key(changed) != base, field
        removed = {k: v for k, v in SETTINGS.items() if k != field}
        assert settings_key(removed) != base, field
    assert settings_key({"n": 1}) != settings_key({"n": "1"}) != settings_key({"n": True})
    assert settings_key({**SETTINGS, "extra": None}) != base
    with pytest.raises(TypeError):
        settings_key({"path": Path("/x")})


def test_pair_key_is_unambiguous() -> None:
    assert pair_key("ab", "c") != pair_key("a", "bc")
    assert pair_key("a\x00", "b") != pair_key("a", "\x00b")
    assert pair_key("q", "p") == pair_key("q", "p") != pair_key("p", "q")
    assert len(pair_key("q", "p")) == 64


def test_get_many_with_thousands_of_keys(tmp_path: Path) -> None:
    j = Judgement(0.5, "answered", "r", 1, 2, 0.0, 0.0, False)
    keys = [pair_key(str(i), "p") for i in range(3000)]
    with JudgementStore(tmp_path / "s.db") as store:
        store.put_many("s", [(k, j) for k in keys[::2]])
        got = store.get_many("s", keys)
    assert set(got) == set(keys[::2])


def test_sigkill_loses_only_the_batch_in_flight(tmp_path: Path) -> None:
    db, go, size = tmp_path / "s.db", tmp_path / "go", 40
    go.touch()
    child = _writer(db, go, 0, 0, size)
    try:
        assert child.stdout is not None
        for _ in range(5):  # let it commit a few batches, then kill it while it writes more
            assert child.stdout.readline(), child.stderr.read() if child.stderr else ""
        time.sleep(0.2)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        child.kill()
        child.communicate()
    with JudgementStore(db) as store:
        n = store.count("s")
    assert n >= 5 * size and n % size == 0
    assert _integrity(db) == "ok"


def test_two_processes_write_the_same_store(tmp_path: Path) -> None:
    db, go = tmp_path / "new" / "s.db", tmp_path / "go"
    # 2 x 20 batches of 50; keys 500..999 are written by both. Both also create the fresh file.
    writers = [_writer(db, go, 0, 20, 50), _writer(db, go, 500, 20, 50)]
    go.touch()
    for w in writers:
        out, err = w.communicate(timeout=120)
        assert w.returncode == 0, err
        assert "locked" not in err and out.split()[-1] == "20"
    with JudgementStore(db) as store:
        assert store.count("s") == 1500
        got = store.get_many("s", [f"k{i}" for i in range(1500)])
    assert len(got) == 1500
    assert got["k777"] == Judgement(777 / 7, "answered", "why " * 500 + "777", 777, 1554,
                                    777.0, -777.0, False)
    assert _integrity(db) == "ok"


def test_unusable_path_gives_rank1error(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(Rank1Error, match="a_file"):
        JudgementStore(blocker / "sub" / "s.db")  # parent cannot be created
    with pytest.raises(Rank1Error, match=str(tmp_path)):
        JudgementStore(tmp_path)  # a folder, not a file
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"x" * 4096)
    with pytest.raises(Rank1Error, match="junk.db"):
        JudgementStore(junk)  # not an SQLite file


def _judgement(score: float) -> Judgement:
    return Judgement(score, "answered", f"stored {score}", 3, 9, 1.0, -1.0, False)


def test_the_first_store_holding_a_pair_wins(tmp_path: Path) -> None:
    """With several stores (a job's own store, then its sources), a pair held by more than one is taken
    from the first of them: a later store never overrides an earlier one, whatever order it answers in."""
    from rank1_hf.io import reuse

    keys = ["k-both", "k-second", "k-third", "k-none"]
    stores = [JudgementStore(tmp_path / f"{name}.sqlite") for name in ("own", "second", "third")]
    stores[0].put_many("s", [("k-both", _judgement(0.25))])
    stores[1].put_many("s", [("k-both", _judgement(0.75)), ("k-second", _judgement(0.5)), ("k-third", _judgement(0.1))])
    stores[2].put_many("s", [("k-both", _judgement(0.9)), ("k-third", _judgement(0.6))])
    planned = reuse.plan(keys, stores, "s")
    assert planned.found == {"k-both", "k-second", "k-third"} and planned.todo == ["k-none"]
    got = reuse.fetch(stores, "s", planned.found)
    assert {k: j.score for k, j in got.items()} == {"k-both": 0.25, "k-second": 0.5, "k-third": 0.1}
    for store in stores:
        store.close()


def test_a_jobs_sources_never_override_its_own_store(tmp_path: Path, tiny) -> None:
    """pipeline.judge_items reads its own store first, then ``sources`` in order; nothing is judged."""
    from conftest import ranker_for

    from rank1_hf import pipeline
    from rank1_hf.io import reuse

    ranker = ranker_for(tiny)

    def fail(*args, **kwargs):
        raise AssertionError("judged: every pair is stored")

    ranker.judge_iter = fail  # type: ignore[method-assign]
    items = [pipeline.Item("q1", f"d{i}", "what is a cat", text, None, i + 1, 1.0)
             for i, text in enumerate(["Cats purr.", "Dogs bark."])]
    skey = settings_key(ranker.settings())
    k0, k1 = reuse.pair_keys([(it.query, it.passage, it.instruction) for it in items], ranker.dataset_prompt)
    own, source, later = (JudgementStore(tmp_path / f"{name}.sqlite") for name in ("own", "source", "later"))
    own.put_many(skey, [(k0, _judgement(0.25))])
    source.put_many(skey, [(k0, _judgement(0.75)), (k1, _judgement(0.5))])
    later.put_many(skey, [(k0, _judgement(0.9)), (k1, _judgement(0.8))])
    result = pipeline.judge_items(ranker, items, own, sources=[source, later])
    assert {docid: j.score for (_, docid), j in result.judgements.items()} == {"d0": 0.25, "d1": 0.5}
    for store in (own, source, later):
        store.close()
