"""The mteb 2.x adapter on a tiny random model, through mteb's own reranking path (in-memory mock tasks).

No task data is downloaded: mteb ships small in-memory mock tasks (two queries, two documents with titles,
optional per-query instructions), and ``mteb.evaluate`` runs them through its real cross-encoder code path.
"""

from __future__ import annotations

import pytest

mteb = pytest.importorskip("mteb", reason="the mteb adapter tests need mteb 2.x: pip install 'rank1-hf[mteb]'")

from mteb.mocks.mock_tasks.reranking import MockInstructionReranking, MockRerankingTask  # noqa: E402

from rank1_hf import Rank1, Rank1Error  # noqa: E402
from rank1_hf.compat import rank1  # noqa: E402
from rank1_hf.mteb import CHECKPOINTS, Rank1CrossEncoder, meta_for, model_meta, model_metas  # noqa: E402
from rank1_hf.testing import qwen_tokenizer, tiny_model  # noqa: E402

MAX_NEW = 8
FAST = {"engine": "generate", "max_new_tokens": MAX_NEW}  # see tests/test_compat.py for why "generate"


@pytest.fixture(scope="module")
def ranker():
    tok = qwen_tokenizer()
    return Rank1.from_model(tiny_model(tok, "qwen2", seed=0), tok, **FAST)


def recording(adapter_ranker: Rank1, calls: list):
    """Wrap the judging core's prepare to record the (query text, passage text) of each pair rank1 is asked
    to judge."""
    prepare = adapter_ranker.core.prepare

    def spy(query, passage):
        calls.append((query, passage))
        return prepare(query, passage)

    return spy


# What the mock reranking tasks hold (mteb/mocks/mock_tasks/reranking.py), in the order mteb reranks them:
# q1 ("This is a test sentence") over d1 then d2, q2 ("This is another test sentence") over d2 then d1;
# d1 is titled "Title of d2" and d2 "Title of d1".
D1 = "Title of d2 This is another positive sentence"
D2 = "Title of d1 This is a positive sentence"
Q1, Q2 = "This is a test sentence", "This is another test sentence"
I1, I2 = "This is a test instruction", "This is another test instruction"
SCIFACT = (
    "Claim: {}\n\nA relevant passage would provide evidence that either **supports** or **refutes** this claim. "
    "A passage with any information on any related subpart should be relevant."
)


def named(task_class, name: str):
    """The mock task under another task's name (only the name matters for picking a prompt)."""
    return type(name, (task_class,), {"metadata": task_class.metadata.model_copy(update={"name": name})})


@pytest.mark.parametrize("task_class, expected", [
    (MockRerankingTask, [(Q1, D1), (Q1, D2), (Q2, D2), (Q2, D1)]),
    (MockInstructionReranking, [(f"{Q1} {I1}", D1), (f"{Q1} {I1}", D2), (f"{Q2} {I2}", D2), (f"{Q2} {I2}", D1)]),
    # a task the official runner has a prompt for: the official prompt, with no option set
    (named(MockRerankingTask, "SciFact"),
     [(SCIFACT.format(Q1), D1), (SCIFACT.format(Q1), D2), (SCIFACT.format(Q2), D2), (SCIFACT.format(Q2), D1)]),
])
def test_evaluate_reranks_with_rank1(ranker, task_class, expected, monkeypatch):
    adapter = Rank1CrossEncoder.from_ranker(ranker)
    assert isinstance(adapter, mteb.CrossEncoderProtocol)
    assert not isinstance(adapter, mteb.EncoderProtocol)
    calls: list = []
    monkeypatch.setattr(ranker.core, "prepare", recording(ranker, calls))

    result = mteb.evaluate(adapter, task_class(), cache=None, show_progress_bar=False)

    task_result = result.task_results[0]
    assert task_result.task_name == task_class.metadata.name
    assert 0.0 <= task_result.get_score() <= 1.0
    # rank1 judged the query (instruction joined, official prompt applied) and the title/text passage
    assert calls == expected
    # and the scores mteb saw are Rank1's own for those texts
    monkeypatch.undo()
    assert [j.score for j in adapter.last_judgements] == [j.score for j in ranker.judge(expected)]
    assert ranker.dataset_prompt is None


