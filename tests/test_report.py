"""``rank1-hf report``: the HTML page of a reranked run, built from hand-made judgements (no model), checked
as text and, in a real headless Chromium, as a screenshot whose regions must show the page's content."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from rank1_hf import cli, pipeline
from rank1_hf.io import formats
from rank1_hf.judgement import Judgement

QUERIES = {"q1": "how do cats purr", "q2": "bread ovens"}
CORPUS = {"d1": "Cats purr by vibrating the larynx.", "d2": "Deck ovens bake bread.", "d3": "Dogs bark <loudly>."}
RUN = {"q1": [("d2", 3.0), ("d3", 2.0), ("d1", 1.0)], "q2": [("d1", 2.0), ("d2", 1.0)]}
SCORES = {("q1", "d1"): 0.97, ("q1", "d2"): 0.10, ("q1", "d3"): 0.40, ("q2", "d1"): 0.05, ("q2", "d2"): 0.88}


def _write_job(tmp_path: Path) -> Path:
    """A rerank's outputs as rerank writes them; returns the run path."""
    items = pipeline.build_items(RUN, QUERIES, CORPUS)
    judgements = {k: Judgement(s, "forced" if k == ("q1", "d3") else "answered",
                               "The passage explains purring. It goes on and" if k == ("q1", "d3") else "Relevant.",
                               9, 40, 1.0, 0.0, False) for k, s in SCORES.items()}
    out = tmp_path / "rank1.trec"
    pipeline.write_outputs(items, judgements, out, tmp_path / "rank1.traces.jsonl", "rank1")
    (tmp_path / "qrels.txt").write_text("q1 0 d1 2\nq1 0 d2 0\nq2 0 d2 1\n")
    return out


def _report(tmp_path: Path, capsys) -> str:
    run = _write_job(tmp_path)
    assert cli.main(["report", str(run), "--qrels", str(tmp_path / "qrels.txt")]) == 0
    assert "report:" in capsys.readouterr().out
    return (tmp_path / "rank1.html").read_text()


def test_report_page_holds_moves_scores_reasoning_and_metrics_offline(tmp_path, capsys):
    page = _report(tmp_path, capsys)
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained
    assert page.count("<details>") == 5  # reasoning folded under every judged document
    assert "Dogs bark &lt;loudly&gt;." in page  # texts escaped
    assert "The passage explains purring.</pre>" in page  # the text the forced score was read after
    assert "full reasoning generated" in page
    q1 = page[page.index('id="q-q1"'):page.index('id="q-q2"')]
    # d1 moved from 3rd to 1st, with its qrels grade 2
    assert q1.index(">d1:") < q1.index(">d3:") < q1.index(">d2:")
    assert '<td class="rank">1</td><td class="rank">3</td><td><span class="up">&#9650; 2</span>' in q1
    assert '<td class="rel relpos">2</td>' in q1
    assert 'class="metrics"' in page and "first stage (top-k)" in page


def test_report_refuses_a_run_without_traces(tmp_path, capsys):
    formats.write_run(tmp_path / "x.trec", RUN, "bm25")
    assert cli.main(["report", str(tmp_path / "x.trec")]) == 2
    assert "x.traces.jsonl: no traces beside the run" in capsys.readouterr().err


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.browser
@pytest.mark.skipif(_chromium() is None, reason="no Chromium installed (apt-get install chromium; scripts/setup.sh "
                                                "does it where apt works)")
def test_report_renders_in_headless_chromium(tmp_path, capsys):
    from PIL import Image

    _report(tmp_path, capsys)
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1000,900", f"--screenshot={shot}", (tmp_path / "rank1.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    image = Image.open(shot).convert("RGB")
    width, height = image.size
    pixels = image.load()

    def rows_with(color: tuple[int, int, int], tolerance: int = 12, min_hits: int = 2) -> list[int]:
        """The y of every pixel row holding at least ``min_hits`` pixels of ``color``."""
        found = []
        for y in range(height):
            hits = sum(1 for x in range(width) if all(abs(c - w) <= tolerance for c, w in zip(pixels[x, y], color)))
            if hits >= min_hits:
                found.append(y)
        return found

    background = sum(1 for x in range(0, width, 4) for y in range(0, height, 4) if pixels[x, y] == (255, 255, 255))
    assert background < 0.95 * (width // 4) * (height // 4), "the page rendered blank"
    header = rows_with((0x1F, 0x3A, 0x5F), min_hits=500)  # the header band, and the rule above each query
    metrics_row = rows_with((0xE3, 0xF1, 0xE6), min_hits=200)  # the reranked row of the metrics table
    bars = rows_with((0x2B, 0x6C, 0xB0))  # score bars, one per document row
    answered = rows_with((0x1A, 0x7F, 0x37))  # "answered" badges and up arrows
    assert header and header[0] < 5, "no header band at the top"
    assert metrics_row and metrics_row[0] > header[0], "no metrics table below the header"
    assert bars and bars[0] > metrics_row[0], "no score bars below the metrics table"
    bar_groups = sum(1 for a, b in zip([-10, *bars], bars) if b - a > 1)
    assert bar_groups == 5, f"{bar_groups} score bars drawn for 5 judged documents"
    assert answered
