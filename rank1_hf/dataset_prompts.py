"""The dataset prompts of the official rank1 code, and how a name picks one.

rank1 was evaluated on some BEIR sets and on BRIGHT with a data-specific prompt wrapped around the query:
``FILL_QUERY_HERE`` is replaced by the (query + instruction) text and the result is used as the query.
The texts below are transcribed by hand from the official ``dataset_prompts.py`` (orionw/rank1 at commit 30585c2,
``PROMPT_DICT``), byte for byte: where they differ from the paper's appendix table (trailing blank lines,
wording, emphasis, two entirely different prompts), the code is what produced the paper's numbers.

Names: the official keys (``SciFact``, ``Touche2020``, ``BrightRetrieval_aops``, ...) and rank1-hf's
friendly ones (``scifact``, ``touche2020``, ``bright-aops``, ...), looked up case-insensitively and ignoring
spaces, dashes, underscores and dots ("trec-covid", "BrightRetrieval aops" and "bright_aops" all work).
A task with subset prompts falls back to its own prompt for any other subset, as the official
``get_prompt(task, subtask)`` does: "bright-biology", "BrightRetrieval biology" and
``("BrightRetrieval", "biology")`` give the ``BrightRetrieval`` prompt. NevIR, mFollowIR and TREC DL use
no dataset prompt.
"""

from __future__ import annotations

import logging
import re

from .errors import Rank1Error
from .prompt import QUERY_PLACEHOLDER

logger = logging.getLogger(__name__)

#: The official PROMPT_DICT: MTEB task name, or ``{task}_{subset}``, -> template.
OFFICIAL_PROMPTS: dict[str, str] = {
    "SciFact": (
        "Claim: FILL_QUERY_HERE\n"
        "\n"
        "A relevant passage would provide evidence that either **supports** or **refutes** this claim. "
        "A passage with any information on any related subpart should be relevant."
    ),
    "ClimateFEVER": (
        "I am looking to write an essay for and need to find evidence the supports or contradict this statement:\n"
        "\n"
        "FILL_QUERY_HERE\n"
        "\n"
        "If the passage provides information that supports or contradicts it in any way it is relevant so I "
        "can cite it.\n"
        "\n"
    ),
    "TRECCOVID": "FILL_QUERY_HERE If the article answers any part of the question it is relevant.",
    "ArguAna": (
        "I am looking to write an essay and need to find counterarguments against this statement:\n"
        "\n"
        "FILL_QUERY_HERE\n"
        "\n"
        "Does this passage have any counterargument or evidence that could be used to help me?\n"
        "\n"
    ),
    "DBPedia": (
        "I am looking to write an essay on this topic and need as much related background information to "
        "help me. The topic is:\n"
        "\n"
        "FILL_QUERY_HERE\n"
        "\n"
        "If the passage provides any background information that could be connected it is relevant.\n"
        "\n"
    ),
    "FiQA2018": "FILL_QUERY_HERE Find a passage that would be a good answer from StackExchange.",
    "NFCorpus": (
        "Topic: FILL_QUERY_HERE\n"
        "\n"
        "Given the above topic, I need to learn about all aspects of it. It does not need to be directly "
        "relevant, only tangentially informational. Please mark as relevant any passages with even weak "
        "connections. I need to learn fast for my job, which means I need to understand each part "
        "individually.\n"
        "\n"
        "Again remember, any connection means relevant even if indirect. So if it is not addressed, that is "
        "okay -- it does not need to be explicitly. \n"
        "\n"
        "Find me passages with any type of connection, including weak connections!!!!"
    ),
    "Touche2020": (
        "I am looking to write an essay and need to find arguments for or against this statement:\n"
        "\n"
        "FILL_QUERY_HERE\n"
        "\n"
        "Does this passage have any argument or evidence that could be used to help me?\n"
        "\n"
    ),
    "SCIDOCS": (
        "papers that could be cited in FILL_QUERY_HERE. Anything with even indirect relevance should be "
        "relevant. This includes papers in the same broader field of science"
    ),
    "BrightRetrieval_aops": (
        "Find different but similar math problems to FILL_QUERY_HERE\n"
        "\n"
        "A document is relevant if it uses the same class of functions and shares **any** overlapping "
        "techniques."
    ),
    "BrightRetrieval_theoremqa_questions": (
        "Find a passage which uses the same mathematical process as this one: FILL_QUERY_HERE"
    ),
    "BrightRetrieval_leetcode": (
        "I am looking to find different problems that share similar data structures (of any kind) or "
        "algorithms (e.g. DFS, DP, sorting, traversals, etc.). I am looking for problems that share one or "
        "both of these similarities to this:\n"
        "    \n"  # four spaces: the official text has an indented blank line here
        "FILL_QUERY_HERE\n"
        "\n"
        "Does this passage share any similarities? e.g. if there was a textbook on leetcode problems, this "
        "would be in the same book even though it could be in a different chapter. \n"
        "\n"
        "\n"
    ),
    "BrightRetrieval_pony": (
        "I will use the programming language pony. Problem: FILL_QUERY_HERE\n"
        "\n"
        "But to solve the problem above, I need to know things about pony. A passage is relevant if it "
        "contains docs that match **any** part (even basic parts) of the code I will have to write for the "
        "above program."
    ),
    "BrightRetrieval": (
        "Can you find background information about the concepts used to answer the question:\n"
        "\n"
        "FILL_QUERY_HERE\n"
        "\n"
        "A passage is relevant if it contains background information about a **sub-concept** that someone "
        "might cite/link to when answering the above question."
    ),
}
# The official code gives theorems the questions prompt.
OFFICIAL_PROMPTS["BrightRetrieval_theoremqa_theorems"] = OFFICIAL_PROMPTS["BrightRetrieval_theoremqa_questions"]

