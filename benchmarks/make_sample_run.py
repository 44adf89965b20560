"""Rebuild the bundled sample's first-stage run (rank1_hf/data/sample/run.trec) with plain-Python BM25.

BM25 with k1=0.9, b=0.4 (the Anserini defaults) over lowercase alphanumeric tokens, no stemming and no
stopwords, top 20 per query. Only the query text is searched: instructions are for the reranker.
The output is deterministic, so rerunning this script reproduces the shipped file byte for byte.

    python benchmarks/make_sample_run.py [--depth 20] [--out PATH]
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rank1_hf.io.formats import Run, ranked, read_corpus, read_queries, sample_paths, write_run  # noqa: E402

K1 = 0.9
B = 0.4


def tokenize(text: str) -> list[str]:
    """Lowercase and split on anything that is not a letter or digit."""
    return re.findall(r"[a-z0-9]+", text.lower())


def bm25_run(queries: dict[str, str], corpus: dict[str, str], depth: int) -> Run:
    """Score every passage for every query and keep the best ``depth`` (ranked as write_run ranks)."""
    docs = {docid: Counter(tokenize(text)) for docid, text in corpus.items()}
    lengths = {docid: sum(tf.values()) for docid, tf in docs.items()}
    avg_len = sum(lengths.values()) / len(lengths)
    df = Counter(term for tf in docs.values() for term in tf)
    n = len(docs)
    # Lucene's idf: always positive, so very common terms still count a little.
    idf = {term: math.log(1 + (n - d + 0.5) / (d + 0.5)) for term, d in df.items()}

    run: Run = {}
    for qid, query in queries.items():
        terms = [t for t in tokenize(query) if t in idf]
        scores = []
        for docid, tf in docs.items():
            norm = K1 * (1 - B + B * lengths[docid] / avg_len)
            score = sum(idf[t] * tf[t] * (K1 + 1) / (tf[t] + norm) for t in terms if t in tf)
            if score > 0:
                scores.append((docid, round(score, 4)))  # 4 decimals keeps the file readable
        run[qid] = ranked(scores)[:depth]
    return run


def main() -> None:
    """Read the bundled queries and corpus, write the BM25 run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=20, help="passages kept per query (default 20)")
    parser.add_argument("--out", type=Path, default=sample_paths()["run"], help="output TREC run")
    args = parser.parse_args()
    paths = sample_paths()
    run = bm25_run(read_queries(paths["queries"]), read_corpus(paths["corpus"]), args.depth)
    write_run(args.out, run, tag="bm25")
    print(f"wrote {sum(map(len, run.values()))} lines for {len(run)} queries to {args.out}")


if __name__ == "__main__":
    main()