def test_skip_prompt_and_overrides_in_evaluate(ranker, monkeypatch):
    calls: list = []
    monkeypatch.setattr(ranker.core, "prepare", recording(ranker, calls))
    scifact = named(MockRerankingTask, "SciFact")
    mteb.evaluate(Rank1CrossEncoder.from_ranker(ranker, official_prompts=False), scifact(), cache=None,
                  show_progress_bar=False)
    assert [q for q, _ in calls] == [Q1, Q1, Q2, Q2]  # like run_mteb.py --skip_prompt
    calls.clear()
    adapter = Rank1CrossEncoder.from_ranker(ranker, dataset_prompts={"SciFact": "Q: FILL_QUERY_HERE"})
    mteb.evaluate(adapter, scifact(), cache=None, show_progress_bar=False)
    assert [q for q, _ in calls] == [f"Q: {Q1}", f"Q: {Q1}", f"Q: {Q2}", f"Q: {Q2}"]


def _loaders(meta, queries, corpus):
    from datasets import Dataset
    from mteb._create_dataloaders import create_dataloader
    from mteb.types import PromptType

    loader1 = create_dataloader(Dataset.from_list(queries), task_metadata=meta, prompt_type=PromptType.query, batch_size=1)
    loader2 = create_dataloader(Dataset.from_list(corpus), task_metadata=meta, prompt_type=PromptType.document,
                                batch_size=1)
    return loader1, loader2


def test_predict_on_mteb_dataloaders(ranker):
    """The adapter called directly with the dataloaders mteb builds (prepared the way its search wrapper does)."""
    meta = MockInstructionReranking.metadata
    loader1, loader2 = _loaders(meta, [
        {"id": "q1", "text": "what is a cat", "instruction": "Only encyclopedic passages are relevant."},
        {"id": "q2", "text": "how to bake bread", "instruction": " how to bake bread "},  # the query again
        {"id": "q3", "text": " why do cats purr ", "instruction": ""},  # empty: the stripped query (mteb has no None)
    ], [
        {"id": "d1", "text": "Cats are small carnivorous mammals.", "title": "Felines"},
        {"id": "d2", "text": "Knead the dough, let it rise, bake at 220 C.", "title": ""},
        {"id": "d3", "text": " Purring is a vibration.", "title": " Sounds "},
    ])
    adapter = Rank1CrossEncoder.from_ranker(ranker, dataset_prompts={meta.name: "FILL_QUERY_HERE (biology)"})

    scores = adapter.predict(loader1, loader2, task_metadata=meta, hf_split="test", hf_subset="default")

    expected = ranker.predict([
        ("what is a cat Only encyclopedic passages are relevant. (biology)", "Felines Cats are small carnivorous mammals."),
        ("how to bake bread (biology)", " Knead the dough, let it rise, bake at 220 C."),  # empty title: " text"
        ("why do cats purr (biology)", " Sounds   Purring is a vibration."),
    ])
    assert scores.dtype == expected.dtype and scores.tolist() == expected.tolist()
    assert ranker.dataset_prompt is None  # the per-task prompt did not stick

    with pytest.raises(Rank1Error, match="3 queries but 1 documents"):
        adapter.predict(loader1, [{"text": ["x"]}], task_metadata=meta, hf_split="test", hf_subset="default")


@pytest.mark.parametrize("subset, options, prompt", [
    ("pony", {}, "I will use the programming language pony. Problem: {}\n\nBut to solve the problem above, I need "
     "to know things about pony. A passage is relevant if it contains docs that match **any** part (even basic "
     "parts) of the code I will have to write for the above program."),
    ("biology", {}, "Can you find background information about the concepts used to answer the question:\n\n{}\n\n"
     "A passage is relevant if it contains background information about a **sub-concept** that someone might "
     "cite/link to when answering the above question."),
    ("theoremqa_theorems", {}, "Find a passage which uses the same mathematical process as this one: {}"),
    ("pony", {"official_prompts": False}, "{}"),
    ("pony", {"dataset_prompts": {"BrightRetrieval_pony": None}}, "{}"),
    ("pony", {"dataset_prompts": {"BrightRetrieval": "all: FILL_QUERY_HERE"}}, "all: {}"),
    ("biology", {"dataset_prompts": {"BrightRetrieval_pony": "pony: FILL_QUERY_HERE"}},
     "Can you find background information about the concepts used to answer the question:\n\n{}\n\n"
     "A passage is relevant if it contains background information about a **sub-concept** that someone might "
     "cite/link to when answering the above question."),
    ("pony", {"dataset_prompts": {"BrightRetrieval_pony": "scifact"}}, SCIFACT),  # a name works too
    # both given: the subset's own override wins over the task's, whatever the order they were given in
    ("pony", {"dataset_prompts": {"BrightRetrieval": "all: FILL_QUERY_HERE", "BrightRetrieval_pony": "pony: FILL_QUERY_HERE"}},
     "pony: {}"),
    ("pony", {"dataset_prompts": {"BrightRetrieval_pony": "pony: FILL_QUERY_HERE", "BrightRetrieval": "all: FILL_QUERY_HERE"}},
     "pony: {}"),
    ("biology", {"dataset_prompts": {"BrightRetrieval": "all: FILL_QUERY_HERE", "BrightRetrieval_pony": "pony: FILL_QUERY_HERE"}},
     "all: {}"),
])
def test_bright_subsets_pick_the_official_prompt(ranker, monkeypatch, subset, options, prompt):
    """BrightRetrieval's subsets as run_mteb.py -d BrightRetrieval -s SUBSET; BRIGHT documents have no title."""
    meta = mteb.get_task("BrightRetrieval").metadata
    loader1, loader2 = _loaders(meta, [{"id": "q1", "text": " sort a list "}], [{"id": "d1", "text": "Use sorted()."}])
    calls: list = []
    monkeypatch.setattr(ranker.core, "prepare", recording(ranker, calls))
    adapter = Rank1CrossEncoder.from_ranker(ranker, **options)
    adapter.predict(loader1, loader2, task_metadata=meta, hf_split="standard", hf_subset=subset)
    assert calls == [(prompt.format(" sort a list "), "Use sorted().")]


