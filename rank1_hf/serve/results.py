"""What every API family's answer shares: rank1's per-result extras and token usage."""

from __future__ import annotations

from typing import Any

from ..judgement import Judgement


def reasoning(judgement: Judgement, wanted: bool) -> dict[str, Any]:
    """rank1's per-result extras, when ``return_reasoning`` asked for them."""
    if not wanted:
        return {}
    return {"reasoning": judgement.reasoning, "outcome": judgement.outcome,
            "reasoning_tokens": judgement.reasoning_tokens}


def usage(judgements: list[Judgement]) -> dict[str, int]:
    """vLLM's and Jina's ``usage``: prompt tokens, and prompt plus reasoning tokens."""
    prompt = sum(j.prompt_tokens for j in judgements)
    return {"prompt_tokens": prompt, "total_tokens": prompt + sum(j.reasoning_tokens for j in judgements)}
