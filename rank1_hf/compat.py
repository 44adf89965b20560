"""``rank1``: a drop-in for the official rank1 class (the vLLM one from the rank1 repository and model cards).

Scripts written against the reference keep working after changing only the import::

    from rank1_hf import rank1

    model = rank1(model_name_or_path="jhu-clsp/rank1-7b", num_gpus=1, device="cuda")
    scores = model.predict([("query", "passage"), ("query", {"title": "t", "text": "p"}, "instruction")])

Constructor parameters and their defaults are the reference's. What changes:

* ``num_gpus`` spreads the model over GPUs ``0..num_gpus-1`` with an accelerate device map (whole decoder
  layers per GPU) instead of vLLM tensor parallelism. Asking for more GPUs than are visible is an error.
* ``device="cpu"`` runs on the CPU (with ``num_gpus`` left at 1); ``device="cuda"`` without CUDA is an error
  that says so, rather than a silent fallback, because a 7B+ model on CPU is a surprise nobody wants.
* ``batch_size`` is the most pairs decoded together. The reference's default (999999999999: hand everything to
  vLLM, which then runs at most 256 sequences at once) means rank1-hf's automatic size (32 on GPU, 16 on CPU).
* Keyword arguments the reference passed on to vLLM (``gpu_memory_utilization``, ``tensor_parallel_size``,
  ``enforce_eager``, ``max_model_len``, ...) are accepted and ignored, with one warning naming them.
* ``force_rethink > 0`` is refused (see :data:`FORCE_RETHINK_MESSAGE`).
* ``store="judgements.sqlite"`` (not in the reference) keeps every judgement in a
  :class:`~rank1_hf.io.store.JudgementStore`, so a rerun after a crash judges only what is missing.
* The reasoning is kept: after :meth:`rank1.predict`, :attr:`rank1.last_judgements` holds one
  :class:`~rank1_hf.judgement.Judgement` per pair.

As in the reference, :meth:`rank1.predict` reads ``dataset_prompt`` (and ``force_rethink``, and the readout
ids ``true_token``/``false_token``) when it runs, so ``model.dataset_prompt = PROMPT_DICT[task]`` between
calls takes effect. The reference reads nothing else at call time: ``max_output_tokens``, ``context_size``
and ``batch_size`` shape its vLLM engine once, in the constructor, and here too.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .errors import Rank1Error
from .judgement import Judgement
from .options import check_count, check_dataset_prompt
from .prompt import Pair, build_prompt, query_text
from .ranker import Rank1

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["rank1", "REFERENCE_BATCH_SIZE", "MAX_BATCH_SIZE", "FORCE_RETHINK_MESSAGE"]

#: The reference's default batch_size: "everything at once".
REFERENCE_BATCH_SIZE = 999999999999
#: Largest batch used here; vLLM's own default cap on sequences decoded together (max_num_seqs).
MAX_BATCH_SIZE = 256
#: rank1-hf options (not in the reference) that pass straight through to :class:`Rank1` / loading.
PASSED_THROUGH = (
    "engine", "show_progress_bar", "kv_memory", "store", "quantization", "trust_remote_code", "revision",
)

FORCE_RETHINK_MESSAGE = (
    "force_rethink > 0 is not supported: the reference implementation's force_rethink path is broken, and the "
    "rank1 paper reports that forcing the model to keep thinking hurts quality; use force_rethink=0"
)


class rank1:  # noqa: N801 - lower-case on purpose: the reference class is called ``rank1``
    """The official rank1 reranker's interface on plain transformers (see the module docstring).

    Attributes kept from the reference: ``model_name_or_path``, ``batch_size``, ``context_size``,
    ``max_output_tokens``, ``fp_options``, ``num_gpus``, ``device``, ``dataset_prompt``, ``force_rethink``,
    ``model`` (here a transformers model), ``tokenizer``, ``true_token``, ``false_token``.
    Added: ``ranker`` (the underlying :class:`Rank1`) and ``last_judgements``.
    """

    name: str = "rank1"

    def __init__(
        self,
        model_name_or_path: str = "jhu-clsp/rank1-7b",
        batch_size: int = REFERENCE_BATCH_SIZE,
        context_size: int = 16000,
        max_output_tokens: int = 8192,
        fp_options: str = "float16",
        num_gpus: int = 1,
        device: str = "cuda",
        dataset_prompt: str | None = None,
        force_rethink: int = 0,
        *,
        loaded: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None,
        **kwargs: Any,
    ) -> None:
        """``loaded``: an already-loaded (model, tokenizer) to wrap instead of loading one (see :meth:`from_model`)."""
        passed, ignored = _split_kwargs(kwargs)
        options = _judging_options(batch_size, context_size, max_output_tokens, dataset_prompt, force_rethink, passed)
        _warn_ignored(ignored)
        if loaded is None:
            device_map, max_memory = placement(device, num_gpus)
            loading = {k: passed[k] for k in ("quantization", "trust_remote_code", "revision") if k in passed}
            ranker = Rank1(
                model_name_or_path, dtype=fp_options, device_map=device_map, max_memory=max_memory, **loading, **options
            )
        else:
            ranker = Rank1.from_model(*loaded, **options)
        self.ranker = ranker
        self.model_name_or_path = model_name_or_path or ranker.load_options["model"]
        self.batch_size = batch_size
        self.context_size = context_size
        self.max_output_tokens = max_output_tokens
        self.fp_options = fp_options
        self.num_gpus = num_gpus
        self.device = device
        self.dataset_prompt = dataset_prompt
        self.force_rethink = force_rethink
        self.model = ranker.model
        self.tokenizer = ranker.tokenizer
        self.true_token, self.false_token = ranker.readout
        self.last_judgements: list[Judgement] = []
        self._mteb_meta: Any = None

    @classmethod
    def from_model(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        model_name_or_path: str | None = None,
        **params: Any,
    ) -> "rank1":
        """Wrap an already-loaded model and tokenizer, with the constructor's parameters.

        The loading parameters (``fp_options``, ``num_gpus``, ``device``, ``quantization``, ...) are kept as
        attributes but change nothing: the model is used where and as it is.
        """
        return cls(model_name_or_path, loaded=(model, tokenizer), **params)

    # ---- the reference's methods ---------------------------------------------------------------------

    def return_prompt(self, query: str, doc_content: str, prompt: str | None = None) -> str:
        """The exact model input for a query and passage text; ``prompt`` is a dataset template with
        ``FILL_QUERY_HERE`` (the reference's third argument)."""
        return build_prompt(query_text(query, None, prompt), doc_content)

    def predict(self, input_to_rerank: Sequence[Pair] | None = None, *, inputs1: Any = None,
                inputs2: Any = None, **kwargs: Any) -> Any:
        """Score pairs; returns a list of floats in input order (the reference's contract).

        input_to_rerank: (query, passage) or (query, passage, instruction) tuples; a passage may be a
            ``{"title", "text"}`` dict. The instruction is appended to the query (unless equal to it).
        kwargs: ``show_progress_bar`` is honoured; the rest (what mteb 1.x passed) is ignored.

        Called by mteb 2.x as a cross-encoder (``inputs1=``/``inputs2=`` dataloaders), it returns a numpy
        array instead, so ``mteb.evaluate(rank1(...), tasks)`` works too (see :mod:`rank1_hf.mteb`). Then,
        as the official ``run_mteb.py`` passes ``get_prompt(task, subset)`` as the dataset prompt, each
        task's queries get the official prompt of its name and subset (``task_metadata``, ``hf_subset``),
        exactly as :class:`~rank1_hf.mteb.Rank1CrossEncoder` gives them; a ``dataset_prompt`` set on this
        object (in the constructor or later) is used for every task instead.
        """
        show = kwargs.get("show_progress_bar")
        prompt = self._call_time_prompt()
        if inputs1 is not None or inputs2 is not None:
            from .dataset_prompts import official_prompt
            from .mteb import pairs_from_loaders, scores_of

            pairs = pairs_from_loaders(inputs1, inputs2)
            task = getattr(kwargs.get("task_metadata"), "name", None)
            if prompt is None and task is not None:
                prompt = official_prompt(task, kwargs.get("hf_subset"))
            self.last_judgements = (self.ranker.judge(pairs, show_progress_bar=show, dataset_prompt=prompt)
                                    if pairs else [])
            return scores_of(self.last_judgements)
        if input_to_rerank is None:
            raise Rank1Error("predict needs a list of (query, passage[, instruction]) tuples")
        pairs = list(input_to_rerank)
        self.last_judgements = self.ranker.judge(pairs, show_progress_bar=show, dataset_prompt=prompt) if pairs else []
        return [j.score for j in self.last_judgements]

    def _call_time_prompt(self) -> str | None:
        """The dataset prompt as the reference's ``predict`` reads it: ``self.dataset_prompt`` now (an empty
        one means none); refuses the other attributes it reads at call time when they changed to values
        this class cannot honour."""
        if self.force_rethink:
            raise Rank1Error(FORCE_RETHINK_MESSAGE)
        if (self.true_token, self.false_token) != tuple(self.ranker.readout):
            raise Rank1Error(
                f"true_token/false_token are the readout ids of the loaded tokenizer {tuple(self.ranker.readout)}; "
                f"rank1-hf cannot read other ids, got ({self.true_token}, {self.false_token})"
            )
        prompt = self.dataset_prompt or None
        if prompt is not None:
            check_dataset_prompt(prompt)
            query_text("q", None, prompt)  # a template without the placeholder is a clear error
        return prompt

    # ---- extras --------------------------------------------------------------------------------------

    @property
    def last_reasoning(self) -> list[str]:
        """The reasoning text of each pair of the last :meth:`predict` call (the reference discarded it)."""
        return [j.reasoning for j in self.last_judgements]

    @property
    def mteb_model_meta(self) -> Any:
        """mteb 2.x metadata, so that this object can be handed to ``mteb.evaluate`` (needs mteb)."""
        if self._mteb_meta is None:
            from .mteb import meta_for

            self._mteb_meta = meta_for(self.model_name_or_path)
        return self._mteb_meta

    @mteb_model_meta.setter
    def mteb_model_meta(self, value: Any) -> None:
        self._mteb_meta = value  # mteb's ModelMeta.load_model sets it on the models it loads

    def __repr__(self) -> str:
        return f"rank1({self.model_name_or_path!r}, device={self.device!r}, num_gpus={self.num_gpus})"


# ---- helpers -------------------------------------------------------------------------------------------


def placement(device: str | None, num_gpus: int) -> tuple[str, dict[int, Any] | None]:
    """``(device_map, max_memory)`` for the reference's ``device``/``num_gpus``.

    cpu: the whole model on the CPU (``num_gpus`` must stay 1, or 0). cuda with one GPU: the whole model on
    it (``"cuda"`` means GPU 0, ``"cuda:N"`` GPU N). cuda with several: ``device_map="auto"`` (transformers
    balances whole decoder layers) limited to GPUs 0..num_gpus-1 and their free memory. None: cuda when
    available, else cpu.
    """
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus < 0:
        raise Rank1Error(f"num_gpus must be a whole number >= 0, got {num_gpus!r}")
    if device is None:  # not the reference's default, but an obvious meaning
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError):
        raise Rank1Error(f"bad device {device!r}; use 'cuda', 'cuda:N' or 'cpu'") from None
    if where.type != "cuda":
        if num_gpus > 1:
            raise Rank1Error(
                f"num_gpus={num_gpus} with device={device!r}: a {where.type} run uses no GPUs; "
                f"leave num_gpus=1 or pass device='cuda'"
            )
        return str(where), None
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    wanted = max(num_gpus, 1) + (where.index or 0)
    if wanted > visible:
        hint = ("CUDA is not available here; pass device='cpu' to run on the CPU" if visible == 0
                else "lower num_gpus or check CUDA_VISIBLE_DEVICES")
        raise Rank1Error(
            f"num_gpus={num_gpus} with device={device!r} needs {wanted} GPU(s) but {visible} are visible: {hint}"
        )
    if num_gpus <= 1:
        return f"cuda:{where.index or 0}", None
    if where.index not in (None, 0):
        raise Rank1Error(f"num_gpus={num_gpus} uses GPUs 0..{num_gpus - 1}; pass device='cuda', not {device!r}")
    from accelerate.utils import get_max_memory

    free = get_max_memory()  # bytes free now, per device
    return "auto", {i: free[i] for i in range(num_gpus)}


