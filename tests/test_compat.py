"""``rank1_hf.compat.rank1``: the official rank1 class's interface, on a tiny random model saved to disk."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from rank1_hf import Rank1, Rank1Error
from rank1_hf.compat import FORCE_RETHINK_MESSAGE, MAX_BATCH_SIZE, placement, rank1
from rank1_hf.testing import qwen_tokenizer, tiny_model
from rank1_hf.prompt import build_prompt

MAX_NEW = 8  # few reasoning tokens keep every call well under a second
# The static engine: on CPU the continuous engine spends ~2.5 s per call setting up its cache, which
# dwarfs 8 tokens of a tiny model. test_reference_usage_runs_unchanged keeps the default ("auto").
FAST = {"engine": "generate"}


def scores_of(ranker: Rank1, pairs) -> list[float]:
    """Rank1's full-precision scores (predict() rounds them to float32; the reference returns Python floats)."""
    return [j.score for j in ranker.judge(pairs)]


@pytest.fixture(scope="module")
def tiny():
    tok = qwen_tokenizer()
    return tiny_model(tok, "qwen2", seed=0), tok


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    """A tiny rank1-shaped checkpoint on disk, as the reference's users would point model_name_or_path at."""
    model, tok = tiny
    path = tmp_path_factory.mktemp("rank1-tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_reference_usage_runs_unchanged(checkpoint):
    # A script written against the reference (model card usage); only the import differs.
    from rank1_hf.compat import rank1  # reference: from rank1 import rank1

    model = rank1(model_name_or_path=checkpoint, num_gpus=1, device="cpu", max_output_tokens=MAX_NEW)
    queries = ["what is a cat", "how to bake bread"]
    documents = ["Cats are small felines.", "Bread is baked in an oven from flour, water and yeast."]
    scores = model.predict([(q, d) for q in queries for d in documents])

    assert isinstance(scores, list) and len(scores) == 4
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores)
    assert model.model.dtype == torch.float16  # fp_options="float16", the reference's default, is honoured
    assert len(model.last_judgements) == 4 and model.last_reasoning == [j.reasoning for j in model.last_judgements]
    assert (model.true_token, model.false_token) == (830, 895)  # " true"/" false" in the Qwen2.5 vocabulary
    # the same model behind a plain Rank1 gives the same scores, in the same order
    plain = Rank1.from_model(model.model, model.tokenizer, max_new_tokens=MAX_NEW)
    assert scores == scores_of(plain, [(q, d) for q in queries for d in documents])


