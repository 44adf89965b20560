"""``Rank1``: score (query, passage) pairs with a rank1 model, as the reference implementation does.

A judgement goes through four steps, each in its own module:

1. prompt: the exact rank1 string, tokenized with the tokenizer's own special-token rule
   (passage-only truncation when prompt + max_new_tokens would not fit the context);
2. engine: greedy reasoning until ``</think>``, many prompts at once;
3. readout: the " true"/" false" logits right after ``</think>`` (from the engine's next step when the
   model closed it itself, from a forced pass on the cut reasoning otherwise);
4. scoring: the softmax over those two logits.

With ``store=``, :meth:`Rank1.judge` (and so :meth:`~Rank1.predict`, :meth:`~Rank1.rank`, the mteb
adapter and the drop-in ``rank1`` class) looks every pair up in a :class:`~rank1_hf.io.store.JudgementStore`
first, keyed as the CLI keys it, and commits each new judgement as soon as it is made.

The judging itself (prompts, the shared engine, judgements) is :mod:`rank1_hf.judging`'s; this module is
the public face: constructors, the store key, and the CrossEncoder-style calls with their async twins.

What happens is logged to ``logging.getLogger("rank1_hf")``: the engine used, store reuse, passages cut
to fit the context, unfinished reasoning, out-of-memory retries.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .io import reuse
from .engine.types import EngineStats
from .errors import Rank1Error
from .model.fingerprint import files_fingerprint, hub_fingerprint, tensors_fingerprint
from .engine.head import prepack_head
from .judgement import Judgement
from .judging import Judge, Judging, Prepared
from .options import JudgeOptions, LoadOptions, check_count, check_dataset_prompt
from .prompt import Pair, Passage, build_prompt
from .io.store import JudgementStore

logger = logging.getLogger(__name__)

__all__ = ["Rank1", "Judged", "Judging", "Prepared", "best_first"]


@dataclass(frozen=True)
class Judged:
    """What :meth:`Rank1.judge_with_stats` returns: one judgement per pair, in input order, the
    :class:`~rank1_hf.engine.types.EngineStats` of the pairs this call judged (stored ones cost nothing),
    and how many pairs came from the store or from an identical pair earlier in the call."""

    judgements: list[Judgement]
    stats: EngineStats
    reused: int = 0


class Rank1:
    """A rank1 reranker on plain transformers.

    >>> ranker = Rank1("jhu-clsp/rank1-7b")
    >>> js = ranker.judge([("what is a cat", "Cats are small felines.")])
    >>> js[0].score, js[0].outcome
    (0.97..., 'answered')

    Options come as :class:`~rank1_hf.options.LoadOptions` (``load=``) and
    :class:`~rank1_hf.options.JudgeOptions` (``judge=``), or as their fields given as keywords
    (``dtype=..., max_new_tokens=...``), not both; see those classes and :meth:`from_model`.

    One ranker serves any number of callers at once: threads calling :meth:`judge`, :meth:`predict` or
    :meth:`rank`, and asyncio tasks awaiting :meth:`ajudge`, :meth:`apredict` or :meth:`arank`. Their
    pairs share the decode steps of one long-lived engine (its cache, and on a GPU its captured steps,
    are made once), and each caller gets exactly the judgements of its own pairs. :meth:`close` (or
    ``with Rank1(...) as ranker:``) frees the engine.
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
        from .model.loading import load_model

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
            (:mod:`rank1_hf.model.fingerprint`, computed on first use), so different weights never share
            judgements, whatever their names.

        judge: the judging options as one :class:`~rank1_hf.options.JudgeOptions` (checked there), or
            its fields as keywords:
            max_new_tokens: reasoning cap, 8192 as the reference.
            context_size: prompt + max_new_tokens must fit in it (16000 as the reference); longer passages
                are cut (only the passage, never the template's tail) and flagged ``truncated``.
            batch_size: most pairs decoded together, all callers together (default 32 on GPU, 16 on CPU).
            kv_memory: bytes for the keys and values of the pairs in flight (an int, or "12GiB"); see
                :class:`~rank1_hf.options.JudgeOptions`.
            dataset_prompt: a template with ``FILL_QUERY_HERE`` applied to every query.
            engine: "continuous" (rows leave and join the batch as they finish), "generate"
                (``model.generate`` with a StoppingCriteria), or "auto" (continuous where the model's
                cache allows it).
            speculate: "prompt-lookup" (the continuous engine guesses each pair's next tokens from its own
                prompt and reasoning and verifies them in one step: same judgements, fewer steps when the
                reasoning quotes the passage), "off", or "auto" (the default: prompt lookup where decode
                steps run eager; off on one GPU, whose plain steps are captured CUDA graphs).
            show_progress_bar: None shows one when stderr is a terminal.
            store: a :class:`~rank1_hf.io.store.JudgementStore` or the path of one (created if missing):
                :meth:`judge` reuses the judgements stored for these settings and stores new ones as
                they finish, so a restarted job or service judges only what is missing.

        Several rankers may wrap the same model (another engine, other options): each has its own engine.
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
        self.core = Judge(model, tokenizer, judge)
        self.show_progress_bar = show_progress_bar
        self.load_options = load
        self.store = store if isinstance(store, JudgementStore) or store is None else JudgementStore(store)
        self._weights: str | None = None  # the weights' fingerprint, computed on first use (settings())

    # ---- options, read-only: they shape the engine, which lives as long as the ranker -----------------

    @property
    def options(self) -> JudgeOptions:
        """The judging options, ``batch_size`` resolved."""
        return self.core.options

    max_new_tokens = property(lambda self: self.options.max_new_tokens)
    context_size = property(lambda self: self.options.context_size)
    batch_size = property(lambda self: self.options.batch_size)
    kv_memory = property(lambda self: self.options.kv_memory, doc="The KV pool asked for (None: the default).")
    dataset_prompt = property(lambda self: self.options.dataset_prompt)
    engine = property(lambda self: self.options.engine, doc="The engine asked for (see ``core.kind``).")
    speculate = property(lambda self: self.options.speculate, doc="Speculative decoding: 'auto', 'prompt-lookup' or 'off'.")
    readout = property(lambda self: self.core.readout, doc='The ids of " true" and " false".')

    def prepare(self, query: str, passage: str) -> Prepared:
        """Prompt and token ids for one (joined query, passage text); see :meth:`Judge.prepare`."""
        return self.core.prepare(query, passage)

    def settings(self, dataset_prompt: str | None = None) -> dict[str, Any]:
        """Everything that determines a judgement besides the pair: the key of the judgement store.

        ``weights`` is the fingerprint of the weights (:mod:`rank1_hf.model.fingerprint`): the resolved commit
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

    # ---- the engine's life -----------------------------------------------------------------------------

    def warmup(self) -> "Rank1":
        """Make the engine now rather than on the first call: its KV pool and, on a GPU, every captured
        decode step."""
        self.core.warmup()
        return self

    def close(self) -> None:
        """Free the engine, its cache and captured steps; a later call makes a new one."""
        self.core.close()

    # ---- tensor parallel (load option tensor_parallel=True, under torchrun) ---------------------------

    @property
    def is_follower(self) -> bool:
        """Under tensor parallel, a process other than the leader (RANK 0): it calls :meth:`follow`, and
        only the leader judges. False otherwise."""
        return self.core.is_follower

    def follow(self) -> tuple[str, ...]:
        """Follower: run the leader's engine calls (every forward call is collective) until the leader's
        ranker is closed; returns the leader's last message (``("stop",)``, or ``("end",)`` at its exit)::

            ranker = Rank1(path, tensor_parallel=True)   # in every process of torchrun --nproc-per-node N
            if ranker.is_follower:
                ranker.follow()
            else:
                with ranker:
                    judgements = ranker.judge(pairs)
        """
        return self.core.follow()

    def __enter__(self) -> "Rank1":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- judging -------------------------------------------------------------------------------------

    def judge(
        self, pairs: Sequence[Pair], batch_size: int | None = None, show_progress_bar: bool | None = None,
        *, dataset_prompt: str | None = None,
    ) -> list[Judgement]:
        """Judge pairs; results in input order (reusing the store, when there is one).

        pairs: (query, passage) or (query, passage, instruction) tuples; a passage is a string or a
            ``{"title", "text"}`` dict.
        batch_size: at most this many of this call's pairs decode at once (its share of the engine); the
            ranker's ``batch_size`` bounds every caller together. Default: no share of its own.
        dataset_prompt: this call's template with ``FILL_QUERY_HERE`` (default: the ranker's own).
        Returns: one :class:`Judgement` per pair.
        """
        return self.judge_with_stats(pairs, batch_size, show_progress_bar, dataset_prompt=dataset_prompt).judgements

    def judge_with_stats(
        self, pairs: Sequence[Pair], batch_size: int | None = None, show_progress_bar: bool | None = None,
        *, dataset_prompt: str | None = None,
    ) -> Judged:
        """:meth:`judge`, with the engine's counts of this call's work (see :class:`Judged`)."""
        pairs = _check_call(pairs, batch_size, dataset_prompt)
        prompt = self._dataset_prompt(dataset_prompt)
        if self.store is None:
            out: list[Judgement | None] = [None] * len(pairs)
            judging = self.judge_iter(pairs, batch_size=batch_size, show_progress_bar=show_progress_bar,
                                      dataset_prompt=prompt)
            for i, judgement in judging:
                out[i] = judgement
            return Judged(out, judging.stats)  # type: ignore[arg-type]
        planned, skey, out, todo = self._stored(pairs, prompt)
        reused = len(pairs) - len(todo)
        if not todo:
            return Judged(self._spread(planned, out), EngineStats(), reused)
        judging = self.judge_iter([pairs[i] for i in todo], batch_size=batch_size,
                                  show_progress_bar=show_progress_bar, dataset_prompt=prompt)
        writer = reuse.Writer(self.store, skey)  # one commit per judgement: a kill -9 loses only those in flight
        for n, judgement in judging:
            writer.add(planned.keys[todo[n]], judgement)
            out[todo[n]] = judgement
        return Judged(self._spread(planned, out), judging.stats, reused)

    async def ajudge(
        self, pairs: Sequence[Pair], batch_size: int | None = None, show_progress_bar: bool | None = None,
        *, dataset_prompt: str | None = None,
    ) -> list[Judgement]:
        """:meth:`judge` for asyncio: the task waits without blocking its event loop, and cancelling it
        frees its pairs that have not started. ``show_progress_bar`` is accepted and ignored."""
        return (await self.ajudge_with_stats(pairs, batch_size, dataset_prompt=dataset_prompt)).judgements

    async def ajudge_with_stats(
        self, pairs: Sequence[Pair], batch_size: int | None = None, *, dataset_prompt: str | None = None,
    ) -> Judged:
        """:meth:`judge_with_stats` for asyncio (see :meth:`ajudge`); with a store, each new judgement is
        committed as it is made."""
        pairs = _check_call(pairs, batch_size, dataset_prompt)
        prompt = self._dataset_prompt(dataset_prompt)
        if self.store is None:
            out: list[Judgement | None] = [None] * len(pairs)
            judging = self.core.aiterate(pairs, prompt, batch_size)
            async for i, judgement in judging:
                out[i] = judgement
            return Judged(out, judging.stats)  # type: ignore[arg-type]
        planned, skey, out, todo = await asyncio.to_thread(self._stored, pairs, prompt)
        reused = len(pairs) - len(todo)
        if not todo:
            return Judged(self._spread(planned, out), EngineStats(), reused)
        judging = self.core.aiterate([pairs[i] for i in todo], prompt, batch_size)
        writer = reuse.Writer(self.store, skey)
        async for n, judgement in judging:
            await asyncio.to_thread(writer.add, planned.keys[todo[n]], judgement)
            out[todo[n]] = judgement
        return Judged(self._spread(planned, out), judging.stats, reused)

    def judge_iter(
        self, pairs: Iterable[Pair], batch_size: int | None = None, show_progress_bar: bool | None = None,
        *, dataset_prompt: str | None = None,
    ) -> Judging:
        """(input index, judgement) as each pair finishes, in whatever order they finish (no store).

        ``pairs`` may be any iterable, also one that produces pairs while judging runs (a stream): pairs
        are prepared as the engine takes them, so memory follows the pairs in flight. A sized sequence is
        fed shortest prompt first, which keeps prefill batches tight. The returned :class:`Judging`
        carries this call's engine counts in ``stats``; closing it early frees the pairs not yet started.
        """
        if isinstance(pairs, Sequence):
            pairs = _check_call(pairs, batch_size, dataset_prompt)
        else:
            _check_call([], batch_size, dataset_prompt)
        show = self.show_progress_bar if show_progress_bar is None else show_progress_bar
        return self.core.iterate(pairs, self._dataset_prompt(dataset_prompt), show, batch_size)

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
        single, pairs = _sentences(sentences)
        judgements = self.judge(pairs, batch_size=batch_size, show_progress_bar=show_progress_bar, dataset_prompt=dataset_prompt)
        return _scores_out(judgements, activation_fn, convert_to_numpy, convert_to_tensor, single)

    async def apredict(
        self, sentences: Pair | Sequence[Pair], batch_size: int | None = None,
        show_progress_bar: bool | None = None, activation_fn: Callable | None = None,
        apply_softmax: bool | None = False, convert_to_numpy: bool = True, convert_to_tensor: bool = False,
        *, dataset_prompt: str | None = None,
    ) -> Any:
        """:meth:`predict` for asyncio (see :meth:`ajudge`)."""
        single, pairs = _sentences(sentences)
        judgements = await self.ajudge(pairs, batch_size=batch_size, dataset_prompt=dataset_prompt)
        return _scores_out(judgements, activation_fn, convert_to_numpy, convert_to_tensor, single)

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
        check_count("top_k", top_k)
        pairs = [(query, doc, instruction) for doc in _documents(documents)]
        judgements = self.judge(pairs, batch_size=batch_size, show_progress_bar=show_progress_bar, dataset_prompt=dataset_prompt)
        return _hits(documents, judgements, activation_fn, top_k, return_documents)

    async def arank(
        self, query: str, documents: Sequence[Passage], top_k: int | None = None, return_documents: bool = False,
        batch_size: int | None = None, show_progress_bar: bool | None = None,
        activation_fn: Callable | None = None, apply_softmax: bool | None = False,
        convert_to_numpy: bool = True, convert_to_tensor: bool = False,
        *, instruction: str | None = None, dataset_prompt: str | None = None,
    ) -> list[dict[str, Any]]:
        """:meth:`rank` for asyncio (see :meth:`ajudge`)."""
        check_count("top_k", top_k)
        pairs = [(query, doc, instruction) for doc in _documents(documents)]
        judgements = await self.ajudge(pairs, batch_size=batch_size, dataset_prompt=dataset_prompt)
        return _hits(documents, judgements, activation_fn, top_k, return_documents)

    # ---- internals -----------------------------------------------------------------------------------

    def _dataset_prompt(self, given: str | None) -> str | None:
        """A call's dataset prompt: its own when given, else the ranker's."""
        return self.dataset_prompt if given is None else given

    def _stored(self, pairs: Sequence[Pair], dataset_prompt: str | None
                ) -> tuple[reuse.Reuse, str, list[Judgement | None], list[int]]:
        """The store's view of a call: its plan, the settings key, the judgements found (at the first
        index of their key, None elsewhere) and the input indices left to judge."""
        assert self.store is not None
        skey = self.store.register_settings(self.settings(dataset_prompt))
        planned = reuse.plan(reuse.pair_keys(pairs, dataset_prompt), [self.store], skey)
        reused = sum(key in planned.found for key in planned.keys)
        if reused:
            logger.info("judgement store %s: %d of %d pairs reused", self.store.path, reused, len(pairs))
        out: list[Judgement | None] = [None] * len(pairs)
        for key, judgement in reuse.fetch([self.store], skey, planned.found).items():
            out[planned.first[key]] = judgement
        return planned, skey, out, [planned.first[key] for key in planned.todo]

    @staticmethod
    def _spread(planned: reuse.Reuse, out: list[Judgement | None]) -> list[Judgement]:
        """Each pair's judgement, from the first pair with the same key (identical texts judged once)."""
        return [out[planned.first[key]] for key in planned.keys]  # type: ignore[misc]


