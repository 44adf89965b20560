"""The fallback engine: ``model.generate`` on length-sorted batches with a per-row StoppingCriteria.

It works for every model transformers can generate with (sliding-window and hybrid caches included),
but a batch runs until its slowest row is done, and unfinished rows are read in a separate full pass.
:class:`rank1_hf.engine.continuous.ContinuousEngine` is the fast path wherever its cache can hold the model.
"""

from __future__ import annotations

from collections import deque

import torch
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedModel, StoppingCriteriaList

from ..model.devices import input_device
from .decode_step import is_oom
from .types import DecodeSettings, EngineStats, Generation, Request, fits
from ..errors import Rank1Error
from .readout import closing_ids, forced_readout, left_pad
from .stopping import ReadoutCapture, ThinkStoppingCriteria


class GenerateEngine:
    """``model.generate`` over length-sorted batches, one StoppingCriteria flag per row."""

    name = "generate"

    def __init__(self, model: PreTrainedModel, settings: DecodeSettings):
        self.model = model
        self.settings = settings
        self.stats = EngineStats()
        self.rows_limit = settings.batch_size  # most rows in a batch: halved by each out-of-memory retry
        self.rows_stepped = 0  # rows in the last step's batch

    def generation_config(self) -> GenerationConfig:
        # A fresh config, so nothing from the checkpoint's generation_config (sampling, top-k/top-p,
        # repetition penalty, ...) reaches the logits: greedy on the raw logits, as the reference.
        # One step more than the cap, so a row that closes </think> on its last allowed token still
        # gets its readout step.
        return GenerationConfig(
            do_sample=False,
            num_beams=1,
            temperature=None,
            top_k=None,
            top_p=None,
            repetition_penalty=1.0,
            max_new_tokens=self.settings.max_new_tokens + 1,
            eos_token_id=sorted(self.settings.eos_ids) or None,
            pad_token_id=self.settings.pad_id,
        )

    def wants(self) -> int:
        """Every waiting request: a step picks the shortest ones, so a batch holds similar lengths."""
        return 1 << 30

    def warmup(self) -> None:
        """Nothing to prepare ahead."""

    def close(self) -> None:
        """Nothing held between steps."""

    def drop(self, ids: set[int]) -> None:
        """No row outlives a step here."""

    def step(self, waiting: deque[Request]) -> list[tuple[Request, Generation]]:
        """One ``generate`` batch of the shortest waiting prompts, under the row limit and the KV pool; the rest
        stay in ``waiting``."""
        ordered = sorted(waiting, key=lambda r: len(r.ids))
        batch: list[Request] = []
        for request in ordered:
            if batch and not fits([len(r.ids) for r in batch + [request]], self.rows_limit, self.settings):
                break
            batch.append(request)
        taken = {id(r) for r in batch}
        rest = [r for r in waiting if id(r) not in taken]
        waiting.clear()
        waiting.extend(rest)
        self.rows_stepped = 0  # the largest batch that ran to the end (an out-of-memory one is split)
        return self._run_batch(batch) if batch else []

    def _run_batch(self, batch: list[Request]) -> list[tuple[Request, Generation]]:
        try:
            return self._read_unfinished(self._generate(batch))
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_oom(error):
                raise
            if len(batch) == 1:
                raise Rank1Error("out of memory on a single pair: lower max_new_tokens or context_size") from error
            # Nothing of this batch was returned yet, so halving and retrying neither loses nor repeats a row.
            self.stats.oom_retries += 1
            self.rows_limit = max(1, len(batch) // 2)
            half = len(batch) // 2
            return self._run_batch(batch[:half]) + self._run_batch(batch[half:])

    @torch.inference_mode()
    def _generate(self, batch: list[Request]) -> list[tuple[Request, Generation]]:
        s = self.settings
        ids, mask = left_pad([r.ids for r in batch], s.pad_id)
        width = ids.shape[1]
        criteria = ThinkStoppingCriteria(s.detector, width, s.eos_ids, s.max_new_tokens)
        device = input_device(self.model)
        out = self.model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            generation_config=self.generation_config(),
            logits_processor=LogitsProcessorList([ReadoutCapture(criteria, s.readout)]),
            stopping_criteria=StoppingCriteriaList([criteria]),
        )
        generated = out[:, width:].tolist()
        self.rows_stepped = max(self.rows_stepped, len(batch))
        steps = len(generated[0]) if generated else 0
        self.stats.prefill_tokens += ids.numel()
        self.stats.decode_slots += len(batch) * max(steps - 1, 0)
        self.stats.steps += steps
        self.stats.peak_rows = max(self.stats.peak_rows, len(batch))
        results = []
        for row, request in enumerate(batch):
            think = criteria.think.get(row)
            if think is not None:
                tokens = generated[row][: think.end]
                readout = criteria.readout.get(row)
                self.stats.readout_tokens += readout is not None
            else:
                stop = criteria.stopped_at.get(row, s.max_new_tokens)
                tokens = generated[row][:stop]
                readout = None
            self.stats.generated_tokens += len(tokens)
            results.append((request, Generation(tokens, think, readout)))
        return results

    def _read_unfinished(self, results: list[tuple[Request, Generation]]) -> list[tuple[Request, Generation]]:
        """A full forward pass over each row without a free readout, on its :func:`closing_ids` sequence."""
        missing = [(r, g) for r, g in results if g.readout is None]
        if missing:
            sequences = [closing_ids(self.settings.tokenizer, r, g.tokens, g.think) for r, g in missing]
            logits = forced_readout(self.model, sequences, self.settings.pad_id, self.settings.readout)
            for (_, gen), seq, pair in zip(missing, sequences, logits):
                gen.readout = pair
                self.stats.readout_tokens += len(seq)
        return results
