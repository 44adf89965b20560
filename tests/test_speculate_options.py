"""``speculate`` from the option and the flag down to the engine, and the acceptance rate where stats surface."""

from types import SimpleNamespace

import pytest

from rank1_hf.cli import build_parser
from rank1_hf.cli.common import judge_options
from rank1_hf.engine.types import EngineStats
from rank1_hf.errors import Rank1Error
from rank1_hf.options import JudgeOptions
from rank1_hf.pipeline import Summary


@pytest.mark.parametrize("command", ["rerank", "score", "compare", "serve"])
def test_every_judging_command_takes_speculate(command):
    parser = build_parser()
    base = [command] + ([] if command == "compare" else ["--model", "m"]) + {"compare": ["--a", "x", "--b", "y", "--report", "r"], "score": ["--query", "q", "--passage", "p"]}.get(command, [])
    assert judge_options(parser.parse_args(base + ["--speculate", "prompt-lookup"])).speculate == "prompt-lookup"
    assert judge_options(parser.parse_args(base + ["--speculate", "off"])).speculate == "off"
    assert judge_options(parser.parse_args(base)).speculate == JudgeOptions.speculate
    with pytest.raises(Exception, match="invalid choice"):
        parser.parse_args(base + ["--speculate", "ngram"])


def test_the_option_reaches_the_engine_and_auto_speculates_only_where_steps_run_eager(tiny, monkeypatch):
    from rank1_hf import Rank1
    from rank1_hf.engine.continuous import ContinuousEngine
    from rank1_hf.engine.runner import ModelRunner

    model, tok = tiny
    with pytest.raises(Rank1Error, match="unknown speculate 'ngram'"):
        JudgeOptions(speculate="ngram")
    assert JudgeOptions().speculate == "auto"
    settings = {}
    for value in ("auto", "prompt-lookup", "off"):
        with Rank1.from_model(model, tok, speculate=value, max_new_tokens=4, context_size=512) as ranker:
            assert ranker.speculate == ranker.core.settings.speculate == value
            settings[value] = ranker.core.settings
    eager = {value: ContinuousEngine(model, s).speculates for value, s in settings.items()}
    assert eager == {"auto": True, "prompt-lookup": True, "off": False}  # a CPU: plain steps run eager
    monkeypatch.setattr(ModelRunner, "captures", property(lambda self: True))  # as on one GPU
    captured = {value: ContinuousEngine(model, s).speculates for value, s in settings.items()}
    assert captured == {"auto": False, "prompt-lookup": True, "off": False}


def test_acceptance_in_stats_summary_and_metrics():
    stats = EngineStats(draft_tokens=40, accepted_tokens=10)
    assert stats.acceptance == 0.25 and EngineStats().acceptance is None
    total = EngineStats()
    total.add_since(stats, EngineStats(), rows=3)
    assert (total.draft_tokens, total.accepted_tokens) == (40, 10)

    lines = Summary(draft_tokens=40, accepted_tokens=10).lines()
    assert "speculation: 10 of 40 draft tokens accepted (25%)" in lines
    assert not any(line.startswith("speculation:") for line in Summary().lines())

    from rank1_hf.serve.metrics import _EngineCollector

    worker = SimpleNamespace(judged=0, joined=0, stats=stats, pending_prompts=lambda: 0)
    ranker = SimpleNamespace(core=SimpleNamespace(worker=worker))
    collector = _EngineCollector(ranker, SimpleNamespace(queued=0), SimpleNamespace(stored=0))
    found = {m.name: m.samples[0].value for m in collector.collect()}
    assert (found["rank1_draft_tokens"], found["rank1_accepted_tokens"], found["rank1_draft_acceptance"]) == (40, 10, 0.25)
