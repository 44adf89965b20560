"""rank1 as a PyTerrier transformer: rerank a first stage's results in a pipeline or a ``pt.Experiment``.

    import pyterrier as pt
    from rank1_hf import Rank1
    from rank1_hf.integrations.pyterrier import Rank1Reranker

    rank1 = Rank1Reranker(Rank1("jhu-clsp/rank1-7b", store="judgements.sqlite"))
    pipeline = bm25 % 100 >> pt.text.get_text(dataset, "text") >> rank1
    pt.Experiment([bm25, pipeline], topics, qrels, ["nDCG@10"])

The input is a result frame (``qid``, ``query``, ``docno``, ``text``; ``score``/``rank`` and any other
columns are carried along). The output is the same rows with ``score`` the rank1 score and ``rank``
(0-based, as PyTerrier's) re-done, queries in sorted qid order and each query's documents ranked by
:func:`rank1_hf.io.formats.ranked` (score descending, ties by docno descending: trec_eval's rule, the one
the CLI writes runs with). ``reasoning=True`` / ``outcome=True`` add ``rank1_reasoning`` /
``rank1_outcome`` columns. All rows go to :meth:`Rank1.judge` in one call (batched across queries, and
reusing the ranker's store).
"""

from __future__ import annotations

from typing import Any

from ..io import formats
from ..errors import Rank1Error
from ..ranker import Rank1

try:
    import pandas as pd
    import pyterrier as pt
except ImportError:  # pragma: no cover - exercised by the test that hides pyterrier
    raise Rank1Error("the PyTerrier integration needs pyterrier: pip install 'rank1-hf[pyterrier]'") from None

__all__ = ["Rank1Reranker"]

_NEEDED = ("qid", "query", "docno")
_FIRST_RANK = 0  # pyterrier.model.FIRST_RANK


class Rank1Reranker(pt.Transformer):
    """Re-score and re-rank a PyTerrier result frame with a :class:`~rank1_hf.ranker.Rank1`.

    ranker: the rank1 reranker (give it ``store=`` to keep judgements across runs and experiments).
    instruction: appended to every query the rank1 way (rank1 follows instructions).
    text_field: the column holding the passages.
    reasoning, outcome: also return the ``rank1_reasoning`` / ``rank1_outcome`` columns.
    batch_size, show_progress_bar: passed to :meth:`Rank1.judge`.
    """

    def __init__(self, ranker: Rank1, *, instruction: str | None = None, text_field: str = "text",
                 reasoning: bool = False, outcome: bool = False, batch_size: int | None = None,
                 show_progress_bar: bool | None = None) -> None:
        self.ranker, self.instruction, self.text_field = ranker, instruction, text_field
        self.reasoning, self.outcome = reasoning, outcome
        self.batch_size, self.show_progress_bar = batch_size, show_progress_bar

    def __repr__(self) -> str:
        return f"Rank1Reranker({self.ranker!r})"

    # PyTerrier's inspection protocol (pt.inspect): the columns in and out, without a trial call.
    @property
    def transform_inputs(self) -> list[list[str]]:
        return [[*_NEEDED, self.text_field]]

    def transform_outputs(self, input_columns: list[str]) -> list[str]:
        pt.validate.columns(list(input_columns), includes=[*_NEEDED, self.text_field], context=self)
        return [c for c in input_columns if c not in ("score", "rank")] + ["score", "rank"] + self._extra_columns()

    def _extra_columns(self) -> list[str]:
        return ["rank1_reasoning"] * self.reasoning + ["rank1_outcome"] * self.outcome

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        rows = self._checked(inp)
        out = inp.drop(columns=["score", "rank"], errors="ignore").reset_index(drop=True)
        if not rows:
            return out.assign(score=pd.Series(dtype="float64"), rank=pd.Series(dtype="int64"),
                              **{c: pd.Series(dtype="object") for c in self._extra_columns()})
        judgements = self.ranker.judge([(query, text, self.instruction) for _, query, _, text in rows],
                                       batch_size=self.batch_size, show_progress_bar=self.show_progress_bar)
        by_qid: dict[str, dict[str, int]] = {}
        for i, (qid, _, docno, _) in enumerate(rows):
            by_qid.setdefault(qid, {})[docno] = i
        order, ranks = [], [0] * len(rows)
        for qid in sorted(by_qid):
            docs = by_qid[qid]
            for rank, (docno, _) in enumerate(formats.ranked((d, judgements[i].score) for d, i in docs.items()),
                                              _FIRST_RANK):
                order.append(docs[docno])
                ranks[docs[docno]] = rank
        out["score"] = [j.score for j in judgements]
        out["rank"] = ranks
        if self.reasoning:
            out["rank1_reasoning"] = [j.reasoning for j in judgements]
        if self.outcome:
            out["rank1_outcome"] = [j.outcome for j in judgements]
        return out.iloc[order].reset_index(drop=True)

    def _checked(self, inp: Any) -> list[tuple[str, str, str, str]]:
        """(qid, query, docno, passage) per row, in the frame's order; any problem is a Rank1Error."""
        if not isinstance(inp, pd.DataFrame):
            raise Rank1Error(f"Rank1Reranker takes a pandas DataFrame of results, got {type(inp).__name__}")
        needed = (*_NEEDED, self.text_field)
        missing = [c for c in needed if c not in inp.columns]
        if missing:
            hint = " (add the passages first, e.g. with pt.text.get_text)" if self.text_field in missing else ""
            raise Rank1Error(f"Rank1Reranker needs the columns {', '.join(needed)}; missing: {', '.join(missing)}"
                             + hint)
        rows, seen = [], set()
        for qid, query, docno, text in zip(*(inp[c] for c in needed)):
            qid, docno = str(qid), str(docno)  # PyTerrier's ids are strings; trec_eval compares them as such
            if not isinstance(query, str) or not query.strip():
                raise Rank1Error(f"qid {qid!r} has no query text (got {query!r})")
            if not isinstance(text, str) or not text.strip():
                raise Rank1Error(f"qid {qid!r} docno {docno!r} has no passage text in column "
                                 f"{self.text_field!r} (got {text!r})")
            if (qid, docno) in seen:
                raise Rank1Error(f"duplicate pair qid {qid!r} docno {docno!r}")
            seen.add((qid, docno))
            rows.append((qid, query, docno, text))
        return rows
