"""What every API family's request shares: text that must be valid Unicode, a non-blank query, rank1's own
fields (``instruction``, ``dataset_prompt``, ``return_reasoning``) and vLLM's ``truncate_prompt_tokens``.

Text is checked here, where pydantic names the field: a JSON escape such as ``\\ud800`` (a lone
surrogate) decodes to a Python str that no tokenizer can encode, so it is refused with 422.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"not valid Unicode text: lone surrogate U+{ord(text[error.start]):04X} at character "
                         f"{error.start}") from None
    return text


def _not_blank(query: str) -> str:
    if not query.strip():
        raise ValueError("query must not be empty")
    return query


def _valid_record(record: dict[str, Any]) -> dict[str, Any]:
    """Every string in a document record (keys and values, at any depth) is valid Unicode."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"not valid Unicode text in the record: {error.reason}") from None
    return record


#: A string the tokenizer can encode.
Text = Annotated[str, AfterValidator(_valid_unicode)]
#: A query: valid text, not blank.
Query = Annotated[str, AfterValidator(_valid_unicode), AfterValidator(_not_blank)]
#: A document given as a JSON object (Cohere v1 ``rank_fields`` picks its fields).
Record = Annotated[dict[str, Any], AfterValidator(_valid_record)]


class TextRecord(BaseModel):
    """A document given as ``{"text": ...}`` (Jina, vLLM, Infinity); other fields are ignored."""

    text: Text


class Rank1Fields(BaseModel):
    """rank1's own fields, on every judging route."""

    instruction: Text | None = Field(None, description="joined to the query the rank1 way")
    dataset_prompt: Text | None = Field(
        None, description="a template containing FILL_QUERY_HERE, or the name of an official rank1 prompt "
                          "(e.g. SciFact, bright-biology); default: the server's --dataset-prompt")
    return_reasoning: bool = Field(False, description="add reasoning, outcome and reasoning_tokens to each result")


def _prompt_tokens(n: int) -> int:
    if n == 0 or n < -1:
        raise ValueError("must be -1 (the server's limit) or a number of tokens >= 1")
    return n


#: vLLM's ``truncate_prompt_tokens``: the whole rank1 prompt cut to this many tokens (the passage only);
#: -1 means the model's own limit (--context-size minus --max-new-tokens), as in vLLM.
PromptTokens = Annotated[int, Field(strict=True), AfterValidator(_prompt_tokens)]
TRUNCATE_PROMPT_TOKENS = Field(None, description="cut each prompt to this many tokens (the passage only); -1: "
                                                 "the server's limit")
