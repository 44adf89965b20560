"""Named dataset prompts from the rank1 paper (arXiv 2502.18418, appendix E, Table 10).

rank1 was evaluated on some BEIR sets and the non-StackExchange BRIGHT subsets with a data-specific
prompt wrapped around the query: ``FILL_QUERY_HERE`` is replaced by the (query + instruction) text and
the result is used as the query. The strings below are transcribed from Table 10; the paper writes a
line break as ``<newline>``, which is ``"\\n"`` here. NevIR, mFollowIR and TREC DL use no dataset prompt.

Names are looked up case-insensitively and ignoring spaces, dashes, underscores and dots, so
"SciFact", "scifact", "trec-covid", "BrightRetrieval aops" and "bright-aops" all work.
"""

from __future__ import annotations

import re

from .errors import Rank1Error
from .prompt import QUERY_PLACEHOLDER

_CLAIM = (
    "Claim: FILL_QUERY_HERE\n\nA relevant passage would provide evidence that either **supports** or "
    "**refutes** this claim. A passage with any information on any related subpart should be relevant."
)
_THEOREMQA = "Find a passage which uses the same mathematical process as this one: FILL_QUERY_HERE"

# Display name (as in the paper's table, with "BrightRetrieval" shortened to "bright-") -> template.
DATASET_PROMPTS: dict[str, str] = {
    "scifact": _CLAIM,
    "climatefever": _CLAIM,
    "treccovid": "FILL_QUERY_HERE If the article answers any part of the question it is relevant.",
    "arguana": (
        "I am looking to write an essay and need to find counterarguments against this statement:\n\n"
        "FILL_QUERY_HERE\n\nDoes this passage have any counterargument or evidence that could be used to help me?"
    ),
    "dbpedia": (
        "I am looking to write an essay on this topic and need as much related background information to "
        "help me. The topic is:\n\nFILL_QUERY_HERE\n\nIf the passage provides any background information "
        "that could be connected it is relevant."
    ),
    "fiqa2018": "FILL_QUERY_HERE Find a passage that would be a good answer from StackExchange.",
    "nfcorpus": (
        "Topic: FILL_QUERY_HERE\n\nGiven the above topic, I need to learn about all aspects of it. It does "
        "not need to be directly relevant, only tangentially informational. Please mark as relevant any "
        "passages with even weak connections. I need to learn fast for my job, which means I need to "
        "understand each part individually.\n\nAgain remember, any connection means relevant even if "
        "indirect. So if it is not addressed, that is okay \u2013 it does not need to be explicitly.\n\n"
        "Find me passages with any type of connection, including weak connections!!!!"
    ),
    "touche2020": "FILL_QUERY_HERE **any** arguments for or against",
    "scidocs": (
        "papers that could be cited in FILL_QUERY_HERE. Anything with even indirect relevance should be "
        "relevant. This includes papers in the same broader field of science"
    ),
    "bright-aops": (
        "Find different but similar math problems to FILL_QUERY_HERE\n\nA document is relevant if it uses "
        "the same class of functions and shares **any** overlapping techniques."
    ),
    "bright-theoremqa-questions": _THEOREMQA,
    "bright-leetcode": (
        "I am looking to find different problems that share similar data structures (of any kind) or "
        "algorithms (e.g. DFS, DP, sorting, traversals, etc.). I am looking for problems that share one or "
        "both of these similarities to this:\n\nFILL_QUERY_HERE\n\nDoes this passage share any "
        "similarities? e.g. if there was a textbook on leetcode problems, this would be in the same book "
        "even though it could be in a different chapter."
    ),
    "bright-pony": (
        "I will use the programming language pony. Problem: FILL_QUERY_HERE\n\nBut to solve the problem "
        "above, I need to know things about pony. A passage is relevant if it contains docs that match any "
        "part (even basic parts) of the code I will have to write for the above program."
    ),
    # The table's plain "BrightRetrieval" row: the prompt for the BRIGHT subsets without their own row.
    "bright": (
        "Can you find background information about the concepts used to answer the question:\n\n"
        "FILL_QUERY_HERE\n\nA passage is relevant if it contains background information about a "
        "**sub-concept** that someone might cite/link to when answering the above question."
    ),
    "bright-theoremqa-theorems": _THEOREMQA,
}

# A few common spellings of the same datasets (normalized form -> name above).
_ALIASES = {"fiqa": "fiqa2018", "touche": "touche2020"}


def _normalize(name: str) -> str:
    """Lowercase, drop separators, and shorten the paper's "BrightRetrieval" prefix to "bright"."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    if key.startswith("brightretrieval"):
        key = "bright" + key[len("brightretrieval"):]
    return _ALIASES.get(key, key)


_BY_KEY = {_normalize(name): name for name in DATASET_PROMPTS}


def resolve_dataset_prompt(value: str | None) -> str | None:
    """A ``--dataset-prompt`` value as a template: a known name, or a template of one's own.

    Anything containing ``FILL_QUERY_HERE`` is used as given; otherwise the value must name one of
    :data:`DATASET_PROMPTS` (case-insensitive), or a :class:`Rank1Error` lists the names.
    """
    if value is None:
        return None
    if QUERY_PLACEHOLDER in value:
        return value
    name = _BY_KEY.get(_normalize(value))
    if name is None:
        raise Rank1Error(
            f"unknown dataset prompt {value!r}: give a template containing {QUERY_PLACEHOLDER} or one of "
            f"{', '.join(DATASET_PROMPTS)}"
        )
    return DATASET_PROMPTS[name]
