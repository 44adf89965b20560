"""What rank1 says about one (query, passage) pair."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Outcome = Literal["answered", "forced", "fallback"]


@dataclass(frozen=True)
class Judgement:
    """One rank1 judgement.

    score: P(" true") / (P(" true") + P(" false")) at the position right after ``</think>``.
    outcome: "answered" when the model closed ``</think>`` itself; "forced" when its reasoning was
        unfinished (length cap or EOS) and was cut back to its last sentence and closed for it, as the
        reference does; "fallback" when no readout was possible and the score is 0.5.
    reasoning: the full text generated after ``<think>``, up to and excluding ``</think>``; for a "forced"
        judgement the score was read after a cut of it: :attr:`scored_reasoning`.
    reasoning_tokens: tokens generated for the reasoning (``</think>`` excluded).
    prompt_tokens: tokens in the prompt the model read.
    true_logit, false_logit: the two raw logits the score came from (None for "fallback").
    truncated: True when the passage was shortened to fit ``context_size``.
    """

    score: float
    outcome: Outcome
    reasoning: str
    reasoning_tokens: int
    prompt_tokens: int
    true_logit: float | None
    false_logit: float | None
    truncated: bool

    @property
    def margin(self) -> float:
        """``true_logit - false_logit``, whose sigmoid is the score (0, score 0.5, for a fallback)."""
        if self.true_logit is None or self.false_logit is None:
            return 0.0
        return self.true_logit - self.false_logit

    @property
    def scored_reasoning(self) -> str:
        """The reasoning the score was read after: for "forced", :attr:`reasoning` cut back to its last
        sentence (:func:`rank1_hf.prompt.cut_unfinished`, the text the forced readout saw); else all of it."""
        if self.outcome == "forced":
            from .prompt import cut_unfinished

            return cut_unfinished(self.reasoning)
        return self.reasoning

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Judgement":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})
