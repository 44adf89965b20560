"""--flush-seconds: finished judgements are committed on time, seen from outside through a second
connection to the store file, while flush_every alone would hold them to the end of the job."""

from __future__ import annotations

import sqlite3
import time

import pytest

from rank1_hf import Rank1, pipeline
from rank1_hf.io.store import JudgementStore
from rank1_hf.testing import qwen_tokenizer, tiny_model

QUERIES = {"q1": "how do cats purr", "q2": "bread ovens"}
CORPUS = {"d1": "Cats purr with their larynx.", "d2": "Deck ovens bake bread.", "d3": "Rivers flow to the sea."}
RUN = {"q1": [("d1", 3.0), ("d2", 2.0), ("d3", 1.0)], "q2": [("d2", 2.0), ("d1", 1.0), ("d3", 0.5)]}


@pytest.fixture(scope="module")
def ranker():
    tok = qwen_tokenizer()
    return Rank1.from_model(tiny_model(tok), tok, max_new_tokens=4, context_size=512, batch_size=1)


def _committed(path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]


@pytest.mark.parametrize("seconds, committed_during_the_job", [(0.05, True), (3600.0, False)])
def test_flush_seconds_commits_finished_judgements_on_time(ranker, tmp_path, seconds, committed_during_the_job):
    items = pipeline.build_items(RUN, QUERIES, CORPUS)
    path = tmp_path / "s.sqlite"
    seen: list[int] = []

    def progress(n):
        time.sleep(0.12)  # more than flush_seconds passes before the next judgement arrives
        seen.append(_committed(path))

    with JudgementStore(path) as store:
        result = pipeline.judge_items(ranker, items, store, flush_every=1000, flush_seconds=seconds,
                                      progress=progress)
    assert result.summary.judged_here == len(items) == 6
    assert _committed(path) == 6
    if committed_during_the_job:
        # each judgement after the first arrives more than flush_seconds after the oldest one waiting,
        # so by the last progress call at least all but the newest are on disk
        assert seen[-1] >= len(items) - 1 and seen == sorted(seen), seen
    else:
        assert seen == [0] * len(items)  # flush_every=1000 holds them all until the end
