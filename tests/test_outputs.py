"""What a rerank writes and says, checked on hand-made judgements (no model): the first-stage documents
below the top-k kept after the reranked ones, traces that carry the text each score was read after and the
texts judged, a summary that explains its outcomes, and evaluate's warning about runs of different depths."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rank1_hf import cli, pipeline
from rank1_hf.io import formats
from rank1_hf.judgement import Judgement

QUERIES = {"q1": "how do cats purr"}
CORPUS = {f"d{i}": f"passage {i}." for i in range(1, 6)}
RUN = {"q1": [("d1", 5.0), ("d2", 4.0), ("d3", 3.0), ("d4", 2.0), ("d5", 1.0)]}


def _judgement(score: float, outcome: str = "answered", reasoning: str = "Cats purr.") -> Judgement:
    return Judgement(score, outcome, reasoning, 7, 30, 1.0, 0.0, False)


def _job(tmp_path: Path):
    run_path = tmp_path / "run.trec"
    formats.write_run(run_path, RUN, "bm25")
    items = pipeline.build_items(formats.read_run(run_path, 2), QUERIES, CORPUS, top_k=2)
    judgements = {("q1", "d1"): _judgement(0.2), ("q1", "d2"): _judgement(0.9, "forced",
                                                                            "It purrs. Then it keeps going and")}
    return run_path, items, judgements


def test_rest_of_the_first_stage_follows_the_reranked_top_k_in_its_order(tmp_path):
    run_path, items, judgements = _job(tmp_path)
    rest = pipeline.first_stage_rest(run_path, 2)
    out = tmp_path / "out.trec"
    pipeline.write_outputs(items, judgements, out, None, "rank1", rest)
    assert [docid for docid, _ in formats.read_run(out)["q1"]] == ["d2", "d1", "d3", "d4", "d5"]
    pipeline.write_outputs(items, judgements, out, None, "rank1")  # --drop-rest
    assert [docid for docid, _ in formats.read_run(out)["q1"]] == ["d2", "d1"]


def test_traces_hold_the_text_the_score_was_read_after_and_the_texts_judged(tmp_path):
    _, items, judgements = _job(tmp_path)
    rows = pipeline.trace_rows(items, judgements)
    forced = rows[0]
    assert (forced["docid"], forced["rank"], forced["first_stage_rank"]) == ("d2", 1, 2)
    assert forced["reasoning"] == "It purrs."  # cut back to its last sentence, as the readout saw it
    assert forced["full_reasoning"] == "It purrs. Then it keeps going and"
    assert (forced["query"], forced["passage"]) == ("how do cats purr", "passage 2.")
    assert rows[1]["reasoning"] == rows[1]["full_reasoning"] == "Cats purr."


def test_summary_explains_each_outcome_and_what_to_do_when_none_was_answered():
    summary = pipeline.Summary(pairs=3, distinct=3, outcomes=Counter(forced=3))
    lines = summary.lines()
    assert "outcomes: answered 0, forced 3, fallback 0" in lines
    assert any(line.startswith("  forced 3: ") and "cut back to its last sentence" in line for line in lines)
    assert any("no pair was answered" in line and "--max-new-tokens" in line for line in lines)
    summary.outcomes["answered"] = 1
    assert not any("no pair was answered" in line for line in summary.lines())


def test_evaluate_warns_when_runs_have_different_depths(tmp_path, capsys):
    run_path, _, _ = _job(tmp_path)
    short = tmp_path / "short.trec"
    formats.write_run(short, {"q1": RUN["q1"][:2]}, "rank1")
    qrels = tmp_path / "qrels.txt"
    qrels.write_text("q1 0 d5 1\n")
    assert cli.main(["evaluate", "--run", str(run_path), str(short), "--qrels", str(qrels)]) == 0
    err = capsys.readouterr().err
    assert "different depths" in err and "short.trec: 2 per query" in err
    assert cli.main(["evaluate", "--run", str(run_path), str(run_path), "--qrels", str(qrels)]) == 0
    assert "different depths" not in capsys.readouterr().err


def test_log_tells_the_token_cap_from_the_models_end_of_sequence(caplog):
    from rank1_hf.engine.types import EngineStats
    from rank1_hf.judging import _CallLog
    from rank1_hf.options import JudgeOptions

    log = _CallLog(JudgeOptions(max_new_tokens=8, context_size=100))
    for tokens in (8, 3, 5):
        log.add(0, Judgement(0.5, "forced", "x", tokens, 30, 1.0, 0.0, False))
    log.add(1, _judgement(0.5))
    with caplog.at_level("INFO", logger="rank1_hf.judging"):
        log.close(EngineStats())
    assert "3 of 4 pairs did not close </think>" in caplog.text
    assert "1 reached max_new_tokens=8, 2 ended their sequence (EOS) before it" in caplog.text


def test_progress_off_a_terminal_is_one_line_every_interval(capsys):
    from rank1_hf.cli.common import ProgressBar

    bar = ProgressBar(True, pipeline.Shard(), terminal=False, every_s=0.0)
    bar.start(3, 0)
    for _ in range(3):
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and lines[0].startswith("rank1: 1/3 pairs (33%), ") and "pairs/s" in lines[0]
    assert "left" in lines[0] and lines[-1].endswith("done")
    quiet = ProgressBar(True, pipeline.Shard(), terminal=False, every_s=3600.0)
    quiet.start(3, 0)
    quiet.update(1)
    assert capsys.readouterr().err == ""  # not before the interval


def test_loading_shows_no_transformers_progress_bars_unless_logging_asks(model_dir, capfd, caplog):
    import logging

    from rank1_hf.model.loading import load_model

    load_model(model_dir)
    assert "Loading weights" not in capfd.readouterr().err
    with caplog.at_level(logging.INFO, logger="rank1_hf"):
        load_model(model_dir)
    assert "Loading weights" in capfd.readouterr().err
