"""The HTTP rerank server behind ``rank1-hf serve``, on one :class:`~rank1_hf.ranker.Rank1`.

:func:`create_app` takes a ready ranker and :class:`ServeSettings` and returns a FastAPI app that speaks
the rerank APIs clients already use, one module per family: :mod:`.cohere` (Cohere v1/v2, Jina),
:mod:`.tei` (TEI's ``/rerank`` with ``texts`` and ``/info``), :mod:`.vllm` (vLLM's and Infinity's
``/rerank`` with ``documents``, ``/score``, ``/v1/models``). :mod:`.fields` holds what every request
shares, :mod:`.handler` turns pairs into judgements, :mod:`.routes` wires the routes, :mod:`.middleware`
holds the request-wide rules, :mod:`.metrics` the Prometheus metrics, :mod:`.errors` the one error shape.
``rank1-hf serve`` (:mod:`rank1_hf.cli.serve`) builds the ranker and runs this app.
"""

from .app import create_app
from .settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]