def test_a_rankers_own_prompt_is_used_for_every_task(monkeypatch):
    tok = qwen_tokenizer()
    own = Rank1.from_model(tiny_model(tok, "qwen2", seed=0), tok, dataset_prompt="own: FILL_QUERY_HERE", **FAST)
    calls: list = []
    monkeypatch.setattr(own.core, "prepare", recording(own, calls))
    mteb.evaluate(Rank1CrossEncoder.from_ranker(own), named(MockRerankingTask, "SciFact")(), cache=None,
                  show_progress_bar=False)
    assert [q for q, _ in calls] == [f"own: {Q1}", f"own: {Q1}", f"own: {Q2}", f"own: {Q2}"]
    with pytest.raises(Rank1Error, match="not both"):
        Rank1CrossEncoder.from_ranker(own, dataset_prompts={"SciFact": "x FILL_QUERY_HERE"})
    with pytest.raises(Rank1Error, match="unknown dataset prompt"):
        Rank1CrossEncoder.from_ranker(Rank1.from_model(own.model, tok, **FAST), dataset_prompts={"SciFact": "nope"})


def test_compat_class_works_in_evaluate(ranker):
    model = rank1.from_model(ranker.model, ranker.tokenizer, max_output_tokens=MAX_NEW, engine="generate")
    assert isinstance(model, mteb.CrossEncoderProtocol)
    result = mteb.evaluate(model, MockInstructionReranking(), cache=None, show_progress_bar=False)
    assert len(model.last_judgements) == 4 and 0.0 <= result.task_results[0].get_score() <= 1.0


@pytest.mark.parametrize("task_class, own, expected", [
    # the official prompt of the task mteb hands it, as Rank1CrossEncoder (and run_mteb.py) give it
    (named(MockRerankingTask, "SciFact"), None, [SCIFACT.format(Q1), SCIFACT.format(Q1), SCIFACT.format(Q2),
                                                 SCIFACT.format(Q2)]),
    (MockRerankingTask, None, [Q1, Q1, Q2, Q2]),  # a task without an official prompt
    # a dataset_prompt given to the constructor is used for every task
    (named(MockRerankingTask, "SciFact"), "own: FILL_QUERY_HERE", [f"own: {Q1}", f"own: {Q1}", f"own: {Q2}", f"own: {Q2}"]),
])
def test_compat_class_applies_the_official_prompt_of_the_task(ranker, monkeypatch, task_class, own, expected):
    model = rank1.from_model(ranker.model, ranker.tokenizer, max_output_tokens=MAX_NEW, engine="generate",
                             dataset_prompt=own)
    calls: list = []
    monkeypatch.setattr(model.ranker.core, "prepare", recording(model.ranker, calls))
    mteb.evaluate(model, task_class(), cache=None, show_progress_bar=False)
    assert [q for q, _ in calls] == expected
    assert model.dataset_prompt == own  # the task's prompt did not stick


