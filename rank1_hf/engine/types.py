"""What the engines take and give, as plain data (no torch here, so the CLI and the pipeline start fast).

- :class:`Request`: one prompt to reason on, with the string it was tokenized from;
- :class:`Generation`: what one row produced, and its readout;
- :class:`EngineStats`: counts of the work done;
- :class:`DecodeSettings`: everything an engine needs besides the model and the prompts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .stopping import ThinkDetector, ThinkEnd


@dataclass(frozen=True)
class Request:
    """One prompt to reason on: ``id`` names it inside the engine, ``ids`` are the prompt's token ids and
    ``prompt`` the string they came from (an unfinished row's closing sequence is built from it)."""

    id: int
    ids: list[int]
    prompt: str


@dataclass
class Generation:
    """What one row produced: its generated tokens, how it ended, and its readout.

    tokens: generated ids, an end-of-sequence token excluded.
    think: where ``</think>`` closed, or None when the reasoning is unfinished.
    readout: (true, false) logits right after ``</think>`` (None only inside an engine, before reading).
    """

    tokens: list[int]
    think: "ThinkEnd | None"
    readout: tuple[float, float] | None = None


# EngineStats fields that add up over steps and calls (peak_rows is a maximum).
_ADDITIVE = ("prefill_tokens", "prefill_tokens_shared", "decode_slots", "generated_tokens", "readout_tokens",
             "reused_tokens", "steps", "oom_retries", "preemptions", "draft_tokens", "accepted_tokens")


@dataclass
class EngineStats:
    """Counts of the work an engine did, for benchmarks and logs (tokens pushed through the model)."""

    prefill_tokens: int = 0  # prompt tokens run, padding included
    prefill_tokens_shared: int = 0  # prompt tokens not prefilled: read from pages another row holds
    decode_slots: int = 0  # rows x decode steps computed
    generated_tokens: int = 0  # tokens kept as reasoning
    readout_tokens: int = 0  # tokens run only to read a readout (the step after </think>, closing suffixes)
    reused_tokens: int = 0  # tokens of closing sequences served from the cache instead of being run again
    steps: int = 0  # decode steps (a verification step counts one)
    draft_tokens: int = 0  # draft tokens verified (speculation)
    accepted_tokens: int = 0  # draft tokens kept: each saved a decode step
    oom_retries: int = 0
    preemptions: int = 0  # rows that gave their pages back when the pool was full (and were prefilled again)
    peak_rows: int = 0

    @property
    def acceptance(self) -> float | None:
        """The share of draft tokens kept (None: none proposed)."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    def copy(self) -> "EngineStats":
        return dataclasses.replace(self)

    def add_since(self, now: "EngineStats", before: "EngineStats", rows: int) -> None:
        """Add the work done between two snapshots of an engine's stats, a step that ran ``rows`` rows."""
        for name in _ADDITIVE:
            setattr(self, name, getattr(self, name) + getattr(now, name) - getattr(before, name))
        self.peak_rows = max(self.peak_rows, rows)


@dataclass(frozen=True)
class DecodeSettings:
    """What the engines need to know besides the prompts."""

    max_new_tokens: int
    eos_ids: frozenset[int]
    pad_id: int
    readout: tuple[int, int]
    detector: "ThinkDetector"
    tokenizer: "PreTrainedTokenizerBase"  # builds the closing sequence of a row without a free readout
    context_size: int  # the most tokens of one row: prompt + max_new_tokens
    kv_tokens: int  # the KV pool, in tokens: the continuous engine's pages, the generate engine's budget
    batch_size: int  # most rows decoded together (resolved: judging.default_batch_size when not asked)
    speculate: str = "off"  # continuous engine: "prompt-lookup" drafts verified (speculation.py), "off", "auto"


def fits(lengths: Sequence[int], rows_limit: int, settings: DecodeSettings) -> bool:
    """Whether rows with these prompt lengths may decode together in ``model.generate``: at most
    ``rows_limit`` rows, whose prompts and ``max_new_tokens`` each fit the KV pool together (generate's
    own cache reserves that much per row)."""
    if len(lengths) > rows_limit:
        return False
    return sum(n + settings.max_new_tokens for n in lengths) <= settings.kv_tokens
