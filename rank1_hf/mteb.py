"""rank1 in mteb 2.x: a cross-encoder adapter and ModelMeta entries for the rank1 checkpoints.

    import mteb
    from rank1_hf.mteb import model_meta

    model = model_meta("jhu-clsp/rank1-7b").load_model()          # or Rank1CrossEncoder.from_ranker(Rank1(...))
    results = mteb.evaluate(model, mteb.get_tasks(["NevIR"]))

Like every mteb cross-encoder it reranks a task's ``top_ranked`` candidates: reranking tasks (NevIR,
FollowIR, ...) carry them; for a retrieval task, run a first-stage model with ``prediction_folder=`` and then
``task.convert_to_reranking(folder, top_k=100)``.

mteb calls :meth:`Rank1CrossEncoder.predict` with two dataloaders of equal length: queries (``query`` holds
the query alone, ``instruction`` the per-query instruction of instruction tasks, ``text`` both joined) and
documents (``title``/``body``, ``text`` both joined). The query and instruction go to rank1's own slots, so
the instruction is joined the rank1 way, and the passage is built from title and body as rank1 does.

Dataset prompts: like the official ``run_mteb.py``, the adapter wraps each task's queries in the official
prompt for the task's name and subset (``get_prompt(task, subset)``, see
:func:`rank1_hf.dataset_prompts.official_prompt`): SciFact gets the SciFact prompt, BrightRetrieval's ``pony``
subset the pony prompt and its ``biology`` subset the BrightRetrieval one, NevIR none.
``official_prompts=False`` turns that off (the official ``--skip_prompt``); ``dataset_prompts`` overrides
it per task.

mteb is imported only when used; without it every entry point raises a :class:`Rank1Error` that says how
to install it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import Rank1Error
from .judgement import Judgement
from .prompt import Pair
from .dataset_prompts import official_prompt, resolve_dataset_prompt

if TYPE_CHECKING:
    from .ranker import Rank1

__all__ = ["CHECKPOINTS", "Rank1CrossEncoder", "meta_for", "model_meta", "model_metas", "pairs_from_loaders"]

RELEASE_DATE = "2025-02-25"
CITATION = """@article{weller2025rank1,
  title={Rank1: Test-Time Compute for Reranking in Information Retrieval},
  author={Weller, Orion and Ricci, Kathryn and Yang, Eugene and Yates, Andrew and Lawrie, Dawn and Van Durme, Benjamin},
  journal={arXiv preprint arXiv:2502.18418},
  year={2025}
}"""


@dataclass(frozen=True)
class Checkpoint:
    """What mteb's ModelMeta needs to know about one rank1 checkpoint (no mteb import needed).

    n_parameters: the base model's count (AWQ variants hold the same weights, packed).
    size_gb: on-disk size from the rank1 paper, in GB (10^9 bytes); for the small checkpoints, which the
        paper's table leaves out, two bytes per parameter (bfloat16), an estimate.
    license: from the model card where it was seen ("mit" for the Qwen2.5 and Mistral ones); None for
        the Llama 3.1 derivative, whose card was not checked and whose base carries Meta's own license,
        and for the small checkpoints, whose cards were not seen (their Qwen2.5 bases differ: Apache-2.0
        for 0.5B and 1.5B, Qwen's research license for 3B).
    """

    base: str
    n_parameters: int
    size_gb: float
    license: str | None
    awq_of: str | None = None


def _family() -> dict[str, Checkpoint]:
    full = {
        "jhu-clsp/rank1-7b": Checkpoint("Qwen/Qwen2.5-7B", 7_615_616_512, 15.2, "mit"),
        "jhu-clsp/rank1-14b": Checkpoint("Qwen/Qwen2.5-14B", 14_770_033_664, 29.6, "mit"),
        "jhu-clsp/rank1-32b": Checkpoint("Qwen/Qwen2.5-32B", 32_763_876_352, 65.5, "mit"),
        "jhu-clsp/rank1-llama3-8b": Checkpoint("meta-llama/Llama-3.1-8B", 8_030_261_248, 16.1, None),
        "jhu-clsp/rank1-mistral-2501-24b": Checkpoint(
            "mistralai/Mistral-Small-24B-Base-2501", 23_572_403_200, 47.2, "mit"
        ),
    }
    awq_gb = {"7b": 5.6, "14b": 10.0, "32b": 19.3, "llama3-8b": 5.8, "mistral-2501-24b": 14.3}
    family = dict(full)
    for name, c in full.items():
        short = name.removeprefix("jhu-clsp/rank1-")
        family[f"{name}-awq"] = Checkpoint(c.base, c.n_parameters, awq_gb[short], c.license, awq_of=name)
    # The small checkpoints of the paper's later version. Unverified here (no hub access): the base
    # (Qwen2.5 base, not Instruct), the release date and the size. The counts are the Qwen2.5 bases'
    # (embeddings tied), computed from their configs: hidden 896/1536/2048, layers 24/28/36.
    for size, n in (("0.5b", 494_032_768), ("1.5b", 1_543_714_304), ("3b", 3_085_938_688)):
        family[f"jhu-clsp/rank1-{size}"] = Checkpoint(f"Qwen/Qwen2.5-{size.upper()}", n, round(2 * n / 1e9, 1), None)
    return family


#: The rank1 checkpoints this module describes, by Hugging Face id.
CHECKPOINTS: dict[str, Checkpoint] = _family()


#: The oldest mteb whose ModelMeta takes the fields used here: ``model_type`` arrived in 2.5.2 and the
#: "Transformers" framework value in 2.6.5, and ModelMeta forbids unknown fields and values.
MTEB_FLOOR = (2, 6, 5)


def _mteb() -> Any:
    """The mteb module, or a Rank1Error that says how to get it."""
    hint = "pip install 'rank1-hf[mteb]'"
    try:
        import mteb
    except ImportError:
        raise Rank1Error(f"the mteb adapter needs mteb 2.x: {hint}") from None
    version = getattr(mteb, "__version__", "0")
    found = tuple(int(part) if part.isdigit() else 0 for part in version.split(".")[:3])
    if found < MTEB_FLOOR:
        floor = ".".join(map(str, MTEB_FLOOR))
        raise Rank1Error(f"the mteb adapter needs mteb>={floor} (found {version}): {hint}")
    return mteb


# ---- the adapter ---------------------------------------------------------------------------------------


class Rank1CrossEncoder:
    """mteb 2.x ``CrossEncoderProtocol`` over :class:`~rank1_hf.ranker.Rank1`.

    Built by mteb from a ModelMeta (``loader(model_name, revision=..., device=..., **loader_kwargs)``) or
    around an existing ranker with :meth:`from_ranker`.

    Args:
        model_name: a rank1 checkpoint id or a local directory.
        revision: hub revision.
        device: where the whole model goes (``"cuda:0"``, ``"cpu"``); None = GPU 0 when there is one. For
            several GPUs pass ``device_map="auto"`` (and ``max_memory``) instead.
        dataset_prompts: per-task overrides of the official prompts: key ``"{task}_{subset}"`` or ``"{task}"``
            (the subset's key first, as the official ``get_prompt`` looks them up), value a template with
            ``FILL_QUERY_HERE``, a prompt name from :mod:`rank1_hf.dataset_prompts`, or None for no prompt.
        official_prompts: wrap queries in the official prompt of each task and subset (the default, as the
            official runner does); False runs every task without one, like its ``--skip_prompt``.
        options: anything else :class:`Rank1` takes (``dtype``, ``max_new_tokens``, ``batch_size``,
            ``engine``, ``device_map``, ...).

    mteb's own ``batch_size`` encode argument sizes its dataloaders for encoders; it is ignored here (the
    ranker's ``batch_size`` decides how many pairs decode together).

    A ranker built with its own ``dataset_prompt`` uses that one prompt for every task; per-task prompts
    then cannot be given too.
    """

    def __init__(
        self,
        model_name: str | Rank1,
        revision: str | None = None,
        device: str | None = None,
        *,
        dataset_prompts: Mapping[str, str | None] | None = None,
        official_prompts: bool = True,
        meta: Any = None,
        **options: Any,
    ) -> None:
        _mteb()
        from .ranker import Rank1

        if isinstance(model_name, Rank1):  # a ready ranker (from_ranker): nothing to load
            if revision is not None or device is not None or options:
                raise Rank1Error("a ready Rank1 takes no loading or judging options; set them on the Rank1")
            ranker = model_name
        else:
            if device is not None:
                if "device_map" in options:
                    raise Rank1Error("pass either device or device_map, not both")
                options["device_map"] = device
            ranker = Rank1(model_name, revision=revision, **options)
        if dataset_prompts and ranker.dataset_prompt is not None:
            raise Rank1Error(
                "the ranker has its own dataset_prompt, used for every task: give per-task prompts in "
                "dataset_prompts or one prompt in the ranker, not both"
            )
        self.ranker = ranker
        # names resolve now, so a bad one fails before any task runs
        self.dataset_prompts = {task: resolve_dataset_prompt(v) for task, v in (dataset_prompts or {}).items()}
        self.official_prompts = official_prompts
        self.mteb_model_meta = meta if meta is not None else meta_for(ranker.load_options["model"])
        self.last_judgements: list[Judgement] = []

    @classmethod
    def from_ranker(
        cls,
        ranker: Rank1,
        dataset_prompts: Mapping[str, str | None] | None = None,
        meta: Any = None,
        official_prompts: bool = True,
    ) -> "Rank1CrossEncoder":
        """Wrap a ready :class:`Rank1`; ``meta`` defaults to :func:`meta_for` of its model name."""
        return cls(ranker, dataset_prompts=dataset_prompts, meta=meta, official_prompts=official_prompts)

    def predict(
        self,
        inputs1: Any,
        inputs2: Any,
        *,
        task_metadata: Any,
        hf_split: str,
        hf_subset: str,
        prompt_type: Any = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Scores for the pairs (inputs1[i], inputs2[i]), float32 in [0, 1]; judgements in ``last_judgements``."""
        pairs = pairs_from_loaders(inputs1, inputs2)
        template = None  # a ranker with its own prompt applies it to every task
        if self.ranker.dataset_prompt is None:
            template = self.prompt_for(getattr(task_metadata, "name", None), hf_subset)
        self.last_judgements = self.ranker.judge(pairs, show_progress_bar=kwargs.get("show_progress_bar"),
                                                 dataset_prompt=template)
        return scores_of(self.last_judgements)

    def prompt_for(self, task: str | None, subset: str | None) -> str | None:
        """The template for a task's subset: the override for ``"{task}_{subset}"`` or ``"{task}"`` if given,
        else the official prompt (when ``official_prompts``), else None."""
        for key in ([f"{task}_{subset}"] if subset else []) + [task]:
            if key in self.dataset_prompts:
                return self.dataset_prompts[key]
        return official_prompt(task, subset) if self.official_prompts and task is not None else None

    def __repr__(self) -> str:
        return f"Rank1CrossEncoder({self.ranker.load_options['model']!r})"


def pairs_from_loaders(inputs1: Iterable[Mapping[str, Any]], inputs2: Iterable[Mapping[str, Any]]) -> list[Pair]:
    """rank1 pairs ``(query, {"title", "text"}, instruction)`` from mteb's query and document dataloaders."""
    queries: list[tuple[str, str | None]] = []
    for batch in inputs1:
        # "query" is the query alone when mteb also sent an instruction; "text" then has both joined.
        texts = batch["query"] if "query" in batch else batch["text"]
        instructions = batch["instruction"] if "instruction" in batch and "query" in batch else [None] * len(texts)
        queries.extend(zip(texts, instructions))
    passages: list[dict[str, Any]] = []
    for batch in inputs2:
        bodies = batch["body"] if "body" in batch else batch["text"]
        if "title" in batch:  # a BEIR corpus: a title field, often empty (the passage is then " body")
            passages.extend({"title": t, "text": b} for t, b in zip(batch["title"], bodies))
        else:  # no title field (BRIGHT): the body alone
            passages.extend({"text": b} for b in bodies)
    if len(queries) != len(passages):
        raise Rank1Error(f"mteb sent {len(queries)} queries but {len(passages)} documents; they must pair up")
    return [(q, p, i) for (q, i), p in zip(queries, passages)]


def scores_of(judgements: list[Judgement]) -> np.ndarray:
    return np.array([j.score for j in judgements], dtype=np.float32)


# ---- ModelMeta -----------------------------------------------------------------------------------------


def _is_hub_id(name: str) -> bool:
    """``org/model`` that is not a path on this machine."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and not os.path.exists(name)



def model_meta(name: str = "jhu-clsp/rank1-7b") -> Any:
    """The mteb ``ModelMeta`` of a rank1 checkpoint (see :data:`CHECKPOINTS`); its loader builds the adapter."""
    if name not in CHECKPOINTS:
        raise Rank1Error(f"unknown rank1 checkpoint {name!r}; known: {', '.join(CHECKPOINTS)}")
    c = CHECKPOINTS[name]
    _mteb()
    from mteb.models import ModelMeta

    return ModelMeta(
        loader=Rank1CrossEncoder,
        # AWQ checkpoints compute in float16; the others load as rank1_hf chooses (bf16 on GPU).
        loader_kwargs={"dtype": "float16"} if c.awq_of else {},
        name=name,
        revision=None,
        release_date=RELEASE_DATE,
        languages=["eng-Latn"],
        n_parameters=c.n_parameters,
        memory_usage_mb=round(c.size_gb * 1e9 / 2**20),
        max_tokens=None,  # the reference caps prompt + reasoning at 16000 tokens; the models' own limit is unchecked
        embed_dim=None,
        license=c.license,
        open_weights=True,
        public_training_code="https://github.com/orionw/rank1",
        public_training_data="https://huggingface.co/datasets/jhu-clsp/rank1-training-data",
        framework=["PyTorch", "Transformers"],
        reference=f"https://huggingface.co/{name}",
        similarity_fn_name=None,
        use_instructions=True,
        training_datasets={"MSMARCO"},  # reasoning traces distilled from R1 on MS MARCO
        adapted_from=c.awq_of or c.base,
        modalities=["text"],
        model_type=["cross-encoder"],
        citation=CITATION,
    )


def model_metas() -> dict[str, Any]:
    """Every rank1 checkpoint's ModelMeta, by name."""
    return {name: model_meta(name) for name in CHECKPOINTS}


def meta_for(model_name_or_path: str) -> Any:
    """The ModelMeta for a ranker's model: the known entry for a rank1 id, else a minimal one.

    mteb names result folders after ``meta.name``, which must look like ``org/model``: another hub id
    (a fine-tune, a mirror) is kept as it is; a local directory becomes ``rank1-hf/<directory name>``.
    """
    if model_name_or_path in CHECKPOINTS:
        return model_meta(model_name_or_path)
    name = str(model_name_or_path)
    if not _is_hub_id(name):
        name = "rank1-hf/" + (os.path.basename(os.path.normpath(name)) or "model")
    meta = model_meta("jhu-clsp/rank1-7b")
    return meta.model_copy(
        update={
            "name": name,
            "loader": None,
            "loader_kwargs": {},
            "n_parameters": None,
            "memory_usage_mb": None,
            "license": None,
            "reference": None,
            "adapted_from": None,
            "release_date": None,
        }
    )
