"""Read and write the files a reranking job consumes and produces.

Inputs: queries, instructions and passages (TSV or BEIR-style JSONL); a first-stage run as TREC text,
as JSON ``{qid: {docid: score}}`` (the official rank1 run files, BRIGHT's ``score.json``) or as an mteb
2.x predictions file; qrels as TREC text or BEIR's ``qrels/*.tsv``. Outputs: a TREC run and JSONL
records, both written atomically.

Every problem with a user's file is raised as :class:`Rank1Error` with a one-line message naming the
file and, where there is one, the line number.

Ordering rule (:func:`ranked`, the one place it is coded): score descending, ties broken by docid
*descending*, which is how trec_eval (and so ir_measures and pytrec_eval) re-sort a run. Reading with
``top_k``, building and writing a reranked run and evaluating all use it, so a run means the same ranking
here as in those tools. :func:`write_run` also writes strictly decreasing scores (see there), so tools with
any other tie rule read the same ranking too.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
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
            raise Rank1Error(f"{path} line {lineno}: expected '{what}<TAB>text', found no tab{_kind_hint(line)}")
        yield lineno, ident.strip(), text


def _kind_hint(line: str) -> str:
    """What kind of file a line that does not fit looks like, as a suffix for the error ("" when unclear):
    the mistake is usually the wrong file given to the right flag."""
    text = line.strip()
    if text.startswith("{"):
        try:
            row = json.loads(text)
        except ValueError:
            return " (the line is JSON: a JSONL corpus or queries file, or a JSON run?)"
        if isinstance(row, dict) and ("_id" in row or "text" in row):
            return " (this looks like a JSONL corpus or queries file)"
        return " (the line is JSON)"
    fields = text.split()
    if len(fields) == 6 and fields[1] == "Q0":
        return " (this looks like a TREC run)"
    if len(fields) == 4 and fields[1] in ("0", "Q0") and fields[3].lstrip("-").isdigit():
        return " (this looks like TREC qrels)"
    if "\t" in line and len(line.split("\t")) == 2:
        return " (this looks like an id<TAB>text queries or passages file)"
    return ""


def check_id(ident: str, what: str, where: str) -> None:
    """An id must fit one whitespace-separated field of a TREC run line: not empty, no whitespace.

    An id with a space would read back from the run this job writes as two fields (and ``rank1-hf
    evaluate`` would refuse the file), so every reader refuses it up front. ``where``: the file (and line).
    """
    if not ident:
        raise Rank1Error(f"{where}: empty {what}")
    if any(c.isspace() for c in ident):
        raise Rank1Error(f"{where}: {what} {ident!r} contains whitespace, which a TREC run line cannot hold")


def _add(table: dict[str, str], ident: str, text: str, what: str, path: PathLike, lineno: int) -> None:
    """Insert one id/text pair, rejecting blank ids, ids with whitespace, blank text and duplicates."""
    check_id(ident, what, f"{path} line {lineno}")
    if not text.strip():
        raise Rank1Error(f"{path} line {lineno}: {what} {ident!r} has empty text")
    if ident in table:
        raise Rank1Error(f"{path} line {lineno}: duplicate {what} {ident!r}")
    table[ident] = text


def _id_text_file(
    path: PathLike, what: str, id_keys: Sequence[str], *, allow_empty: bool = False,
    keep: Container[str] | None = None,
) -> dict[str, str]:
    """Read an id -> text table (TSV or JSONL); ``allow_empty`` drops blank texts instead of failing.

    ``keep``: only these ids are kept (and their texts checked); the others are read past without being
    held (their ids are still checked).
    """
    table: dict[str, str] = {}
    if _is_jsonl(path):
        rows: Iterable[tuple[int, str, str]] = (
            (n, _field(r, id_keys, path, n).strip(), _field(r, ("text",), path, n)) for n, r in _json_rows(path)
        )
    else:
        rows = _tsv_rows(path, what)
    lines = 0
    for lineno, ident, text in rows:
        lines += 1
        check_id(ident, what, f"{path} line {lineno}")  # every row's, held or not: the file is wrong
        if keep is not None and ident not in keep:
            continue
        if allow_empty and ident and not text.strip():
            continue
        _add(table, ident, text, what, path, lineno)
    if not lines and not allow_empty:
        raise Rank1Error(f"{path}: the file is empty (no {what}<TAB>text lines or JSON records)")
    return table


# --------------------------------------------------------------------------- readers


def read_queries(path: PathLike, keep: Container[str] | None = None) -> dict[str, str]:
    """Read queries: TSV (``qid<TAB>text``) or JSONL (``{"_id" or "query_id", "text"}``, BEIR queries.jsonl).

    The format comes from the extension (.jsonl/.json/.ndjson vs .tsv/.txt/.tab), otherwise from the
    first line. Empty text, empty or duplicate ids are errors naming the file and line. ``keep``: read
    only these qids (the rest of the file is streamed past, not held in memory).
    """
    return _id_text_file(path, "query id", ("_id", "query_id"), keep=keep)


def read_instructions(path: PathLike, keep: Container[str] | None = None) -> dict[str, str]:
    """Read per-query instructions, in the same formats as :func:`read_queries`.

    An empty instruction means "no instruction" and is left out rather than rejected, since
    instruction-following datasets often carry blank fields for some queries.
    """
    return _id_text_file(path, "query id", ("_id", "query_id"), allow_empty=True, keep=keep)


def read_corpus(path: PathLike, keep: Container[str] | None = None) -> dict[str, str]:
    """Read passages: BEIR corpus.jsonl (``{"_id", "title", "text"}``) or TSV (``docid<TAB>text``).

    A JSONL row becomes the passage the official code would read for the same record
    (:func:`rank1_hf.prompt.passage_text`): ``"{title} {text}"`` whenever the row has a title, even an
    empty one (``" text"``), and the text alone when it has no ``title`` field or a null one. Empty passage
    text is an error naming the docid, file and line.

    ``keep``: hold only these docids (a run's top-k is a tiny part of a corpus like MS MARCO's 8.8M
    passages); the other rows are parsed for their id (which must fit a TREC line) and dropped.
    """
    if not _is_jsonl(path):
        return _id_text_file(path, "docid", (), keep=keep)
    corpus: dict[str, str] = {}
    lines = 0
    for lineno, row in _json_rows(path):
        lines = lineno
        docid = _field(row, ("_id", "doc_id", "docid"), path, lineno).strip()
        check_id(docid, "docid", f"{path} line {lineno}")
        if keep is not None and docid not in keep:
            continue
        text = _field(row, ("text",), path, lineno)
        title = row.get("title")
        if title is not None and not isinstance(title, str):
            raise Rank1Error(f"{path} line {lineno}: field 'title' must be a string, got {type(title).__name__}")
        if not text.strip():  # a title alone is not a passage to judge
            raise Rank1Error(f"{path} line {lineno}: docid {docid!r} has empty text")
        record = {"text": text} if title is None else {"title": title, "text": text}
        _add(corpus, docid, passage_text(record), "docid", path, lineno)
    if not lines:
        raise Rank1Error(f"{path}: the file is empty (no JSON records)")
    return corpus


def ranked(pairs: Iterable[tuple[str, float]]) -> list[tuple[str, float]]:
    """(docid, score) pairs best first: score descending, ties by docid descending (trec_eval's rule).

    trec_eval compares docids with ``strcmp``, i.e. byte order of their UTF-8 text, which is the code
    point order Python compares ``str`` in.
    """
    return sorted(pairs, key=lambda pair: (pair[1], pair[0]), reverse=True)


def _read_run_lines(path: PathLike) -> Iterator[tuple[int, str, str, float]]:
    """Yield (line number, qid, docid, score) from a TREC run, validating each line."""
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 6:
            raise Rank1Error(
                f"{path} line {lineno}: expected 6 fields 'qid Q0 docid rank score tag', got {len(fields)}"
                + _kind_hint(line)
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


def read_run(path: PathLike, top_k: int | None = None, *, subset: str | None = None,
             split: str | None = None) -> Run:
    """Read a first-stage run into qid -> [(docid, score)], best first (:func:`ranked`).

    Formats, told apart by content:

    * TREC text, ``qid Q0 docid rank score tag``: ranking follows the scores, not the rank column (as
      trec_eval does). A malformed line or a repeated (qid, docid) pair is an error naming the line.
    * JSON ``{qid: {docid: score}}``: the official rank1 run files (``jhu-clsp/rank1-run-files``),
      BRIGHT's ``score.json``. A qid or docid given twice is an error naming the file, the query and the
      document (JSON itself would keep the last value silently); a query with no documents (``{}``) is
      kept with an empty list, so the job can report it (:func:`empty_queries`).
    * mteb 2.x predictions (``prediction_folder=``: ``{"mteb_model_meta": ..., subset: {split: {qid:
      {docid: score}}}}``): ``subset`` and ``split`` pick one when the file holds several.

    ``top_k`` keeps only the first k per query. Ids must fit a TREC run line: an id that is empty or holds
    whitespace is an error (:func:`check_id`), as it is in every other reader here.
    """
    if top_k is not None and top_k < 1:
        raise Rank1Error(f"top_k must be at least 1, got {top_k}")
    if _first_char(path) == "{":
        return {qid: ranked(docs)[:top_k] for qid, docs in _read_json_run(path, subset, split).items()}
    # Duplicates are caught with one docid set per query (no per-pair line numbers held for 700k
    # lines); the first line of a duplicate is found again only on the error path.
    seen: dict[str, set[str]] = {}
    pairs: dict[str, list[tuple[str, float]]] = {}
    for lineno, qid, docid, score in _read_run_lines(path):
        docs = seen.setdefault(qid, set())
        if docid in docs:
            raise Rank1Error(
                f"{path} line {lineno}: duplicate pair qid {qid!r} docid {docid!r} "
                f"(first on line {_first_line(path, qid, docid)})"
            )
        docs.add(docid)
        pairs.setdefault(qid, []).append((docid, score))
    del seen
    return {qid: ranked(docs)[:top_k] for qid, docs in pairs.items()}


def _first_char(path: PathLike) -> str:
    """The first non-blank character of a file ("" when it has none)."""
    for _, line in _lines(path):
        if line.strip():
            return line.lstrip()[0]
    return ""


class _JsonObject(dict):
    """A JSON object that remembers the keys it held more than once (``json`` keeps the last silently)."""

    repeated: list[str]


def _json_object(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject(pairs)
    seen: set[str] = set()
    obj.repeated = [k for k, _ in pairs if k in seen or seen.add(k)]
    return obj


def _read_json_run(path: PathLike, subset: str | None, split: str | None) -> dict[str, list[tuple[str, float]]]:
    """qid -> [(docid, score)] from a JSON run (flat, or mteb 2.x's subset/split nesting).

    A query whose entry holds no documents is kept with an empty list (see :func:`empty_queries`).
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f, object_pairs_hook=_json_object)
    except (OSError, UnicodeDecodeError) as e:
        raise Rank1Error(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and e.lineno > 1:  # one object per line: JSONL, not a JSON run
            first = next(line for _, line in _lines(path) if line.strip())
            raise Rank1Error(f"{path} line {e.lineno}: one JSON object per line (JSONL){_kind_hint(first)}, not a "
                             "run: a run is TREC text (qid Q0 docid rank score tag) or one JSON object "
                             "{qid: {docid: score}}") from None
        raise Rank1Error(f"{path} line {e.lineno}: invalid JSON: {e.msg}") from None
    if isinstance(data, dict) and "mteb_model_meta" in data:
        data = _pick(path, _pick(path, {k: v for k, v in data.items() if k != "mteb_model_meta"}, subset, "subset"),
                     split, "split")
    if not isinstance(data, dict):
        raise Rank1Error(f"{path}: expected a JSON object {{qid: {{docid: score}}}}")
    if getattr(data, "repeated", None):
        raise Rank1Error(f"{path}: qid {data.repeated[0]!r} appears twice (one entry would silently replace the other)")
    run: dict[str, list[tuple[str, float]]] = {}
    for qid, docs in data.items():
        if not isinstance(docs, dict):
            raise Rank1Error(f"{path}: qid {qid!r}: expected {{docid: score}}, got {type(docs).__name__}")
        check_id(qid, "qid", str(path))
        if getattr(docs, "repeated", None):
            raise Rank1Error(f"{path}: qid {qid!r}: duplicate pair, docid {docs.repeated[0]!r} appears twice "
                             "(one score would silently replace the other)")
        pairs = run.setdefault(qid, [])
        for docid, score in docs.items():
            check_id(docid, "docid", f"{path}: qid {qid!r}")
            if isinstance(score, bool) or not isinstance(score, (int, float)) or math.isnan(score):
                raise Rank1Error(f"{path}: qid {qid!r} docid {docid!r}: score {score!r} is not a number")
            pairs.append((docid, float(score)))
    return run


def empty_queries(run: Mapping[str, Sequence[tuple[str, float]]]) -> list[str]:
    """The qids of ``run`` that hold no documents (a JSON run can name a query with ``{}``), sorted."""
    return sorted(qid for qid, docs in run.items() if not docs)


def _pick(path: PathLike, table: Any, name: str | None, what: str) -> Any:
    """``table[name]``, or its only entry when ``name`` is None (mteb's subset/split levels)."""
    if not isinstance(table, dict):
        raise Rank1Error(f"{path}: not an mteb predictions file (no {what} level)")
    if name is None and len(table) == 1:
        return next(iter(table.values()))
    if name in table:
        return table[name]
    choices = ", ".join(map(repr, table)) or "none"
    raise Rank1Error(f"{path}: choose the mteb {what} to read ({what}=...): {choices}")


#: The header line of BEIR's qrels/*.tsv files.
BEIR_QRELS_HEADER = ("query-id", "corpus-id", "score")


def read_qrels(path: PathLike) -> Qrels:
    """Read qrels into qid -> {docid: grade}: TREC (``qid iteration docid grade``) or BEIR TSV.

    BEIR's ``qrels/test.tsv`` has three tab-separated columns ``query-id corpus-id score``, with that
    header line (which is skipped) or without it. Every line must have the field count of the first.
    A repeated (qid, docid) pair is an error, since one of the two grades would silently win.
    """
    qrels: Qrels = {}
    width = None
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        fields = line.split()
        if width is None:
            width = len(fields)
            if tuple(fields) == BEIR_QRELS_HEADER:
                continue
        if len(fields) != width or width not in (3, 4):
            raise Rank1Error(
                f"{path} line {lineno}: expected 4 fields 'qid 0 docid grade' (TREC) or 3 "
                f"'query-id corpus-id score' (BEIR), got {len(fields)}"
                + (f" after {width} on the first line" if lineno > 1 and width in (3, 4) else _kind_hint(line))
            )
        qid, docid, grade = (fields[0], fields[2], fields[3]) if width == 4 else fields
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
        if not docs:  # nothing to judge: the query text is not needed (the job reports such queries)
            continue
        if qid not in queries:
            hint = "" if queries else " (the queries hold none of the run's qids: the queries of another dataset?)"
            raise Rank1Error(f"{_where(run_path, qid, None)}: qid {qid!r} is not in the queries{hint}")
        for docid, _ in docs:
            if docid not in corpus:
                where = _where(run_path, qid, docid)
                hint = "" if corpus else " (the corpus holds none of the run's docids: the corpus of another dataset?)"
                raise Rank1Error(f"{where}: docid {docid!r} (qid {qid!r}) is not in the corpus{hint}")


def _where(run_path: PathLike | None, qid: str, docid: str | None) -> str:
    """Locate the first run line for qid (and docid), re-scanning the file only on the error path."""
    if run_path is None:
        return "run"
    lineno = _first_line(run_path, qid, docid)
    return str(run_path) if lineno is None else f"{run_path} line {lineno}"


def _first_line(run_path: PathLike, qid: str, docid: str | None) -> int | None:
    """The first TREC run line for qid (and docid), or None (also for a file that is not TREC text)."""
    try:
        for lineno, line in _lines(run_path):
            fields = line.split()
            if len(fields) >= 3 and fields[0] == qid and (docid is None or fields[2] == docid):
                return lineno
    except Rank1Error:
        pass
    return None


# --------------------------------------------------------------------------- writers


def _write_atomic(path: PathLike, lines: Iterable[str]) -> None:
    """Write text to a temp file beside ``path`` and rename it over, so readers never see half a file."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)  # an output in a new folder: make the folder
    except OSError as e:
        raise Rank1Error(f"{target}: cannot write: cannot make its folder: {e.strerror or e}") from None
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


def untied_scores(scores: Sequence[float]) -> list[float]:
    """Scores in ranked order, made strictly decreasing by the smallest possible steps.

    Each score is kept unless it is not below the one written before it; then it becomes the next
    double below that one (``math.nextafter``). Tied scores thus differ in their last bits only, and
    every tool that re-sorts a run by score (trec_eval, ir_measures, pytrec_eval, ranx, ...) reads
    exactly the written ranking, whatever its own tie rule, as long as it parses scores as doubles.
    """
    out: list[float] = []
    for s in scores:
        s = float(s)
        if out and not s < out[-1]:
            s = math.nextafter(out[-1], -math.inf)
        out.append(s)
    return out


def check_tag(tag: str) -> None:
    """A run tag must be one non-empty word (the last field of a TREC run line)."""
    if not tag or any(c.isspace() for c in tag):
        raise Rank1Error(f"run tag must be one non-empty word, got {tag!r}")


def write_run(path: PathLike, run: Mapping[str, Iterable[tuple[str, float]]], tag: str) -> None:
    """Write a TREC run atomically, each query ranked by :func:`ranked`, queries in sorted qid order.

    The score column is :func:`untied_scores` of the scores, written with ``repr`` (they read back
    exactly): the raw scores of tied documents are in a reranked run's traces.
    """
    check_tag(tag)

    def lines() -> Iterator[str]:
        for qid in sorted(run):
            docs = ranked(run[qid])
            written = untied_scores([score for _, score in docs])
            for rank, ((docid, _), score) in enumerate(zip(docs, written), 1):
                yield f"{qid} Q0 {docid} {rank} {score!r} {tag}\n"

    _write_atomic(path, lines())


def write_jsonl(path: PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write one JSON object per line, atomically (non-ASCII text is kept as UTF-8)."""
    _write_atomic(path, (json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_text(path: PathLike, text: str) -> None:
    """Write ``text`` atomically (an HTML report, ...)."""
    _write_atomic(path, [text])


def read_jsonl(path: PathLike) -> list[dict[str, Any]]:
    """Every object of a JSONL file (errors name the file and line)."""
    return [row for _, row in _json_rows(path)]


def sample_paths() -> dict[str, Path]:
    """Paths of the bundled sample collection: queries, instructions, corpus, qrels and run."""
    folder = resources.files("rank1_hf").joinpath("data").joinpath("sample")
    # The package is installed as plain files (not zipped), so a real filesystem path exists.
    return {name: Path(str(folder.joinpath(filename))) for name, filename in _SAMPLE_FILES.items()}
