"""The data floor: TREC/BEIR files (``formats.py``), the SQLite judgement store (``store.py``) and its reuse
(``reuse.py``), evaluation with ir_measures (``evaluate.py``) and the offline HTML report (``report.py``).
"""