def _split_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(rank1-hf options to use, names of the reference/vLLM keyword arguments to ignore)."""
    passed = {k: v for k, v in kwargs.items() if k in PASSED_THROUGH}
    return passed, sorted(k for k in kwargs if k not in PASSED_THROUGH)


def _warn_ignored(names: list[str]) -> None:
    if names:
        warnings.warn(
            f"rank1: ignoring {', '.join(names)} (vLLM settings of the reference implementation; "
            f"rank1-hf runs on transformers)",
            UserWarning,
            stacklevel=3,
        )


def _judging_options(batch_size: int, context_size: int, max_output_tokens: int, dataset_prompt: str | None,
                     force_rethink: int, passed: dict[str, Any]) -> dict[str, Any]:
    """Rank1 judging options from the reference's parameters (validated here, before any loading).

    The dataset prompt is checked but not passed on: :meth:`rank1.predict` reads ``self.dataset_prompt`` at
    each call, as the reference does, so the ranker keeps none of its own."""
    if force_rethink:
        raise Rank1Error(FORCE_RETHINK_MESSAGE)
    check_count("batch_size", batch_size, optional=False)
    if dataset_prompt is not None:
        query_text("q", None, dataset_prompt)  # raises early when the placeholder is missing
    options = {
        # None = Rank1's automatic size; the reference's "everything at once" would exhaust memory here.
        "batch_size": None if batch_size >= REFERENCE_BATCH_SIZE else min(batch_size, MAX_BATCH_SIZE),
        "max_new_tokens": max_output_tokens,
        "context_size": context_size,
    }
    options.update({k: passed[k] for k in ("engine", "show_progress_bar", "kv_memory", "store") if k in passed})
    return options
