"""The strings rank1 reads, as a specification: every expected value here is written by hand from reading
the official rank1 code (orionw/rank1 at commit 30585c2: ``dataset_prompts.py``, ``rank1.py`` ``predict()``,
``run_mteb.py``), never computed by rank1-hf.

The official prompt texts are in tests/data/official_prompts.json, transcribed by hand from ``PROMPT_DICT``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rank1_hf import Rank1Error
from rank1_hf.prompt import build_prompt, unpack_pair
from rank1_hf.dataset_prompts import DATASET_PROMPTS, OFFICIAL_PROMPTS, official_prompt, resolve_dataset_prompt

OFFICIAL = {k: v for k, v in json.loads((Path(__file__).parent / "data" / "official_prompts.json").read_text()).items()
            if not k.startswith("_")}

HEAD = "Determine if the following passage is relevant to the query. Answer only with 'true' or 'false'.\nQuery: "


# ---- the named prompts --------------------------------------------------------------------------------


def test_the_test_data_holds_the_fifteen_official_keys():
    assert sorted(OFFICIAL) == sorted([
        "SciFact", "ClimateFEVER", "TRECCOVID", "ArguAna", "DBPedia", "FiQA2018", "NFCorpus", "Touche2020",
        "SCIDOCS", "BrightRetrieval_aops", "BrightRetrieval_theoremqa_questions", "BrightRetrieval_leetcode",
        "BrightRetrieval_pony", "BrightRetrieval", "BrightRetrieval_theoremqa_theorems",
    ])


@pytest.mark.parametrize("key", sorted(OFFICIAL))
def test_each_named_prompt_is_the_official_text(key):
    assert OFFICIAL_PROMPTS[key] == OFFICIAL[key]
    assert resolve_dataset_prompt(key) == OFFICIAL[key]


def test_no_prompt_beyond_the_official_ones():
    assert set(OFFICIAL_PROMPTS) == set(OFFICIAL)
    assert set(DATASET_PROMPTS.values()) == set(OFFICIAL.values())


# The whitespace details that are easy to lose in a transcription, spelled out once more.
@pytest.mark.parametrize("key, ending", [
    ("ClimateFEVER", "so I can cite it.\n\n"),
    ("ArguAna", "used to help me?\n\n"),
    ("DBPedia", "connected it is relevant.\n\n"),
    ("Touche2020", "used to help me?\n\n"),
    ("BrightRetrieval_leetcode", "in a different chapter. \n\n\n"),
    ("SciFact", "should be relevant."),
])
def test_endings(key, ending):
    assert resolve_dataset_prompt(key).endswith(ending)


@pytest.mark.parametrize("key, inner", [
    ("BrightRetrieval_leetcode", "similarities to this:\n    \nFILL_QUERY_HERE\n\n"),
    ("NFCorpus", "okay -- it does not need to be explicitly. \n\nFind me"),
])
def test_inner_whitespace(key, inner):
    assert inner in resolve_dataset_prompt(key)


# Friendly names (rank1-hf's) and spellings -> the official key whose text they give.
NAMES = [
    ("scifact", "SciFact"),
    ("climatefever", "ClimateFEVER"),
    ("trec-covid", "TRECCOVID"),
    ("treccovid", "TRECCOVID"),
    ("arguana", "ArguAna"),
    ("dbpedia", "DBPedia"),
    ("fiqa2018", "FiQA2018"),
    ("fiqa", "FiQA2018"),
    ("nfcorpus", "NFCorpus"),
    ("touche2020", "Touche2020"),
    ("touche", "Touche2020"),
    ("scidocs", "SCIDOCS"),
    ("bright", "BrightRetrieval"),
    ("bright-aops", "BrightRetrieval_aops"),
    ("BrightRetrieval aops", "BrightRetrieval_aops"),
    ("bright_aops", "BrightRetrieval_aops"),
    ("bright-theoremqa-questions", "BrightRetrieval_theoremqa_questions"),
    ("bright-theoremqa-theorems", "BrightRetrieval_theoremqa_questions"),  # the official alias
    ("bright-leetcode", "BrightRetrieval_leetcode"),
    ("bright-pony", "BrightRetrieval_pony"),
    # a BRIGHT subset without its own prompt falls back to BrightRetrieval's, as get_prompt does
    ("bright-biology", "BrightRetrieval"),
    ("BrightRetrieval biology", "BrightRetrieval"),
    ("BrightRetrieval_earth_science", "BrightRetrieval"),
    ("bright-stackoverflow", "BrightRetrieval"),
]


@pytest.mark.parametrize("name, key", NAMES)
def test_names_resolve_to_the_official_text(name, key):
    assert resolve_dataset_prompt(name) == OFFICIAL[key]


# (task, subset) as run_mteb.py passes them to get_prompt -> the official key.
TASK_SUBSET = [
    ("BrightRetrieval", "biology", "BrightRetrieval"),
    ("BrightRetrieval", "pony", "BrightRetrieval_pony"),
    ("BrightRetrieval", "aops", "BrightRetrieval_aops"),
    ("BrightRetrieval", "leetcode", "BrightRetrieval_leetcode"),
    ("BrightRetrieval", "theoremqa_theorems", "BrightRetrieval_theoremqa_questions"),
    ("BrightRetrieval", "theoremqa_questions", "BrightRetrieval_theoremqa_questions"),
    ("BrightRetrieval", "default", "BrightRetrieval"),
    ("BrightRetrieval", None, "BrightRetrieval"),
    ("SciFact", "default", "SciFact"),
    ("SciFact", None, "SciFact"),
    ("Touche2020", "default", "Touche2020"),
    ("BrightRetrieval_aops", None, "BrightRetrieval_aops"),
]


@pytest.mark.parametrize("task, subset, key", TASK_SUBSET)
def test_task_and_subset_as_get_prompt(task, subset, key):
    assert official_prompt(task, subset) == OFFICIAL[key]
    assert resolve_dataset_prompt(task, subset) == OFFICIAL[key]


@pytest.mark.parametrize("task, subset", [
    ("NevIR", None), ("NevIR", "default"), ("mFollowIR", "fas"), ("BrightBiologyRetrieval", "default"),
    ("BrightLongRetrieval", "biology"), ("SciFact-PL", "default"), ("scifact", None),  # exact names only
    ("biology", None), ("Foo", "aops"),
])
def test_official_prompt_is_none_where_get_prompt_gives_none(task, subset):
    assert official_prompt(task, subset) is None


@pytest.mark.parametrize("value, subset", [
    ("msmarco", None), ("NevIR", None), ("SciFact-PL", None), ("biology", None), ("", None), ("msmarco", "default"),
])
def test_a_name_without_a_prompt_lists_the_names(value, subset):
    with pytest.raises(Rank1Error, match="unknown dataset prompt") as err:
        resolve_dataset_prompt(value, subset)
    for name in ("Touche2020", "BrightRetrieval_aops", "touche2020", "bright-aops", "bright-biology"):
        assert name in str(err.value)


def test_templates_and_none_pass_through():
    assert resolve_dataset_prompt(None) is None
    assert resolve_dataset_prompt("Q: FILL_QUERY_HERE!") == "Q: FILL_QUERY_HERE!"


# ---- the strings the model reads ------------------------------------------------------------------------

SCIFACT = OFFICIAL["SciFact"]
LEETCODE = OFFICIAL["BrightRetrieval_leetcode"]

# (pair, dataset prompt) -> the exact model input, written out by hand from the official predict():
#   queries: f"{q} {i}".strip() if q.strip() != i.strip() else q.strip(), only when there is an instruction
#   passages: f"{v['title']} {v['text']}" if 'title' in v else v['text']
#   return_prompt: prompt.replace("FILL_QUERY_HERE", query) if prompt else query
CASES = [
    # passages
    (("what is a cat", "Cats purr."), None,
     HEAD + "what is a cat\nPassage: Cats purr.\n<think>"),
    (("what is a cat", "  Cats purr.  "), None,
     HEAD + "what is a cat\nPassage:   Cats purr.  \n<think>"),
    (("what is a cat", {"title": "Felines", "text": "Cats purr."}), None,
     HEAD + "what is a cat\nPassage: Felines Cats purr.\n<think>"),
    (("what is a cat", {"text": "Cats purr."}), None,
     HEAD + "what is a cat\nPassage: Cats purr.\n<think>"),
    (("what is a cat", {"title": "", "text": "Cats purr."}), None,
     HEAD + "what is a cat\nPassage:  Cats purr.\n<think>"),
    (("what is a cat", {"title": " Felines  ", "text": " Cats purr."}), None,
     HEAD + "what is a cat\nPassage:  Felines    Cats purr.\n<think>"),
    # title None: rank1-hf's choice (the official code would write "None Cats purr.")
    (("what is a cat", {"title": None, "text": "Cats purr."}), None,
     HEAD + "what is a cat\nPassage: Cats purr.\n<think>"),
    # instructions
    ((" what is a cat ", "Cats purr."), None,
     HEAD + " what is a cat \nPassage: Cats purr.\n<think>"),
    ((" what is a cat ", "Cats purr.", None), None,
     HEAD + " what is a cat \nPassage: Cats purr.\n<think>"),
    ((" what is a cat ", "Cats purr.", ""), None,
     HEAD + "what is a cat\nPassage: Cats purr.\n<think>"),
    (("what is a cat", "Cats purr.", "  what is a cat "), None,
     HEAD + "what is a cat\nPassage: Cats purr.\n<think>"),
    ((" what is a cat ", "Cats purr.", "what is a cat"), None,
     HEAD + "what is a cat\nPassage: Cats purr.\n<think>"),
    (("what is a cat", "Cats purr.", "Be strict."), None,
     HEAD + "what is a cat Be strict.\nPassage: Cats purr.\n<think>"),
    ((" what is a cat ", "Cats purr.", "Be strict. "), None,
     HEAD + "what is a cat  Be strict.\nPassage: Cats purr.\n<think>"),
    # dataset prompts
    (("cats purr", "Cats purr.", "Be brief."), SCIFACT,
     HEAD + "Claim: cats purr Be brief.\n\nA relevant passage would provide evidence that either **supports** or "
     "**refutes** this claim. A passage with any information on any related subpart should be relevant."
     "\nPassage: Cats purr.\n<think>"),
    ((" two sum ", {"title": "", "text": "def f(): pass"}), LEETCODE,
     HEAD + "I am looking to find different problems that share similar data structures (of any kind) or "
     "algorithms (e.g. DFS, DP, sorting, traversals, etc.). I am looking for problems that share one or both of "
     "these similarities to this:\n    \n two sum \n\nDoes this passage share any similarities? e.g. if there was a "
     "textbook on leetcode problems, this would be in the same book even though it could be in a different "
     "chapter. \n\n\n\nPassage:  def f(): pass\n<think>"),
    (("what is a cat", "Cats purr."), "", HEAD + "what is a cat\nPassage: Cats purr.\n<think>"),
    (("what is a cat", "Cats purr."), "Find docs for: FILL_QUERY_HERE",
     HEAD + "Find docs for: what is a cat\nPassage: Cats purr.\n<think>"),
]


@pytest.mark.parametrize("pair, template, expected", CASES)
def test_model_input_is_the_official_string(pair, template, expected):
    assert build_prompt(*unpack_pair(pair, template)) == expected


def test_a_ranker_builds_the_same_strings_row_by_row(tokenizers):
    """Mixed forms in one call: each row's prompt is the one the table gives for it alone."""
    from rank1_hf import Rank1
    from rank1_hf.testing import tiny_model

    tok = tokenizers["qwen"]
    ranker = Rank1.from_model(tiny_model(tok), tok, max_new_tokens=2, engine="generate")
    pairs = [pair for pair, template, _ in CASES if template is None]
    expected = [prompt for _, template, prompt in CASES if template is None]
    judgements = ranker.judge(pairs)
    assert [j.prompt_tokens for j in judgements] == [len(tok(p)["input_ids"]) for p in expected]
    seen = [ranker.prepare(*unpack_pair(pair)).prompt for pair in pairs]
    assert seen == expected


@pytest.mark.parametrize("bad, message", [
    (("q", {"title": "", "text": "  "}), "empty passage"),
    (("q", {"title": "A title", "text": ""}), "empty passage"),
    (("q", "   "), "empty passage"),
    (("q", {"title": "T"}), "string 'text'"),
    (("q", {"title": 3, "text": "p"}), "string 'title'"),
    (("q", "p", 3), "instruction must be a string"),
    (("  ", "p"), "empty or non-string query"),
])
def test_bad_pairs_are_clear_errors(bad, message):
    with pytest.raises(Rank1Error, match=message):
        unpack_pair(bad)