def test_more_gpus_than_visible_is_a_clear_error(checkpoint):
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    message = rf"num_gpus={visible + 1} .*needs {visible + 1} GPU\(s\) but {visible} are visible"
    with pytest.raises(Rank1Error, match=message):
        rank1(model_name_or_path=checkpoint, num_gpus=visible + 1, device="cuda")
    with pytest.raises(Rank1Error, match="num_gpus=2 with device='cpu'"):
        rank1(model_name_or_path=checkpoint, num_gpus=2, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_without_cuda_points_at_cpu(checkpoint):
    with pytest.raises(Rank1Error, match="pass device='cpu'"):
        rank1(model_name_or_path=checkpoint)  # the reference's defaults: device="cuda", num_gpus=1


def test_placement_on_several_gpus(monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(accelerate.utils, "get_max_memory", lambda: {0: 100, 1: 200, "cpu": 999})
    assert placement("cuda", 1) == ("cuda:0", None)
    assert placement("cuda:1", 1) == ("cuda:1", None)
    assert placement("cuda", 2) == ("auto", {0: 100, 1: 200})  # GPUs only: no CPU offload behind the user's back
    with pytest.raises(Rank1Error, match="needs 3 GPU"):
        placement("cuda", 3)
    assert placement("cpu", 1) == ("cpu", None)
    assert placement(None, 1) == ("cuda:0", None)  # None: cuda when there is one


def test_force_rethink_is_refused(checkpoint):
    with pytest.raises(Rank1Error, match="force_rethink") as error:
        rank1(model_name_or_path=checkpoint, device="cpu", force_rethink=1)
    assert str(error.value) == FORCE_RETHINK_MESSAGE


def test_vllm_keywords_give_one_warning(checkpoint):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = rank1(
            model_name_or_path=checkpoint,
            device="cpu",
            max_output_tokens=MAX_NEW,
            gpu_memory_utilization=0.9,
            tensor_parallel_size=1,
            enforce_eager=True,
            max_model_len=16000,
            **FAST,  # a rank1-hf option: passed through, not warned about
        )
    ours = [w for w in caught if str(w.message).startswith("rank1: ignoring")]
    assert len(ours) == 1
    message = str(ours[0].message)
    for name in ("enforce_eager", "gpu_memory_utilization", "max_model_len", "tensor_parallel_size"):
        assert name in message
    assert ours[0].filename == __file__  # points at the caller's line
    assert model.ranker.engine == "generate"
    assert model.predict([("q", "p")])[0] >= 0.0


def test_dict_and_instruction_forms_match_rank1(tiny):
    model, tok = tiny
    compat = rank1.from_model(model, tok, max_output_tokens=MAX_NEW, device="cpu", **FAST)
    plain = Rank1.from_model(model, tok, max_new_tokens=MAX_NEW, **FAST)
    doc = {"title": "Felines", "text": "Cats are small carnivorous mammals."}
    pairs = [
        ("what is a cat", doc),
        ("what is a cat", doc, "Only encyclopedic passages are relevant."),
        ("what is a cat", "Cats purr.", "what is a cat"),  # instruction equal to the query is not repeated
        ("what is a cat", {"text": "No title here."}, None),
    ]
    equivalent = [
        ("what is a cat", "Felines Cats are small carnivorous mammals."),
        ("what is a cat Only encyclopedic passages are relevant.", "Felines Cats are small carnivorous mammals."),
        ("what is a cat", "Cats purr."),
        ("what is a cat", "No title here."),
    ]
    scores = compat.predict(pairs)
    assert scores == scores_of(plain, pairs)
    assert scores == scores_of(plain, equivalent)
    assert [j.prompt_tokens for j in compat.last_judgements] == [
        len(tok(build_prompt(q, p))["input_ids"]) for q, p in equivalent
    ]


def test_batch_size_mapping_and_prompts(tiny):
    model, tok = tiny
    assert rank1.from_model(model, tok).ranker.batch_size == Rank1.from_model(model, tok).batch_size  # auto size
    assert rank1.from_model(model, tok, batch_size=4).ranker.batch_size == 4
    assert rank1.from_model(model, tok, batch_size=10_000).ranker.batch_size == MAX_BATCH_SIZE
    with pytest.raises(Rank1Error, match="batch_size"):
        rank1.from_model(model, tok, batch_size=0)

    template = "Find passages about FILL_QUERY_HERE for a biology exam"
    compat = rank1.from_model(model, tok, dataset_prompt=template, max_output_tokens=MAX_NEW, **FAST)
    assert compat.return_prompt("cats", "Cats purr.") == build_prompt("cats", "Cats purr.")
    assert compat.return_prompt("cats", "Cats purr.", template) == build_prompt(
        "Find passages about cats for a biology exam", "Cats purr."
    )
    plain = Rank1.from_model(model, tok, dataset_prompt=template, max_new_tokens=MAX_NEW, **FAST)
    assert compat.predict([("cats", "Cats purr.")]) == scores_of(plain, [("cats", "Cats purr.")])
    with pytest.raises(Rank1Error, match="FILL_QUERY_HERE"):
        rank1.from_model(model, tok, dataset_prompt="no placeholder")
    assert compat.predict([]) == [] and compat.last_judgements == []
    assert np.isfinite(compat.predict([("cats", {"title": "", "text": "Cats purr."})])).all()


# Two entries of the official PROMPT_DICT (orionw/rank1 prompts.py at 30585c2), transcribed by hand.
TOUCHE2020 = ("I am looking to write an essay and need to find arguments for or against this statement:\n\n"
              "FILL_QUERY_HERE\n\nDoes this passage have any argument or evidence that could be used to help me?\n\n")
CLIMATEFEVER = ("I am looking to write an essay for and need to find evidence the supports or contradict this "
                "statement:\n\nFILL_QUERY_HERE\n\nIf the passage provides information that supports or contradicts "
                "it in any way it is relevant so I can cite it.\n\n")
PROMPTED_PAIRS = [
    ("what is a cat", {"title": "Felines", "text": "Cats are small carnivorous mammals."}, "Encyclopedias only."),
    ("how to bake bread", {"title": "", "text": "Bread is baked in an oven."}, "how to bake bread"),
    (" rain ", {"text": "Clouds bring rain."}, "Weather."),
]


def official_prompts(batch, template):
    """The strings the official ``predict`` builds (rank1.py at 30585c2, transcribed): the instruction joined
    when the first row has one, a record passage as "{title} {text}" when it has a title, then return_prompt."""
    queries, passages = [b[0] for b in batch], [b[1] for b in batch]
    if len(batch[0]) == 3 and batch[0][2] is not None:
        queries = [f"{q} {i}".strip() if q.strip() != i.strip() else q.strip() for q, _, i in batch]
    if isinstance(passages[0], dict):
        passages = [f"{v['title']} {v['text']}" if "title" in v else v["text"] for v in passages]
    out = []
    for query, passage in zip(queries, passages):
        query = template.replace("FILL_QUERY_HERE", query) if template else query
        out.append("Determine if the following passage is relevant to the query. Answer only with 'true' or "
                   f"'false'.\nQuery: {query}\nPassage: {passage}\n<think>")
    return out


def prompts_seen(monkeypatch, compat) -> list[str]:
    """Record the prompt string of every pair the drop-in's judging core prepares."""
    seen: list[str] = []
    prepare = compat.ranker.core.prepare

    def spy(query, passage):
        prepared = prepare(query, passage)
        seen.append(prepared.prompt)
        return prepared

    monkeypatch.setattr(compat.ranker.core, "prepare", spy)
    return seen


@pytest.mark.parametrize("template", [TOUCHE2020, CLIMATEFEVER, "Find passages about FILL_QUERY_HERE for a biology exam"],
                         ids=["Touche2020", "ClimateFEVER", "template"])
def test_dataset_prompt_set_after_construction_is_read_when_predict_runs(tiny, monkeypatch, template):
    """Code written for the official class sets ``model.dataset_prompt = PROMPT_DICT[task]`` on an instance
    and calls predict: the official predict reads the attribute then, so the prompts (and scores) must be
    those of that template, and setting it back to None must drop it again."""
    from rank1_hf.dataset_prompts import OFFICIAL_PROMPTS

    assert template in (OFFICIAL_PROMPTS["Touche2020"], OFFICIAL_PROMPTS["ClimateFEVER"]) or "biology" in template
    model, tok = tiny
    compat = rank1.from_model(model, tok, max_output_tokens=MAX_NEW, device="cpu", **FAST)
    seen = prompts_seen(monkeypatch, compat)
    compat.dataset_prompt = template
    scores = compat.predict(PROMPTED_PAIRS)
    assert sorted(seen) == sorted(official_prompts(PROMPTED_PAIRS, template))
    # the same scores as a drop-in given the prompt in its constructor
    given = rank1.from_model(model, tok, max_output_tokens=MAX_NEW, device="cpu", dataset_prompt=template, **FAST)
    assert given.predict(PROMPTED_PAIRS) == pytest.approx(scores, abs=1e-4)
    # and back to no prompt: the official code then uses the query as it is
    seen.clear()
    compat.dataset_prompt = None
    compat.predict(PROMPTED_PAIRS[:2])
    assert sorted(seen) == sorted(official_prompts(PROMPTED_PAIRS[:2], None))
    # a prompt given to the constructor and changed later: the later one counts
    seen = prompts_seen(monkeypatch, given)
    given.dataset_prompt = "Q: FILL_QUERY_HERE"
    given.predict(PROMPTED_PAIRS[:1])
    assert seen == official_prompts(PROMPTED_PAIRS[:1], "Q: FILL_QUERY_HERE")


def test_attributes_predict_reads_that_cannot_be_honoured_are_refused_at_call_time(tiny):
    """The official predict also reads force_rethink and the readout ids when it runs: a value set on the
    instance that rank1-hf cannot honour is an error at that call, not silently ignored."""
    model, tok = tiny
    compat = rank1.from_model(model, tok, max_output_tokens=MAX_NEW, device="cpu", **FAST)
    compat.force_rethink = 1
    with pytest.raises(Rank1Error, match="force_rethink"):
        compat.predict([("q", "p")])
    compat.force_rethink = 0
    compat.true_token = 1
    with pytest.raises(Rank1Error, match="true_token/false_token"):
        compat.predict([("q", "p")])
    compat.true_token = 830
    compat.dataset_prompt = "no placeholder"
    with pytest.raises(Rank1Error, match="FILL_QUERY_HERE"):
        compat.predict([("q", "p")])
    compat.dataset_prompt = ""  # empty: no template, as in the official code
    assert len(compat.predict([("q", "p")])) == 1
