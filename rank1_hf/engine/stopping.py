"""Finding ``</think>`` in what the model generates, one row at a time.

In the rank1 checkpoints ``</think>`` is one added token, so the check is a token comparison. In other
tokenizers it is several tokens, may be split anywhere, and its last piece may carry more text (``">\\n"``),
so the check decodes a short tail of the row, special tokens included (a special ``</think>`` must not
vanish in decoding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerBase, StoppingCriteria

from ..prompt import THINK_END


@dataclass(frozen=True)
class ThinkEnd:
    """Where ``</think>`` closed in a row's generated tokens.

    end: number of generated tokens up to and including the one that completes ``</think>``.
    clean: True when ``</think>`` ends exactly at that token's end, so the model's next-token logits are
        the readout; False when the token carries more text, so the readout needs its own pass.
    """

    end: int
    clean: bool


class ThinkDetector:
    """Detects ``</think>`` at the end of a growing list of generated tokens."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        ids = tokenizer.encode(THINK_END, add_special_tokens=False)
        self.token_id: int | None = ids[0] if len(ids) == 1 else None
        # Every token decodes to at least one character (or a replacement character), so this many tokens
        # always cover a freshly completed "</think>".
        self.window = len(THINK_END) + 1
        # Only a token whose own text holds the closing ">" can complete "</think>" as text; decoding a
        # row's tail for every other token would cost a tokenizer call per row per step.
        self._closes: dict[int, bool] = {}

    def check(self, generated: list[int]) -> ThinkEnd | None:
        """Called after each new token: has the last token completed ``</think>``?"""
        if not generated:
            return None
        last = generated[-1]
        if self.token_id is not None and last == self.token_id:
            return ThinkEnd(len(generated), True)
        closes = self._closes.get(last)
        if closes is None:
            closes = self._closes[last] = THINK_END[-1] in self.tokenizer.decode([last], skip_special_tokens=False)
        if not closes:
            return None
        # Rows stop at the first "</think>", so one found in the tail was completed by the last token.
        tail = self.tokenizer.decode(generated[-self.window :], skip_special_tokens=False)
        if THINK_END not in tail:
            return None
        return ThinkEnd(len(generated), tail.endswith(THINK_END))


def split_reasoning(tokenizer: PreTrainedTokenizerBase, generated: list[int], think: ThinkEnd | None) -> tuple[str, int]:
    """(reasoning text, reasoning token count) for a row's generated tokens.

    With a ``</think>``: the text before it, and the tokens generated before the token where it begins.
    Without: everything generated.
    """
    if think is None:
        return tokenizer.decode(generated, skip_special_tokens=False), len(generated)
    text = tokenizer.decode(generated[: think.end], skip_special_tokens=False)
    reasoning = text[: text.rfind(THINK_END)]
    # The first token of "</think>" is the first whose prefix text reaches past the reasoning.
    n = think.end - 1
    while n > 0 and len(tokenizer.decode(generated[:n], skip_special_tokens=False)) > len(reasoning):
        n -= 1
    return reasoning, n


class ThinkStoppingCriteria(StoppingCriteria):
    """Per-row stop flags for ``model.generate``: a row is done when its readout is in hand.

    A row that closed ``</think>`` cleanly runs one more step so that its ``ReadoutCapture`` sees the
    logits right after ``</think>`` (the readout comes free, no second pass); a row whose ``</think>``
    ended inside a token, or that produced an end-of-sequence token, is done at once.
    """

    def __init__(self, detector: ThinkDetector, prompt_width: int, eos_ids: set[int], max_new_tokens: int):
        self.detector = detector
        self.prompt_width = prompt_width
        self.eos_ids = eos_ids
        self.max_new_tokens = max_new_tokens
        self.think: dict[int, ThinkEnd] = {}
        self.stopped_at: dict[int, int] = {}  # rows that ended unfinished: how many tokens they keep
        self.readout: dict[int, tuple[float, float]] = {}
        self.done: list[bool] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None = None, **kwargs) -> torch.BoolTensor:
        if not self.done:
            self.done = [False] * input_ids.shape[0]
        generated = input_ids[:, self.prompt_width :].tolist()
        for row, tokens in enumerate(generated):
            if self.done[row]:
                continue
            if row in self.think:
                self.done[row] = row in self.readout
            elif tokens[-1] in self.eos_ids:
                self.stopped_at[row] = len(tokens) - 1
                self.done[row] = True
            elif (think := self.detector.check(tokens)) is not None:
                self.think[row] = think
                self.done[row] = not think.clean
            elif len(tokens) >= self.max_new_tokens:
                self.stopped_at[row] = len(tokens)
                self.done[row] = True
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


class ReadoutCapture(LogitsProcessor):
    """Keeps the " true"/" false" logits of rows whose previous token closed ``</think>`` cleanly.

    generate hands logits processors the raw float32 next-token logits; this one reads and never
    changes them, and is the only processor in the list, so what it reads is the model's own output.
    """

    def __init__(self, criteria: ThinkStoppingCriteria, readout_ids: tuple[int, int]):
        self.criteria = criteria
        self.readout_ids = list(readout_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.criteria.prompt_width
        for row, think in self.criteria.think.items():
            if think.clean and think.end == step and row not in self.criteria.readout:
                t, f = scores[row, self.readout_ids].tolist()
                self.criteria.readout[row] = (t, f)
        return scores
