"""The rerank pipeline in-process: items, store reuse, dedup, sharding, interrupts, dataset prompts."""

from __future__ import annotations

import sqlite3

import pytest

from rank1_hf import pipeline
from rank1_hf.errors import Rank1Error
from rank1_hf.dataset_prompts import DATASET_PROMPTS, resolve_dataset_prompt
from rank1_hf.io.store import JudgementStore, settings_key

QUERIES = {"q1": "how do cats purr", "q2": "how do cats purr", "q3": "best bread oven"}
CORPUS = {
    "d1": "Cats purr by vibrating the muscles of the larynx.",
    "d2": "A deck oven bakes bread evenly.",
    "d3": "Dogs bark when they are excited.",
    "d4": "Cats purr by vibrating the muscles of the larynx.",  # same text as d1
}
RUN = {
    "q1": [("d1", 3.0), ("d2", 2.0), ("d3", 1.0)],
    "q2": [("d4", 5.0), ("d3", 4.0)],  # (q2, d4) has the same texts as (q1, d1)
    "q3": [("d2", 9.0), ("d3", 9.0), ("d1", 1.0)],
}


@pytest.fixture(scope="module")
def ranker():
    from rank1_hf.testing import qwen_tokenizer, tiny_model
    from rank1_hf.ranker import Rank1

    tok = qwen_tokenizer()
    # One row at a time: rank and shard runs are compared with a single run judgement for judgement, exactly.
    return Rank1.from_model(tiny_model(tok), tok, max_new_tokens=6, context_size=512, batch_size=1)


def test_build_items_order_topk_and_duplicates():
    items = pipeline.build_items(RUN, QUERIES, CORPUS, top_k=2)
    assert [(it.qid, it.docid, it.first_stage_rank) for it in items] == [
        # q3's tie at 9.0 goes to the larger docid, as trec_eval ranks it
        ("q1", "d1", 1), ("q1", "d2", 2), ("q2", "d4", 1), ("q2", "d3", 2), ("q3", "d3", 1), ("q3", "d2", 2),
    ]
    with pytest.raises(Rank1Error, match="duplicate pair qid 'q1' docid 'd1'"):
        pipeline.build_items({"q1": [("d1", 1.0), ("d1", 0.5)]}, QUERIES, CORPUS)
    with pytest.raises(Rank1Error, match="docid 'zz'"):
        pipeline.build_items({"q1": [("zz", 1.0)]}, QUERIES, CORPUS)


def test_judge_reuse_and_identical_texts(ranker, tmp_path):
    items = pipeline.build_items(RUN, QUERIES, CORPUS)
    with JudgementStore(tmp_path / "s.sqlite") as store:
        first = pipeline.judge_items(ranker, items, store, shard=pipeline.Shard())
        # 8 pairs, but q2 reads like q1, so (q2, d4) = (q1, d1) and (q2, d3) = (q1, d3): 6 distinct.
        assert (first.summary.pairs, first.summary.distinct, first.summary.judged_now) == (8, 6, 6)
        assert first.judgements[("q1", "d1")] == first.judgements[("q2", "d4")]
        again = pipeline.judge_items(ranker, items, store, shard=pipeline.Shard())
    assert (again.summary.reused, again.summary.judged_now) == (6, 0)
    assert again.judgements == first.judgements
    run = pipeline.reranked_run(items, first.judgements)
    for docs in run.values():  # score descending, ties by docid descending (trec_eval's order)
        assert all(a[1] > b[1] or (a[1] == b[1] and a[0] > b[0]) for a, b in zip(docs, docs[1:]))
    rows = pipeline.trace_rows(items, first.judgements)
    assert [(r["qid"], r["docid"]) for r in rows] == [(q, d) for q, docs in run.items() for d, _ in docs]
    assert set(rows[0]) == set(pipeline.TRACE_FIELDS)


def test_shards_are_chosen_by_key_and_add_up_to_a_single_process_run(ranker, tmp_path):
    items = pipeline.build_items(RUN, QUERIES, CORPUS)
    with JudgementStore(tmp_path / "one.sqlite") as store:
        single = pipeline.judge_items(ranker, items, store, shard=pipeline.Shard())
    keys = {(it.qid, it.docid): pipeline.item_key(ranker, it) for it in items}
    parts = []
    for rank in (0, 1):
        with JudgementStore(tmp_path / f"shard{rank}.sqlite") as store:
            parts.append(pipeline.judge_items(ranker, items, store, shard=pipeline.Shard(rank, 2)))
    for rank, part in enumerate(parts):
        # Each shard holds exactly the pairs whose key hashes to it (by the key's first 16 hex digits).
        assert set(part.judgements) == {ids for ids, pk in keys.items() if int(pk[:16], 16) % 2 == rank}
    assert parts[0].summary.judged_here + parts[1].summary.judged_here == 6
    assert {**parts[0].judgements, **parts[1].judgements} == single.judgements
    # The shard of a pair does not depend on where it is in the input: reversed items, same shard 0.
    with JudgementStore(tmp_path / "reversed.sqlite") as store:
        rev = pipeline.judge_items(ranker, items[::-1], store, shard=pipeline.Shard(0, 2))
    assert set(rev.judgements) == set(parts[0].judgements)