#: rank1-hf's friendly names -> official key ("bright-" stands for "BrightRetrieval_").
FRIENDLY_NAMES: dict[str, str] = {
    "scifact": "SciFact",
    "climatefever": "ClimateFEVER",
    "treccovid": "TRECCOVID",
    "arguana": "ArguAna",
    "dbpedia": "DBPedia",
    "fiqa2018": "FiQA2018",
    "nfcorpus": "NFCorpus",
    "touche2020": "Touche2020",
    "scidocs": "SCIDOCS",
    "bright": "BrightRetrieval",
    "bright-aops": "BrightRetrieval_aops",
    "bright-theoremqa-questions": "BrightRetrieval_theoremqa_questions",
    "bright-theoremqa-theorems": "BrightRetrieval_theoremqa_theorems",
    "bright-leetcode": "BrightRetrieval_leetcode",
    "bright-pony": "BrightRetrieval_pony",
}

#: Every accepted name (official keys and friendly names) -> template.
DATASET_PROMPTS: dict[str, str] = {
    **OFFICIAL_PROMPTS,
    **{name: OFFICIAL_PROMPTS[key] for name, key in FRIENDLY_NAMES.items()},
}

# A few common spellings of the same datasets (normalized form -> normalized name above).
_ALIASES = {"fiqa": "fiqa2018", "touche": "touche2020"}


def official_prompt(task: str, subtask: str | None = None) -> str | None:
    """The official ``get_prompt(task, subtask)``: exact MTEB names, None for a task without a prompt.

    ``{task}_{subtask}`` when that key exists, else the task's own prompt (so subset ``"default"`` of a
    BEIR task, or any BRIGHT subset without its own key, gets the task's prompt).
    """
    if task not in OFFICIAL_PROMPTS:
        return None
    if subtask is not None and f"{task}_{subtask}" in OFFICIAL_PROMPTS:
        return OFFICIAL_PROMPTS[f"{task}_{subtask}"]
    return OFFICIAL_PROMPTS[task]


def _normalize(name: str) -> str:
    """Lowercase, drop separators, and shorten the official "BrightRetrieval" prefix to "bright"."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    if key.startswith("brightretrieval"):
        key = "bright" + key[len("brightretrieval"):]
    return _ALIASES.get(key, key)


# normalized name -> official key
_BY_KEY = {_normalize(name): FRIENDLY_NAMES.get(name, name) for name in DATASET_PROMPTS}
# Tasks with per-subset prompts: only these read "TASK SUBSET" as a task and a subset.
_SUBSET_TASKS = {key.split("_", 1)[0] for key in OFFICIAL_PROMPTS if "_" in key}


def _official_key(task: str, subtask: str | None) -> str | None:
    """The official key for a (task, subset) in any spelling, falling back to the task as get_prompt does."""
    if subtask is not None:
        task_key = _BY_KEY.get(_normalize(task))
        if task_key is None:
            return None
        return _BY_KEY.get(_normalize(f"{task} {subtask}"), task_key)
    key = _BY_KEY.get(_normalize(task))
    if key is None:  # "bright-biology": a task with subset prompts, and a subset without its own
        head, _, rest = re.sub(r"[\s\-_.]", " ", task.strip()).partition(" ")
        head_key = _BY_KEY.get(_normalize(head))
        if head_key in _SUBSET_TASKS and rest.strip():
            key = _official_key(head, rest)
    return key


def resolve_dataset_prompt(value: str | None, subtask: str | None = None) -> str | None:
    """A ``--dataset-prompt`` value as a template: a known name (with an optional subset), or one's own.

    Anything containing ``FILL_QUERY_HERE`` is used as given. Otherwise ``value`` names a task (and
    ``subtask`` its subset, or ``value`` holds both, as in "bright-biology"); the subset's own prompt is
    used when there is one, else the task's, as the official ``get_prompt`` does. A name with no prompt is
    a :class:`Rank1Error` that lists the names.
    """
    if value is None:
        return None
    if QUERY_PLACEHOLDER in value:
        return value
    key = _official_key(value, subtask)
    if key is None:
        name = value if subtask is None else f"{value} {subtask}"
        raise Rank1Error(
            f"unknown dataset prompt {name!r}: give a template containing {QUERY_PLACEHOLDER}, or one of "
            f"{', '.join(DATASET_PROMPTS)} (a BRIGHT subset without its own prompt, e.g. bright-biology, "
            f"gets BrightRetrieval's)"
        )
    if subtask is None and _normalize(value) not in _BY_KEY:
        logger.info("dataset prompt %r: no prompt of its own, using %s's", value, key)
    return OFFICIAL_PROMPTS[key]