def test_compat_class_reads_its_dataset_prompt_when_mteb_calls_it(ranker, monkeypatch):
    """A prompt set on the drop-in after construction (as code written for the official class does) is used
    for every task from the next call on; set back to None, each task gets its official prompt again."""
    model = rank1.from_model(ranker.model, ranker.tokenizer, max_output_tokens=MAX_NEW, engine="generate")
    calls: list = []
    monkeypatch.setattr(model.ranker.core, "prepare", recording(model.ranker, calls))
    scifact = named(MockRerankingTask, "SciFact")
    model.dataset_prompt = "own: FILL_QUERY_HERE"
    mteb.evaluate(model, scifact(), cache=None, show_progress_bar=False)
    assert [q for q, _ in calls] == [f"own: {Q1}", f"own: {Q1}", f"own: {Q2}", f"own: {Q2}"]
    calls.clear()
    model.dataset_prompt = None
    mteb.evaluate(model, scifact(), cache=None, show_progress_bar=False)
    assert [q for q, _ in calls] == [SCIFACT.format(Q1), SCIFACT.format(Q1), SCIFACT.format(Q2), SCIFACT.format(Q2)]


def test_model_metas():
    metas = model_metas()
    assert set(metas) == set(CHECKPOINTS) and len(metas) == 13
    for name, meta in metas.items():
        assert meta.name == name and meta.is_cross_encoder and meta.open_weights
        assert meta.loader is Rank1CrossEncoder and str(meta.release_date) == "2025-02-25"
        assert meta.reference == f"https://huggingface.co/{name}" and meta.framework[0] == "PyTorch"
    # The small Qwen2.5-based checkpoints (the 0.49B/1.54B/3.09B of Qwen's cards), then the big ones.
    assert [metas[f"jhu-clsp/rank1-{s}"].n_parameters for s in ("0.5b", "1.5b", "3b")] == [
        494_032_768, 1_543_714_304, 3_085_938_688]
    assert metas["jhu-clsp/rank1-0.5b"].adapted_from == "Qwen/Qwen2.5-0.5B"
    assert all(m.n_parameters > 7e9 for n, m in metas.items() if not n.endswith(("0.5b", "1.5b", "3b")))
    assert metas["jhu-clsp/rank1-7b-awq"].loader_kwargs == {"dtype": "float16"}
    assert metas["jhu-clsp/rank1-7b-awq"].adapted_from == "jhu-clsp/rank1-7b"
    assert metas["jhu-clsp/rank1-7b"].memory_usage_mb > metas["jhu-clsp/rank1-7b-awq"].memory_usage_mb
    assert meta_for("/tmp/somewhere/tiny-rank1").name == "rank1-hf/tiny-rank1"
    assert meta_for("someone/rank1-7b-finetuned").name == "someone/rank1-7b-finetuned"  # hub ids kept
    with pytest.raises(Rank1Error, match="unknown rank1 checkpoint"):
        model_meta("jhu-clsp/rank2")


def test_meta_loader_builds_the_adapter(ranker, tmp_path):
    """ModelMeta.load_model -> Rank1CrossEncoder(name, revision=..., device=..., **loader_kwargs)."""
    ranker.model.save_pretrained(tmp_path)
    ranker.tokenizer.save_pretrained(tmp_path)
    meta = model_meta("jhu-clsp/rank1-7b").model_copy(update={"name": "local/" + tmp_path.name})
    # the checkpoint id is not reachable offline: point the loader at the local copy instead
    adapter = meta.model_copy(
        update={"loader": lambda name, revision=None, **kw: Rank1CrossEncoder(str(tmp_path), revision, **kw)}
    ).load_model(device="cpu", **FAST)
    assert isinstance(adapter.ranker, Rank1) and adapter.ranker.model.device.type == "cpu"
    assert adapter.mteb_model_meta.name == meta.name
    assert adapter.ranker.max_new_tokens == MAX_NEW


def test_mteb_older_than_the_metadata_needs_is_a_clear_error(monkeypatch, ranker):
    # model_type arrived in mteb 2.5.2 and framework "Transformers" in 2.6.5 (mteb's git history).
    monkeypatch.setattr(mteb, "__version__", "2.6.4")
    with pytest.raises(Rank1Error, match=r"needs mteb>=2\.6\.5 \(found 2\.6\.4\)"):
        model_meta()
    monkeypatch.setattr(mteb, "__version__", "2.6.5")
    assert model_meta().framework == ["PyTorch", "Transformers"]
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert project["project"]["optional-dependencies"]["mteb"] == ["mteb>=2.6.5,<3"]


def test_missing_mteb_is_a_clear_error(monkeypatch, ranker):
    import sys

    monkeypatch.setitem(sys.modules, "mteb", None)  # import mteb now raises ImportError
    with pytest.raises(Rank1Error, match=r"pip install 'rank1-hf\[mteb\]'"):
        Rank1CrossEncoder.from_ranker(ranker)
    with pytest.raises(Rank1Error, match=r"pip install 'rank1-hf\[mteb\]'"):
        model_meta()