def _check_call(pairs: Any, batch_size: Any, dataset_prompt: Any) -> Sequence[Pair]:
    """A call's own arguments, checked with the options' rules (Rank1Error names the argument)."""
    check_count("batch_size", batch_size)
    check_dataset_prompt(dataset_prompt)
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise Rank1Error(f"pairs must be a list of (query, passage[, instruction]) tuples, got {type(pairs).__name__}")
    return pairs


def _sentences(sentences: Any) -> tuple[bool, Sequence[Pair]]:
    """(one pair given?, the pairs) of predict's ``sentences``."""
    single = isinstance(sentences, (list, tuple)) and len(sentences) > 0 and isinstance(sentences[0], str)
    return single, [sentences] if single else sentences


def _documents(documents: Any) -> Sequence[Passage]:
    if isinstance(documents, (str, bytes)) or not isinstance(documents, Sequence):
        raise Rank1Error(f"documents must be a list of passages, got {type(documents).__name__}")
    return documents


def _values(judgements: Sequence[Judgement], activation_fn: Callable | None) -> torch.Tensor:
    """float64 scores, or ``activation_fn`` of the true-false margins (0 for a fallback)."""
    if activation_fn is None:
        return torch.tensor([j.score for j in judgements], dtype=torch.float64)
    margins = [j.margin for j in judgements]
    return torch.as_tensor(activation_fn(torch.tensor(margins, dtype=torch.float64)), dtype=torch.float64)


def _scores_out(judgements: Sequence[Judgement], activation_fn: Callable | None, convert_to_numpy: bool,
                convert_to_tensor: bool, single: bool) -> Any:
    values = _values(judgements, activation_fn).float()
    out: Any = values if convert_to_tensor else values.numpy() if convert_to_numpy else list(values)
    return out[0] if single else out


def _hits(documents: Sequence[Passage], judgements: Sequence[Judgement], activation_fn: Callable | None,
          top_k: int | None, return_documents: bool) -> list[dict[str, Any]]:
    scores = _values(judgements, activation_fn).tolist()
    hits = []
    for i in best_first(scores)[:top_k]:
        hit: dict[str, Any] = {"corpus_id": i, "score": scores[i]}
        if return_documents:
            hit["text"] = documents[i]
        hits.append(hit)
    return hits


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
