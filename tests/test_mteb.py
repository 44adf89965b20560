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
from rank1_hf.offline import qwen_tokenizer, tiny_model  # noqa: E402

MAX_NEW = 8
FAST = {"engine": "generate", "max_new_tokens": MAX_NEW}  # see tests/test_compat.py for why "generate"


@pytest.fixture(scope="module")
def ranker():
    tok = qwen_tokenizer()
    return Rank1.from_model(tiny_model(tok, "qwen2", seed=0), tok, **FAST)


def recording(adapter_ranker: Rank1, calls: list):
    """Wrap ranker.judge to record the pairs mteb's predict call hands to rank1."""
    judge = adapter_ranker.judge

    def spy(pairs, **kwargs):
        calls.append(list(pairs))
        return judge(pairs, **kwargs)

    return spy


def expected_pairs(task) -> list[tuple]:
    """The rank1 pairs a reranking task should produce, straight from its data (order as mteb reranks)."""
    task.load_data()
    split = task.dataset["default"]["test"]
    corpus = {row["id"]: row for row in split["corpus"]}
    pairs = []
    for query in split["queries"]:
        for doc_id in split["top_ranked"][query["id"]]:
            doc = corpus[doc_id]
            pairs.append((query["text"], {"title": doc["title"], "text": doc["text"]}, query.get("instruction")))
    return pairs


@pytest.mark.parametrize("task_class", [MockRerankingTask, MockInstructionReranking])
def test_evaluate_reranks_with_rank1(ranker, task_class, monkeypatch):
    adapter = Rank1CrossEncoder.from_ranker(ranker)
    assert isinstance(adapter, mteb.CrossEncoderProtocol)
    assert not isinstance(adapter, mteb.EncoderProtocol)
    calls: list = []
    monkeypatch.setattr(ranker, "judge", recording(ranker, calls))

    result = mteb.evaluate(adapter, task_class(), cache=None, show_progress_bar=False)

    task_result = result.task_results[0]
    assert task_result.task_name == task_class.metadata.name
    assert 0.0 <= task_result.get_score() <= 1.0
    # mteb handed rank1 the query, the instruction in its own slot, and the title/text record
    assert len(calls) == 1 and calls[0] == expected_pairs(task_class())
    # and the scores mteb saw are Rank1's own for those pairs
    monkeypatch.undo()
    assert [j.score for j in adapter.last_judgements] == [j.score for j in ranker.judge(calls[0])]
    assert ranker.dataset_prompt is None


def test_predict_on_mteb_dataloaders(ranker):
    """The adapter called directly with the dataloaders mteb builds (prepared the way its search wrapper does)."""
    from datasets import Dataset
    from mteb._create_dataloaders import create_dataloader
    from mteb.types import PromptType

    meta = MockInstructionReranking.metadata
    queries = Dataset.from_list([
        {"id": "q1", "text": "what is a cat", "instruction": "Only encyclopedic passages are relevant."},
        {"id": "q2", "text": "how to bake bread", "instruction": "how to bake bread"},  # same as the query
    ])
    corpus = Dataset.from_list([
        {"id": "d1", "text": "Cats are small carnivorous mammals.", "title": "Felines"},
        {"id": "d2", "text": "Knead the dough, let it rise, bake at 220 C.", "title": "Bread"},
    ])
    loader1 = create_dataloader(queries, task_metadata=meta, prompt_type=PromptType.query, batch_size=1)
    loader2 = create_dataloader(corpus, task_metadata=meta, prompt_type=PromptType.document, batch_size=1)
    adapter = Rank1CrossEncoder.from_ranker(ranker, dataset_prompts={meta.name: "FILL_QUERY_HERE (biology)"})

    scores = adapter.predict(loader1, loader2, task_metadata=meta, hf_split="test", hf_subset="default")

    cat = "what is a cat Only encyclopedic passages are relevant. (biology)"
    expected = ranker.predict([
        (cat, "Felines Cats are small carnivorous mammals."),
        ("how to bake bread (biology)", "Bread Knead the dough, let it rise, bake at 220 C."),
    ])
    assert scores.dtype == expected.dtype and scores.tolist() == expected.tolist()
    assert ranker.dataset_prompt is None  # the per-task prompt did not stick

    with pytest.raises(Rank1Error, match="2 queries but 1 documents"):
        adapter.predict(loader1, [{"text": ["x"]}], task_metadata=meta, hf_split="test", hf_subset="default")


def test_compat_class_works_in_evaluate(ranker):
    model = rank1.from_model(ranker.model, ranker.tokenizer, max_output_tokens=MAX_NEW, engine="generate")
    assert isinstance(model, mteb.CrossEncoderProtocol)
    result = mteb.evaluate(model, MockInstructionReranking(), cache=None, show_progress_bar=False)
    assert len(model.last_judgements) == 4 and 0.0 <= result.task_results[0].get_score() <= 1.0


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
