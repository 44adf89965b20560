"""Adapters for the frameworks RAG pipelines are built on; each needs its own extra, imported only here.

* :mod:`rank1_hf.integrations.langchain`: ``Rank1Compressor``, a LangChain ``BaseDocumentCompressor``
  (``pip install 'rank1-hf[langchain]'``).
* :mod:`rank1_hf.integrations.rerankers`: ``Rank1Ranker``, a ``rerankers`` ``BaseRanker``
  (``pip install 'rank1-hf[rerankers]'``).
* :mod:`rank1_hf.integrations.pyterrier`: ``Rank1Reranker``, a PyTerrier ``Transformer``
  (``pip install 'rank1-hf[pyterrier]'``).
* :mod:`rank1_hf.integrations.llamaindex`: ``Rank1Rerank``, a LlamaIndex ``BaseNodePostprocessor``
  (``pip install 'rank1-hf[llamaindex]'``).
* :mod:`rank1_hf.integrations.haystack`: ``Rank1Ranker``, a Haystack ``@component`` ranker
  (``pip install 'rank1-hf[haystack]'``).
"""