def test_sources_are_reused_and_new_judgements_go_to_the_first_store(ranker, tmp_path):
    items = pipeline.build_items(RUN, QUERIES, CORPUS)
    for rank in (0, 1):
        with JudgementStore(tmp_path / f"shard{rank}.sqlite") as store:
            pipeline.judge_items(ranker, items, store, shard=pipeline.Shard(rank, 2))
    skey = settings_key(ranker.settings())
    # Three shards over stores written as two: every pair is found, nothing judged, nothing written.
    with JudgementStore(tmp_path / "shard0.sqlite", readonly=True) as a, \
            JudgementStore(tmp_path / "shard1.sqlite", readonly=True) as b:
        for rank in range(3):
            with JudgementStore(tmp_path / f"three{rank}.sqlite") as store:
                result = pipeline.judge_items(ranker, items, store, sources=[a, b], shard=pipeline.Shard(rank, 3))
                assert result.summary.judged_now == 0 and store.count(skey) == 0
        with JudgementStore(tmp_path / "merged.sqlite") as merged:
            full = pipeline.judge_items(ranker, items, merged, sources=[a], shard=pipeline.Shard())
            # shard 1's pairs were missing from the sources: judged now, into the first store only.
            assert full.summary.judged_now == merged.count(skey) > 0
    assert full.summary.reused + full.summary.judged_now == 6
    assert len(full.judgements) == len(items)


def test_ranks_write_their_own_files_and_rank0_collects_only_this_jobs(ranker, tmp_path):
    items = pipeline.build_items(RUN, QUERIES, CORPUS)
    with JudgementStore(tmp_path / "one.sqlite") as store:
        single = pipeline.judge_items(ranker, items, store, shard=pipeline.Shard())
    base = tmp_path / "shared" / "j.sqlite"
    # Rank 1 of 2 judges a shorter job first: its .done marker names that job, not this one.
    pipeline.judge_across_ranks(ranker, items[:3], base, pipeline.Shard(1, 2))
    with pytest.raises(Rank1Error, match="gave up waiting .* j.rank1-of-2.sqlite.done"):
        pipeline.judge_across_ranks(ranker, items, base, pipeline.Shard(0, 2),
                                    poll_seconds=0.05, wait_timeout_s=0.3)
    helper = pipeline.judge_across_ranks(ranker, items, base, pipeline.Shard(1, 2))
    main = pipeline.judge_across_ranks(ranker, items, base, pipeline.Shard(0, 2))
    assert main.judgements == single.judgements
    # Rank 0 finished its shard before it timed out; now only rank 1's rest was judged, by rank 1.
    assert main.summary.judged_here == 0 and main.summary.judged_now == helper.summary.judged_here > 0
    assert (main.summary.pairs, main.summary.distinct, main.summary.reused) == (8, 6, 6 - main.summary.judged_now)
    assert sorted(pipeline.rank_store_paths(base).values(), key=lambda s: s.rank) == [
        pipeline.Shard(0, 2), pipeline.Shard(1, 2)]


def test_interrupt_commits_finished_judgements(ranker, tmp_path):
    items = pipeline.build_items(RUN, QUERIES, CORPUS)
    done = []

    def progress(n: int) -> None:
        done.append(n)
        if len(done) == 3:
            raise KeyboardInterrupt

    with JudgementStore(tmp_path / "s.sqlite") as store:
        with pytest.raises(KeyboardInterrupt):
            # flush_every far above 3: only the final flush on the way out can have written them.
            pipeline.judge_items(ranker, items, store, shard=pipeline.Shard(), progress=progress,
                                 flush_every=100, flush_seconds=1e9)
    with sqlite3.connect(tmp_path / "s.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM judgements").fetchone()[0] == 3


def test_shard_from_env():
    assert pipeline.Shard.from_env({}) == pipeline.Shard(0, 1, 0)
    assert pipeline.Shard.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == pipeline.Shard(1, 2, 1)
    with pytest.raises(Rank1Error):
        pipeline.Shard.from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_summary_names_truncated_pairs():
    s = pipeline.Summary(pairs=2, distinct=2, judged_now=2, truncated=[("q1", "d9")], elapsed_s=2.0)
    text = "\n".join(s.lines())
    assert "truncated: 1 (passage cut to fit context_size: q1/d9)" in text
    assert "1.00 pairs/s" in text


def test_dataset_prompts():
    assert resolve_dataset_prompt(None) is None
    assert resolve_dataset_prompt("SciFact") == DATASET_PROMPTS["scifact"]
    assert resolve_dataset_prompt("BrightRetrieval theoremqa questions") == DATASET_PROMPTS["bright-theoremqa-questions"]
    assert resolve_dataset_prompt("TREC-COVID") == "FILL_QUERY_HERE If the article answers any part of the question it is relevant."
    assert DATASET_PROMPTS["arguana"].startswith(
        "I am looking to write an essay and need to find counterarguments against this statement:\n\nFILL_QUERY_HERE\n\n")
    assert resolve_dataset_prompt("Q: FILL_QUERY_HERE!") == "Q: FILL_QUERY_HERE!"
    assert all("FILL_QUERY_HERE" in p for p in DATASET_PROMPTS.values())
    with pytest.raises(Rank1Error, match="unknown dataset prompt 'msmarco'.*scifact.*bright-pony"):
        resolve_dataset_prompt("msmarco")


def test_long_passage_is_cut_and_reported(ranker, tmp_path):
    long = " ".join(["bread oven yeast flour"] * 200)  # far beyond context_size - max_new_tokens = 506
    items = pipeline.build_items({"q3": [("long", 1.0), ("d2", 0.5)]}, QUERIES, {**CORPUS, "long": long})
    with JudgementStore(tmp_path / "s.sqlite") as store:
        result = pipeline.judge_items(ranker, items, store, shard=pipeline.Shard())
    assert result.summary.truncated == [("q3", "long")]
    assert result.judgements[("q3", "long")].prompt_tokens <= 506
    assert "truncated: 1 (passage cut to fit context_size: q3/long)" in result.summary.lines()
