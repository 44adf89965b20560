"""Read and write the files a reranking job consumes and produces.

Inputs: queries, instructions and passages (TSV or BEIR-style JSONL), a first-stage TREC run and TREC
qrels. Outputs: a TREC run and JSONL records, both written atomically.

Every problem with a user's file is raised as :class:`Rank1Error` with a one-line message naming the
file and, where there is one, the line number.

Ordering rule used throughout (reading with ``top_k`` and writing): score descending, ties broken by
docid ascending, so the same scores always give the same ranking.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from rank1_hf.errors import Rank1Error
from rank1_hf.prompt import passage_text

Run = dict[str, list[tuple[str, float]]]
"""qid -> [(docid, score), ...], best first."""

Qrels = dict[str, dict[str, int]]
"""qid -> {docid: relevance grade}."""

PathLike = str | os.PathLike[str]

_JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
_TSV_SUFFIXES = {".tsv", ".txt", ".tab"}
_SAMPLE_FILES = {
    "queries": "queries.jsonl",
    "instructions": "instructions.jsonl",
    "corpus": "corpus.jsonl",
    "qrels": "qrels.txt",
    "run": "run.trec",
}


# --------------------------------------------------------------------------- low-level helpers


def _lines(path: PathLike) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line without its newline), decoding UTF-8 line by line.

    Decoding per line (rather than letting ``open`` decode) lets a bad byte be reported with its line.
    """
    try:
        f = open(path, "rb")
    except OSError as e:
        raise Rank1Error(f"{path}: cannot read: {e.strerror or e}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise Rank1Error(
                    f"{path} line {lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                ) from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # tolerate a byte-order mark
            yield lineno, line.rstrip("\r\n")


def _is_jsonl(path: PathLike) -> bool:
    """Decide the format by extension, falling back to the first non-blank line starting with '{'."""
    suffix = Path(path).suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        return True
    if suffix in _TSV_SUFFIXES:
        return False
    for _, line in _lines(path):
        if line.strip():
            return line.lstrip().startswith("{")
    return False


def _json_rows(path: PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank JSONL line."""
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise Rank1Error(f"{path} line {lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(row, dict):
            raise Rank1Error(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
        yield lineno, row


def _field(row: Mapping[str, Any], keys: Sequence[str], path: PathLike, lineno: int) -> str:
    """Return the first present key of ``keys`` as a string (ids may be numbers in the wild)."""
    for key in keys:
        if key in row and row[key] is not None:
            value = row[key]
            if isinstance(value, (str, int)) and not isinstance(value, bool):
                return str(value)
            raise Rank1Error(f"{path} line {lineno}: field '{key}' must be a string, got {type(value).__name__}")
    raise Rank1Error(f"{path} line {lineno}: missing field {' or '.join(repr(k) for k in keys)}")


def _tsv_rows(path: PathLike, what: str) -> Iterator[tuple[int, str, str]]:
    """Yield (line number, id, text) from an ``id<TAB>text`` file."""
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        ident, tab, text = line.partition("\t")
        if not tab:
            raise Rank1Error(f"{path} line {lineno}: expected '{what}<TAB>text', found no tab")
        yield lineno, ident.strip(), text


def _add(table: dict[str, str], ident: str, text: str, what: str, path: PathLike, lineno: int) -> None:
    """Insert one id/text pair, rejecting blank ids, blank text and duplicates."""
    if not ident:
        raise Rank1Error(f"{path} line {lineno}: empty {what}")
    if not text.strip():
        raise Rank1Error(f"{path} line {lineno}: {what} {ident!r} has empty text")
    if ident in table:
        raise Rank1Error(f"{path} line {lineno}: duplicate {what} {ident!r}")
    table[ident] = text


def _id_text_file(
    path: PathLike, what: str, id_keys: Sequence[str], *, allow_empty: bool = False
) -> dict[str, str]:
    """Read an id -> text table (TSV or JSONL); ``allow_empty`` drops blank texts instead of failing."""
    table: dict[str, str] = {}
    if _is_jsonl(path):
        rows: Iterable[tuple[int, str, str]] = (
            (n, _field(r, id_keys, path, n).strip(), _field(r, ("text",), path, n)) for n, r in _json_rows(path)
        )
    else:
        rows = _tsv_rows(path, what)
    for lineno, ident, text in rows:
        if allow_empty and ident and not text.strip():
            continue
        _add(table, ident, text, what, path, lineno)
    return table


# --------------------------------------------------------------------------- readers


def read_queries(path: PathLike) -> dict[str, str]:
    """Read queries: TSV (``qid<TAB>text``) or JSONL (``{"_id" or "query_id", "text"}``, BEIR queries.jsonl).

    The format comes from the extension (.jsonl/.json/.ndjson vs .tsv/.txt/.tab), otherwise from the
    first line. Empty text, empty or duplicate ids are errors naming the file and line.
    """
    return _id_text_file(path, "query id", ("_id", "query_id"))


def read_instructions(path: PathLike) -> dict[str, str]:
    """Read per-query instructions, in the same formats as :func:`read_queries`.

    An empty instruction means "no instruction" and is left out rather than rejected, since
    instruction-following datasets often carry blank fields for some queries.
    """
    return _id_text_file(path, "query id", ("_id", "query_id"), allow_empty=True)


def read_corpus(path: PathLike) -> dict[str, str]:
    """Read passages: BEIR corpus.jsonl (``{"_id", "title", "text"}``) or TSV (``docid<TAB>text``).

    A JSONL row becomes the passage the official code would read for the same record
    (:func:`rank1_hf.prompt.passage_text`): ``"{title} {text}"`` whenever the row has a title, even an
    empty one (``" text"``), and the text alone when it has no ``title`` field or a null one. Empty passage
    text is an error naming the docid, file and line.
    """
    if not _is_jsonl(path):
        return _id_text_file(path, "docid", ())
    corpus: dict[str, str] = {}
    for lineno, row in _json_rows(path):
        docid = _field(row, ("_id", "doc_id", "docid"), path, lineno).strip()
        text = _field(row, ("text",), path, lineno)
        title = row.get("title")
        if title is not None and not isinstance(title, str):
            raise Rank1Error(f"{path} line {lineno}: field 'title' must be a string, got {type(title).__name__}")
        if not text.strip():  # a title alone is not a passage to judge
            raise Rank1Error(f"{path} line {lineno}: docid {docid!r} has empty text")
        record = {"text": text} if title is None else {"title": title, "text": text}
        _add(corpus, docid, passage_text(record), "docid", path, lineno)
    return corpus


def _ranked(pairs: Iterable[tuple[str, float]]) -> list[tuple[str, float]]:
    """Order by score descending, then docid ascending (the module's documented tie-break)."""
    return sorted(pairs, key=lambda pair: (-pair[1], pair[0]))


def _read_run_lines(path: PathLike) -> Iterator[tuple[int, str, str, float]]:
    """Yield (line number, qid, docid, score) from a TREC run, validating each line."""
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 6:
            raise Rank1Error(
                f"{path} line {lineno}: expected 6 fields 'qid Q0 docid rank score tag', got {len(fields)}"
            )
        qid, _, docid, rank, score_text, _ = fields
        try:
            int(rank)
        except ValueError:
            raise Rank1Error(f"{path} line {lineno}: rank {rank!r} is not an integer") from None
        try:
            score = float(score_text)
        except ValueError:
            raise Rank1Error(f"{path} line {lineno}: score {score_text!r} is not a number") from None
        if score != score:  # NaN cannot be ranked
            raise Rank1Error(f"{path} line {lineno}: score is NaN")
        yield lineno, qid, docid, score


def read_run(path: PathLike, top_k: int | None = None) -> Run:
    """Read a TREC run (``qid Q0 docid rank score tag``) into qid -> [(docid, score)], best first.

    Ranking follows the scores, not the rank column (as trec_eval does): score descending, ties broken
    by docid ascending. ``top_k`` keeps only the first k per query. A malformed line or a repeated
    (qid, docid) pair is an error naming the line.
    """
    if top_k is not None and top_k < 1:
        raise Rank1Error(f"top_k must be at least 1, got {top_k}")
    seen: dict[tuple[str, str], int] = {}
    pairs: dict[str, list[tuple[str, float]]] = {}
    for lineno, qid, docid, score in _read_run_lines(path):
        first = seen.setdefault((qid, docid), lineno)
        if first != lineno:
            raise Rank1Error(
                f"{path} line {lineno}: duplicate pair qid {qid!r} docid {docid!r} (first on line {first})"
            )
        pairs.setdefault(qid, []).append((docid, score))
    return {qid: _ranked(docs)[:top_k] for qid, docs in pairs.items()}


def read_qrels(path: PathLike) -> Qrels:
    """Read TREC qrels (``qid iteration docid grade``) into qid -> {docid: grade}.

    A repeated (qid, docid) pair is an error, since one of the two grades would silently win.
    """
    qrels: Qrels = {}
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 4:
            raise Rank1Error(f"{path} line {lineno}: expected 4 fields 'qid 0 docid grade', got {len(fields)}")
        qid, _, docid, grade = fields
        try:
            value = int(grade)
        except ValueError:
            raise Rank1Error(f"{path} line {lineno}: grade {grade!r} is not an integer") from None
        judged = qrels.setdefault(qid, {})
        if docid in judged:
            raise Rank1Error(f"{path} line {lineno}: duplicate judgement for qid {qid!r} docid {docid!r}")
        judged[docid] = value
    return qrels


def check_run(
    run: Mapping[str, Sequence[tuple[str, float]]],
    queries: Mapping[str, str],
    corpus: Mapping[str, str],
    run_path: PathLike | None = None,
) -> None:
    """Fail on the first qid missing from ``queries`` or docid missing from ``corpus``.

    When ``run_path`` is given and the file exists, the message names the run line where the unknown
    id first appears; otherwise it names the run (or "run") only.
    """
    for qid, docs in run.items():
        if qid not in queries:
            raise Rank1Error(f"{_where(run_path, qid, None)}: qid {qid!r} is not in the queries")
        for docid, _ in docs:
            if docid not in corpus:
                where = _where(run_path, qid, docid)
                raise Rank1Error(f"{where}: docid {docid!r} (qid {qid!r}) is not in the corpus")


def _where(run_path: PathLike | None, qid: str, docid: str | None) -> str:
    """Locate the first run line for qid (and docid), re-scanning the file only on the error path."""
    if run_path is None:
        return "run"
    try:
        for lineno, line in _lines(run_path):
            fields = line.split()
            if len(fields) >= 3 and fields[0] == qid and (docid is None or fields[2] == docid):
                return f"{run_path} line {lineno}"
    except Rank1Error:
        pass
    return str(run_path)


# --------------------------------------------------------------------------- writers


def _write_atomic(path: PathLike, lines: Iterable[str]) -> None:
    """Write text to a temp file beside ``path`` and rename it over, so readers never see half a file."""
    target = Path(path)
    # Not tempfile.mkstemp: its 0600 mode would survive the rename; 0666 lets the umask decide as usual.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise Rank1Error(f"{target}: cannot write: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for line in lines:
                f.write(line)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise Rank1Error(f"{target}: cannot write: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_run(path: PathLike, run: Mapping[str, Iterable[tuple[str, float]]], tag: str) -> None:
    """Write a TREC run atomically, ranking each query by score descending, ties by docid ascending.

    Queries are written in sorted qid order; scores are written with ``repr`` so they read back exactly.
    """
    if not tag or any(c.isspace() for c in tag):
        raise Rank1Error(f"run tag must be one non-empty word, got {tag!r}")

    def lines() -> Iterator[str]:
        for qid in sorted(run):
            for rank, (docid, score) in enumerate(_ranked(run[qid]), 1):
                yield f"{qid} Q0 {docid} {rank} {float(score)!r} {tag}\n"

    _write_atomic(path, lines())


def write_jsonl(path: PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write one JSON object per line, atomically (non-ASCII text is kept as UTF-8)."""
    _write_atomic(path, (json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def sample_paths() -> dict[str, Path]:
    """Paths of the bundled sample collection: queries, instructions, corpus, qrels and run."""
    folder = resources.files("rank1_hf").joinpath("data").joinpath("sample")
    # The package is installed as plain files (not zipped), so a real filesystem path exists.
    return {name: Path(str(folder.joinpath(filename))) for name, filename in _SAMPLE_FILES.items()}
