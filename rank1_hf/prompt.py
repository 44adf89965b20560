"""The rank1 prompt: how a (query, passage, instruction) becomes the exact string the model reads.

Everything here mirrors the official rank1 code (orionw/rank1, rank1.py: its prompt and predict()). The model input is a
raw string, no chat template, ending in ``<think>`` so that the model starts reasoning at once.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, Union

from .errors import Rank1Error

PROMPT_HEAD = "Determine if the following passage is relevant to the query. Answer only with 'true' or 'false'.\nQuery: "
PROMPT_PASSAGE = "\nPassage: "
PROMPT_TAIL = "\n<think>"
THINK_END = "</think>"
QUERY_PLACEHOLDER = "FILL_QUERY_HERE"

Passage = Union[str, Mapping[str, Any]]
# (query, passage) or (query, passage, instruction); a passage is a string or a {"title", "text"} record.
Pair = Union[tuple[str, Passage], tuple[str, Passage, "str | None"], Sequence[Any]]


def query_text(query: str, instruction: str | None = None, dataset_prompt: str | None = None) -> str:
    """The query as the model sees it, built as the official ``predict()`` builds it.

    With an instruction: ``f"{query} {instruction}".strip()``, or ``query.strip()`` when the two are equal
    once stripped (some datasets repeat the query in the instruction field; an empty instruction also
    leaves the stripped query). Without one (None) the query is used exactly as given. A
    ``dataset_prompt`` is a template containing ``FILL_QUERY_HERE``, which is replaced by that query; an
    empty one means no template, as in the official code.
    """
    if instruction is not None:
        query = f"{query} {instruction}".strip() if query.strip() != instruction.strip() else query.strip()
    if dataset_prompt:
        if QUERY_PLACEHOLDER not in dataset_prompt:
            raise Rank1Error(f"dataset prompt must contain the placeholder {QUERY_PLACEHOLDER}: {dataset_prompt!r}")
        query = dataset_prompt.replace(QUERY_PLACEHOLDER, query)
    return query


def passage_text(passage: Passage) -> str:
    """The passage as the model sees it, built as the official ``predict()`` builds it.

    A string is used as given. A record is ``f"{title} {text}"`` whenever it has a title, nothing
    stripped: an empty title gives ``" text"`` (BEIR corpora, as MTEB hands them over, have a title field
    that is often empty) and a padded title keeps its spaces. A record without a ``title`` key, or with
    ``title`` None, is its text alone (the official code would write ``"None text"`` for None).
    """
    if isinstance(passage, str):
        return passage
    if isinstance(passage, Mapping):
        text, title = passage.get("text"), passage.get("title")
        if not isinstance(text, str) or not (title is None or isinstance(title, str)):
            raise Rank1Error(f"a passage record needs a string 'text' (and a string 'title' if any), got {passage!r:.80}")
        return text if title is None else f"{title} {text}"
    raise Rank1Error(f"a passage must be a string or a {{'title', 'text'}} dict, got {type(passage).__name__}")


def build_prompt(query: str, passage: str) -> str:
    """The exact string rank1 reads for an already-joined query and a passage."""
    return PROMPT_HEAD + query + PROMPT_PASSAGE + passage + PROMPT_TAIL


def unpack_pair(pair: Pair, dataset_prompt: str | None = None) -> tuple[str, str]:
    """(query, passage[, instruction]) -> (query text as the model sees it, passage text). Empty text is an error."""
    if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) not in (2, 3):
        raise Rank1Error(f"each pair must be (query, passage) or (query, passage, instruction), got {pair!r:.80}")
    query, passage = pair[0], pair[1]
    instruction = pair[2] if len(pair) == 3 else None
    if instruction is not None and not isinstance(instruction, str):
        raise Rank1Error(f"an instruction must be a string or None, got {type(instruction).__name__} in pair {tuple(pair)!r:.80}")
    if not isinstance(query, str) or not query.strip():
        raise Rank1Error(f"empty or non-string query in pair {tuple(pair)!r:.80}")
    text = passage_text(passage)
    body = passage["text"] if isinstance(passage, Mapping) else text
    if not body.strip():  # a title alone is not a passage to judge (as in formats.read_corpus)
        raise Rank1Error(f"empty passage in pair {tuple(pair)!r:.80}")
    return query_text(query, instruction, dataset_prompt), text


def cut_unfinished(reasoning: str) -> str:
    """Cut unfinished reasoning back to its last sentence end, as the reference does before forcing ``</think>``.

    Text that already ends with ``.``, ``!`` or ``?`` is kept; otherwise it is cut after the last one of
    them. Text with none of them is kept whole (there is nothing to cut back to). The result is stripped.
    """
    text = reasoning.strip()
    if text and text[-1] not in ".!?":
        last = max(text.rfind("."), text.rfind("!"), text.rfind("?"))
        if last >= 0:
            text = text[: last + 1]
    return text.strip()


def forced_prompt(prompt: str, reasoning: str) -> str:
    """The string read for an unfinished judgement: prompt, the cut reasoning, and a closing ``</think>``."""
    return prompt + "\n" + cut_unfinished(reasoning) + "\n" + THINK_END
