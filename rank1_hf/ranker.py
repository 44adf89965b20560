"""``Rank1``: score (query, passage) pairs with a rank1 model, as the reference implementation does.

A judgement goes through four steps, each in its own module:

1. prompt: the exact rank1 string, tokenized with the tokenizer's own special-token rule
   (passage-only truncation when prompt + max_new_tokens would not fit the context);
2. engine: greedy reasoning until ``</think>``, many prompts at once;
3. readout: the " true"/" false" logits right after ``</think>`` (from the engine's next step when the
   model closed it itself, from a forced pass on the cut reasoning otherwise);
4. scoring: the softmax over those two logits.

With ``store=``, :meth:`Rank1.judge` (and so :meth:`~Rank1.predict`, :meth:`~Rank1.rank`, the mteb
adapter and the drop-in ``rank1`` class) looks every pair up in a :class:`~rank1_hf.store.JudgementStore`
first, keyed as the CLI keys it, and commits each new judgement as soon as it is made.

What happens is logged to ``logging.getLogger("rank1_hf")``: the engine used, store reuse, passages cut
to fit the context, unfinished reasoning, out-of-memory retries.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .engine import ContinuousEngine, DecodeSettings, EngineStats, Generation, Request
from .errors import Rank1Error
from .fingerprint import files_fingerprint, hub_fingerprint, tensors_fingerprint
from .generate import GenerateEngine
from .head import prepack_head
from .judgement import Judgement
from .options import JudgeOptions, LoadOptions
from .prompt import THINK_END, Pair, Passage, build_prompt, forced_prompt, unpack_pair
from .readout import readout_ids, score
from .stopping import ThinkDetector, ThinkEnd, split_reasoning
from .store import JudgementStore, pair_key

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """One pair ready for the model: its prompt string, token ids, and whether the passage was cut."""

    prompt: str
    ids: list[int]
    truncated: bool


class Judging:
    """What :meth:`Rank1.judge_iter` returns: an iterator of (input index, :class:`Judgement`) pairs, in
    the order they finish, and ``stats``, the :class:`~rank1_hf.engine.EngineStats` of this call's work
    (complete once the iterator is exhausted; all zero when the call judged nothing).
    """

    def __init__(self, run: Callable[["Judging"], Iterator[tuple[int, Judgement]]]):
        self.stats = EngineStats()
        self._pairs = run(self)

    def __iter__(self) -> "Judging":
        return self

    def __next__(self) -> tuple[int, Judgement]:
        return next(self._pairs)

    def close(self) -> None:
        self._pairs.close()


@dataclass(frozen=True)
class Judged:
    """What :meth:`Rank1.judge_with_stats` returns: one judgement per pair, in input order, and the
    :class:`~rank1_hf.engine.EngineStats` of the pairs this call judged (stored ones cost nothing)."""

    judgements: list[Judgement]
    stats: EngineStats


class Rank1:
    """A rank1 reranker on plain transformers.

    >>> ranker = Rank1("jhu-clsp/rank1-7b")
    >>> js = ranker.judge([("what is a cat", "Cats are small felines.")])
    >>> js[0].score, js[0].outcome
    (0.97..., 'answered')

    Options come as :class:`~rank1_hf.options.LoadOptions` (``load=``) and
    :class:`~rank1_hf.options.JudgeOptions` (``judge=``), or as their fields given as keywords
    (``dtype=..., max_new_tokens=...``), not both; see those classes and :meth:`from_model`.
    """

    def __init__(
        self,
        model_name_or_path: str,
        *,
        load: LoadOptions | None = None,
        judge: JudgeOptions | None = None,
        show_progress_bar: bool | None = None,
        store: str | os.PathLike | JudgementStore | None = None,
        **options: Any,
    ):
        from .loading import load_model

        load_fields = {f.name for f in dataclasses.fields(LoadOptions)}
        load = _options(LoadOptions, load, {k: v for k, v in options.items() if k in load_fields}, "load")
        judge = _options(JudgeOptions, judge, {k: v for k, v in options.items() if k not in load_fields}, "judge")
        model, tokenizer = load_model(model_name_or_path, **load.as_kwargs())
        # AWQ is recognised from the checkpoint, not asked for
        quantization = load.quantization or getattr(model.config, "quantization_config", None)
        record = {"model": model_name_or_path, "revision": load.revision, "quantization": _describe(quantization)}
        self._setup(model, tokenizer, record, judge, show_progress_bar, store)
        self._weights = _loaded_fingerprint(model_name_or_path, model)

    @classmethod
    def from_model(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        name: str | None = None,
        *,
        judge: JudgeOptions | None = None,
        show_progress_bar: bool | None = None,
        store: str | os.PathLike | JudgementStore | None = None,
        **options: Any,
    ) -> "Rank1":
        """Wrap an already-loaded causal LM and its tokenizer.

        name: the model's name in the judgement store's settings (default: the config's
            ``_name_or_path``). The key also holds a fingerprint of the weights themselves
            (:mod:`rank1_hf.fingerprint`, computed on first use), so different weights never share
            judgements, whatever their names.

        judge: the judging options as one :class:`~rank1_hf.options.JudgeOptions` (checked there), or
            its fields as keywords:
            max_new_tokens: reasoning cap, 8192 as the reference.
            context_size: prompt + max_new_tokens must fit in it (16000 as the reference); longer passages
                are cut (only the passage, never the template's tail) and flagged ``truncated``.
            batch_size: most pairs decoded together (default 32 on GPU, 16 on CPU).
            token_budget: most (prompt + max_new_tokens) tokens reserved by the pairs in flight.
            dataset_prompt: a template with ``FILL_QUERY_HERE`` applied to every query.
            engine: "continuous" (rows leave and join the batch as they finish), "generate"
                (``model.generate`` with a StoppingCriteria), or "auto" (continuous where the model's
                cache allows it).
            show_progress_bar: None shows one when stderr is a terminal.
            store: a :class:`~rank1_hf.store.JudgementStore` or the path of one (created if missing):
                :meth:`judge` reuses the judgements stored for these settings and stores new ones as
                they finish, so a restarted job or service judges only what is missing.
        """
        self = cls.__new__(cls)
        name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        record = {"model": name, "revision": None,
                  "quantization": _describe(getattr(model.config, "quantization_config", None))}
        self._setup(model, tokenizer, record, _options(JudgeOptions, judge, options, "judge"), show_progress_bar, store)
        return self

    def _setup(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        load: dict,
        judge: JudgeOptions,
        show_progress_bar: bool | None,
        store: str | os.PathLike | JudgementStore | None,
    ) -> None:
        """The one set-up of a ranker, from a loaded model and checked options (both constructors end here)."""
        self.model = model.eval()
        prepack_head(model)
        self.tokenizer = tokenizer
        self.readout = readout_ids(tokenizer)
        self.detector = ThinkDetector(tokenizer)
        self.max_new_tokens = judge.max_new_tokens
        self.context_size = judge.context_size
        self.batch_size = judge.batch_size or (32 if torch.cuda.is_available() else 16)
        self.token_budget = judge.token_budget
        self.dataset_prompt = judge.dataset_prompt
        self.engine = judge.engine
        self.show_progress_bar = show_progress_bar
        self.load_options = load
        self.store = store if isinstance(store, JudgementStore) or store is None else JudgementStore(store)
        self._weights: str | None = None  # the weights' fingerprint, computed on first use (settings())
        self._engine_logged: str | None = None  # the engine last logged as chosen

    # ---- prompts -------------------------------------------------------------------------------------

    def prepare(self, query: str, passage: str) -> Prepared:
        """Prompt and token ids for one (joined query, passage text), cutting the passage if it must.

        The prompt may use at most ``context_size - max_new_tokens`` tokens. Only the passage is cut, at a
        token boundary, and the template around it stays whole.
        """
        budget = self.context_size - self.max_new_tokens
        prompt = build_prompt(query, passage)
        ids = self.tokenizer(prompt)["input_ids"]
        if len(ids) <= budget:
            return Prepared(prompt, ids, False)
        pieces = self.tokenizer(passage, add_special_tokens=False, return_offsets_mapping=True)
        ends = [end for _, end in pieces["offset_mapping"]]
        keep = len(ends) - (len(ids) - budget)
        while keep > 0:
            prompt = build_prompt(query, passage[: ends[keep - 1]].rstrip())
            ids = self.tokenizer(prompt)["input_ids"]
            if len(ids) <= budget:
                return Prepared(prompt, ids, True)
            keep -= max(1, len(ids) - budget)
        raise Rank1Error(
            f"query too long: the prompt without its passage exceeds context_size - max_new_tokens "
            f"= {budget} tokens (query starts {query[:60]!r})"
        )

    def settings(self, dataset_prompt: str | None = None) -> dict[str, Any]:
        """Everything that determines a judgement besides the pair: the key of the judgement store.

        ``weights`` is the fingerprint of the weights (:mod:`rank1_hf.fingerprint`): the resolved commit
        of a hub checkpoint, a hash of a local directory's weight files, or of an in-memory model's
        tensors (computed once, on the first call). ``dataset_prompt``: a call's own (default: the ranker's).
        """
        if self._weights is None:
            self._weights = tensors_fingerprint(self.model)
        return {
            **self.load_options,
            "weights": self._weights,
            "dtype": str(self.model.dtype),
            "max_new_tokens": self.max_new_tokens,
            "context_size": self.context_size,
            "dataset_prompt": self._dataset_prompt(dataset_prompt),
            "prompt": build_prompt("{query}", "{passage}"),
            "readout": list(self.readout),
        }

    # ---- judging -------------------------------------------------------------------------------------

    def judge(
        self, pairs: Sequence[Pair], batch_size: int | None = None, show_progress_bar: bool | None = None,
        *, dataset_prompt: str | None = None,
    ) -> list[Judgement]:
        """Judge pairs; results in input order (reusing the store, when there is one).

        pairs: (query, passage) or (query, passage, instruction) tuples; a passage is a string or a
            ``{"title", "text"}`` dict.
        dataset_prompt: this call's template with ``FILL_QUERY_HERE`` (default: the ranker's own).
        Returns: one :class:`Judgement` per pair.
        """
        return self.judge_with_stats(pairs, batch_size, show_progress_bar, dataset_prompt=dataset_prompt).judgements

    def judge_with_stats(
        self, pairs: Sequence[Pair], batch_size: int | None = None, show_progress_bar: bool | None = None,
        *, dataset_prompt: str | None = None,
    ) -> Judged:
        """:meth:`judge`, with the engine's counts of this call's work (see :class:`Judged`)."""
        out: list[Judgement | None] = [None] * len(pairs)
        judging = self._judge_reusing(pairs, batch_size, show_progress_bar, self._dataset_prompt(dataset_prompt))
        for i, judgement in judging:
            out[i] = judgement
        return Judged(out, judging.stats)  # type: ignore[arg-type]

    def judge_iter(
        self, pairs: Iterable[Pair], batch_size: int | None = None, show_progress_bar: bool | None = None,
        *, dataset_prompt: str | None = None,
    ) -> Judging:
        """(input index, judgement) as each pair finishes, in whatever order they finish (no store).

        ``pairs`` may be any iterable, also one that produces pairs while judging runs (a stream): pairs
        are prepared as the engine takes them, so memory follows the pairs in flight. A sized sequence is
        fed shortest prompt first, which keeps prefill batches tight. The returned :class:`Judging`
        carries this call's engine counts in ``stats``.
        """
        prompt = self._dataset_prompt(dataset_prompt)
        return Judging(lambda judging: self._judge_run(judging, pairs, batch_size, show_progress_bar, prompt))

    def _judge_run(
        self, judging: Judging, pairs: Iterable[Pair], batch_size: int | None, show_progress_bar: bool | None,
        dataset_prompt: str | None,
    ) -> Iterator[tuple[int, Judgement]]:
        show = self.show_progress_bar if show_progress_bar is None else show_progress_bar
        total = len(pairs) if isinstance(pairs, Sequence) else None
        if show is None:
            show = sys.stderr.isatty() and total != 1
        prepared: dict[int, Prepared] = {}
        longest = None
        if isinstance(pairs, Sequence):  # prepared up front: bad input fails before any judging
            ready = [self.prepare(*unpack_pair(pair, dataset_prompt)) for pair in pairs]
            longest = max((len(p.ids) for p in ready), default=None)

        def requests() -> Iterator[Request]:
            if isinstance(pairs, Sequence):
                for i in sorted(range(len(ready)), key=lambda i: (len(ready[i].ids), i)):
                    prepared[i] = ready[i]
                    yield Request(i, ready[i].ids)
                return
            for i, pair in enumerate(pairs):
                prepared[i] = self.prepare(*unpack_pair(pair, dataset_prompt))
                yield Request(i, prepared[i].ids)

        engine = self._engine(
            batch_size, lambda request, tokens, think: self._closing(prepared[request.index], tokens, think), longest
        )
        judging.stats = engine.stats  # the engine adds to it as it runs
        if engine.name != self._engine_logged:
            logger.info("engine: %s (asked for %r)", engine.name, self.engine)
            self._engine_logged = engine.name
        bar = tqdm(total=total, unit="pair", disable=not show, desc="rank1", dynamic_ncols=True)
        try:
            for i, generation in engine.run(requests()):
                yield i, self._judgement(prepared.pop(i), generation)
                bar.update(1)
        finally:
            bar.close()

    def predict(
        self,
        sentences: Pair | Sequence[Pair],
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
        activation_fn: Callable | None = None,
        apply_softmax: bool | None = False,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        *,
        dataset_prompt: str | None = None,
    ) -> Any:
        """Scores in input order, as sentence-transformers' ``CrossEncoder.predict`` returns them.

        sentences: one pair, or a list of pairs (see :meth:`judge`); one pair gives one score.
        activation_fn: None gives the rank1 score P(" true") (float32 in [0, 1]); otherwise it is applied
            to the true-false logit margins (a float64 tensor), whose sigmoid is that score:
            ``torch.nn.Identity()`` gives the raw margins, which never saturate (a "fallback" judgement,
            without logits, has margin 0: score 0.5).
        apply_softmax: accepted as in CrossEncoder; a no-op for rank1's single score per pair.
        convert_to_tensor: a float32 torch tensor; else ``convert_to_numpy`` a float32 numpy array (the
            default); else a list of 0-d tensors.
        dataset_prompt: this call's template with ``FILL_QUERY_HERE`` (default: the ranker's own).
        """
        single = isinstance(sentences, (list, tuple)) and len(sentences) > 0 and isinstance(sentences[0], str)
        pairs: Sequence[Pair] = [sentences] if single else sentences  # type: ignore[list-item]
        judgements = self.judge(
            pairs, batch_size=batch_size, show_progress_bar=show_progress_bar, dataset_prompt=dataset_prompt
        )
        values = self._values(judgements, activation_fn).float()
        out: Any = values if convert_to_tensor else values.numpy() if convert_to_numpy else list(values)
        return out[0] if single else out

    def rank(
        self,
        query: str,
        documents: Sequence[Passage],
        top_k: int | None = None,
        return_documents: bool = False,
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
        activation_fn: Callable | None = None,
        apply_softmax: bool | None = False,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        *,
        instruction: str | None = None,
        dataset_prompt: str | None = None,
    ) -> list[dict[str, Any]]:
        """Rank documents for one query, best first, like sentence-transformers' ``CrossEncoder.rank``.

        The positional parameters are CrossEncoder's (sentence-transformers 5.x); ``instruction`` (joined
        to the query the rank1 way) and ``dataset_prompt`` (as in :meth:`judge`) are keyword-only. ``activation_fn`` as in :meth:`predict`;
        ``apply_softmax``, ``convert_to_numpy`` and ``convert_to_tensor`` are accepted and change nothing.

        Returns: ``[{"corpus_id": i, "score": s}, ...]`` (plus ``"text"`` with return_documents), sorted
        on the full-precision (float64) scores, ties by corpus_id, and cut to ``top_k``. The scores are
        the float64 values the CLI ranks a run by, so both order the same documents the same way.
        """
        pairs = [(query, doc, instruction) for doc in documents]
        judgements = self.judge(
            pairs, batch_size=batch_size, show_progress_bar=show_progress_bar, dataset_prompt=dataset_prompt
        )
        scores = self._values(judgements, activation_fn).tolist()
        hits = []
        for i in best_first(scores)[:top_k]:
            hit: dict[str, Any] = {"corpus_id": i, "score": scores[i]}
            if return_documents:
                hit["text"] = documents[i]
            hits.append(hit)
        return hits

    # ---- the store and the log -----------------------------------------------------------------------

    @staticmethod
    def _values(judgements: Sequence[Judgement], activation_fn: Callable | None) -> torch.Tensor:
        """float64 scores, or ``activation_fn`` of the true-false margins (0 for a fallback)."""
        if activation_fn is None:
            return torch.tensor([j.score for j in judgements], dtype=torch.float64)
        margins = [0.0 if j.true_logit is None or j.false_logit is None else j.true_logit - j.false_logit
                   for j in judgements]
        return torch.as_tensor(activation_fn(torch.tensor(margins, dtype=torch.float64)), dtype=torch.float64)

    def _judge_reusing(
        self, pairs: Sequence[Pair], batch_size: int | None, show_progress_bar: bool | None,
        dataset_prompt: str | None,
    ) -> Judging:
        """(input index, judgement): stored ones first, then new ones, each committed as it is yielded.

        Identical texts are judged once. The key is the CLI's (:func:`rank1_hf.pipeline.item_key`): the
        final query text and the passage text, under :meth:`settings` with this call's ``dataset_prompt``.
        """
        if self.store is None:
            return self.judge_iter_logged(pairs, batch_size, show_progress_bar, dataset_prompt=dataset_prompt)
        return Judging(lambda judging: self._reuse_run(judging, pairs, batch_size, show_progress_bar, dataset_prompt))

    def _reuse_run(
        self, judging: Judging, pairs: Sequence[Pair], batch_size: int | None, show_progress_bar: bool | None,
        dataset_prompt: str | None,
    ) -> Iterator[tuple[int, Judgement]]:
        assert self.store is not None
        keys = [pair_key(*unpack_pair(pair, dataset_prompt)) for pair in pairs]
        skey = self.store.register_settings(self.settings(dataset_prompt))
        found = self.store.get_many(skey, keys)
        where: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            where.setdefault(key, []).append(i)
        todo = [key for key in where if key not in found]
        reused = len(pairs) - sum(len(where[key]) for key in todo)
        if reused:
            logger.info("judgement store %s: %d of %d pairs reused", self.store.path, reused, len(pairs))
        for i, key in enumerate(keys):
            if key in found:
                yield i, found[key]
        first = [where[key][0] for key in todo]
        new = self.judge_iter_logged([pairs[i] for i in first], batch_size, show_progress_bar, first,
                                     dataset_prompt=dataset_prompt)
        for n, judgement in new:
            key = keys[n]
            # One commit per judgement (a few ms, next to seconds of judging): a kill -9 loses only the
            # pairs still in flight.
            self.store.put_many(skey, [(key, judgement)])
            for i in where[key]:
                yield i, judgement
        judging.stats = new.stats

    def judge_iter_logged(
        self,
        pairs: Sequence[Pair],
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
        index: Sequence[int] | None = None,
        *,
        dataset_prompt: str | None = None,
    ) -> Judging:
        """:meth:`judge_iter` (no store), with what happened logged; yields ``index[i]`` for pair i."""
        prompt = self._dataset_prompt(dataset_prompt)
        return Judging(lambda judging: self._logged_run(judging, pairs, batch_size, show_progress_bar, index, prompt))

    def _logged_run(
        self, judging: Judging, pairs: Sequence[Pair], batch_size: int | None, show_progress_bar: bool | None,
        index: Sequence[int] | None, dataset_prompt: str | None,
    ) -> Iterator[tuple[int, Judgement]]:
        if not pairs:
            return
        index = range(len(pairs)) if index is None else index
        cut = unfinished = 0
        inner = self.judge_iter(pairs, batch_size=batch_size, show_progress_bar=show_progress_bar,
                                dataset_prompt=dataset_prompt)
        for i, judgement in inner:
            if judgement.truncated:
                cut += 1
                logger.info("pair %d: passage cut to fit context_size=%d", index[i], self.context_size)
            if judgement.outcome != "answered":
                unfinished += 1
                logger.debug("pair %d: %s (reasoning unfinished after %d tokens)", index[i], judgement.outcome,
                             judgement.reasoning_tokens)
            yield index[i], judgement
        if cut:
            logger.warning("%d of %d passages were cut to fit context_size=%d (the passage only; the template "
                           "stays whole)", cut, len(pairs), self.context_size)
        if unfinished:
            logger.info("%d of %d pairs did not close </think> within max_new_tokens=%d and were forced to "
                        "an answer", unfinished, len(pairs), self.max_new_tokens)
        judging.stats = inner.stats
        if inner.stats.oom_retries:
            logger.warning("%d out-of-memory retries (the batch was split and run again)", inner.stats.oom_retries)

    # ---- internals -----------------------------------------------------------------------------------

    def _dataset_prompt(self, given: str | None) -> str | None:
        """A call's dataset prompt: its own when given, else the ranker's."""
        return self.dataset_prompt if given is None else given

    def _engine(self, batch_size: int | None, close, longest_prompt: int | None = None) -> ContinuousEngine | GenerateEngine:
        tok, config = self.tokenizer, self.model.generation_config
        eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        configured = config.eos_token_id if config is not None else None
        eos |= set(configured if isinstance(configured, (list, tuple)) else [configured] if configured is not None else [])
        pad = tok.pad_token_id if tok.pad_token_id is not None else (min(eos) if eos else 0)
        settings = DecodeSettings(
            max_new_tokens=self.max_new_tokens,
            eos_ids=eos,
            pad_id=pad,
            readout=self.readout,
            detector=self.detector,
            close=close,
            batch_size=batch_size or self.batch_size,
            token_budget=self.token_budget,
            longest_prompt=longest_prompt,
        )
        if self.engine == "generate":
            return GenerateEngine(self.model, settings)
        if ContinuousEngine.supports(self.model):
            return ContinuousEngine(self.model, settings)
        if self.engine == "continuous":
            raise Rank1Error("the continuous engine needs a plain full-attention KV cache; use engine='generate'")
        return GenerateEngine(self.model, settings)

    def _judgement(self, prepared: Prepared, generation: Generation) -> Judgement:
        reasoning, n = split_reasoning(self.tokenizer, generation.tokens, generation.think)
        outcome = "answered" if generation.think is not None else "forced"
        t, f = generation.readout
        if not (math.isfinite(t) and math.isfinite(f)):
            return Judgement(0.5, "fallback", reasoning, n, len(prepared.ids), None, None, prepared.truncated)
        return Judgement(score(t, f), outcome, reasoning, n, len(prepared.ids), t, f, prepared.truncated)

    def _closing(self, prepared: Prepared, tokens: list[int], think: ThinkEnd | None) -> list[int]:
        """The token sequence read for a row without a free readout (prompt ids first).

        A row whose ``</think>`` ended inside a token is read on its own tokens up to the exact end of
        ``</think>`` (outcome "answered"); unfinished reasoning is cut back to its last sentence and closed
        with ``"\\n</think>"`` and the whole string tokenized, as the reference does (outcome "forced").
        """
        if think is not None:
            end = think.end
            whole = self.tokenizer.decode(tokens[:end], skip_special_tokens=False)
            before = self.tokenizer.decode(tokens[: end - 1], skip_special_tokens=False)
            piece = whole[len(before) : whole.rfind(THINK_END) + len(THINK_END)]
            return prepared.ids + tokens[: end - 1] + self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        reasoning = self.tokenizer.decode(tokens, skip_special_tokens=False)
        return self.tokenizer(forced_prompt(prepared.prompt, reasoning))["input_ids"]


def _options(kind: type, given: Any, fields: dict[str, Any], name: str) -> Any:
    """``given`` (a LoadOptions or JudgeOptions), or one made from its fields given as keywords (not both)."""
    if given is None:
        try:
            return kind(**fields)
        except TypeError as error:  # an unknown keyword
            raise TypeError(f"Rank1: {error}") from None
    if fields:
        raise Rank1Error(f"give {name}= or its fields ({', '.join(sorted(fields))}) as keywords, not both")
    return given


def best_first(scores: Sequence[float]) -> list[int]:
    """Indices of ``scores`` from best to worst, ties in input order (as CrossEncoder.rank's stable sort)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def _loaded_fingerprint(name: str | os.PathLike, model: PreTrainedModel) -> str | None:
    """The fingerprint of weights loaded by name: their files' for a local directory, the resolved
    commit for a hub checkpoint (None when unknown: the tensors are hashed on first use)."""
    if os.path.isdir(name):
        return files_fingerprint(name)
    commit = getattr(model.config, "_commit_hash", None)
    return hub_fingerprint(commit) if commit else None


def _describe(quantization: Any) -> Any:
    """A JSON-able description of a quantization setting, for the store key."""
    if quantization is None or isinstance(quantization, (str, int, float, bool)):
        return quantization
    to_dict = getattr(quantization, "to_dict", None)
    return to_dict() if callable(to_dict) else repr(quantization)
