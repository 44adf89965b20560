"""Compare two variants of a rank1 model (e.g. float vs bnb-8bit, bfloat16 vs AWQ) on the same pairs.

Both variants judge the same first-stage pairs through the rerank pipeline (:mod:`rank1_hf.pipeline`)
and the same resumable :class:`~rank1_hf.io.store.JudgementStore`, each under its own settings key. So a
comparison reuses the judgements of an earlier ``rank1-hf rerank`` with the same store and settings,
and an interrupted comparison resumes where it stopped.

The report (:func:`~rank1_hf.comparison.report.build_report`, written by :func:`~rank1_hf.comparison.report.write_report`) holds:

* per pair: score difference B - A, outcome agreement, reasoning-length difference, identical chains;
* per query: Kendall tau-b and Spearman correlation of A's and B's scores of the query's candidates,
  and the overlap of their top 10;
* with qrels: the measures of the first-stage top-k, A and B, and a paired randomization test of A vs B
  on nDCG@10 over queries (:func:`paired_randomization_test`);
* cost of each variant: pairs/s and generated tokens/s while judging, load time, peak memory;
* figures (with matplotlib, ``pip install 'rank1-hf[plot]'``): score scatter, histogram of score
  differences, per-query nDCG@10 bars. ``report.json`` holds every number and the data of every figure.

From Python::

    from rank1_hf import Rank1, comparison, pipeline
    from rank1_hf.io import formats
    from rank1_hf.io.store import JudgementStore

    items = pipeline.load_items("run.trec", "queries.jsonl", "corpus.jsonl", top_k=20)
    with JudgementStore("judgements.sqlite") as store:
        a = comparison.judge_variant("A", lambda: Rank1("jhu-clsp/rank1-7b"), items, store)
        b = comparison.judge_variant("B", lambda: Rank1("jhu-clsp/rank1-7b", quantization="bnb-4bit"), items, store)
    report = comparison.build_report(items, a, b, qrels=formats.read_qrels("qrels.txt"))
    comparison.write_report(report, "report/")

The modules: :mod:`.statistics` (rank correlations, the paired test), :mod:`.profiling` (peak memory),
:mod:`.variants` (judging a variant and its cost), :mod:`.report` (the numbers, written to a folder) and
:mod:`.render` (summary, markdown, figures).
"""

from .profiling import PeakMemory, release_memory
from .render import FIGURE_FILES, markdown, summary_lines
from .report import TEST_MEASURE, Report, build_report, write_report
from .statistics import (PERMUTATIONS, SEED, average_ranks, kendall_tau_b, paired_randomization_test, spearman_rho,
                         top_overlap)
from .variants import VariantRun, judge_variant

__all__ = ["FIGURE_FILES", "PERMUTATIONS", "SEED", "TEST_MEASURE", "PeakMemory", "Report", "VariantRun", "average_ranks",
           "build_report", "judge_variant", "kendall_tau_b", "markdown", "paired_randomization_test",
           "release_memory", "spearman_rho", "summary_lines", "top_overlap", "write_report"]
