"""The Python API as other tools' users call it: CrossEncoder's predict/rank, a store behind it, logging."""

from __future__ import annotations

import inspect
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_pairs, ranker_for

from rank1_hf import pipeline
from rank1_hf.compat import rank1
from rank1_hf.judgement import Judgement
from rank1_hf.prompt import query_text
from rank1_hf.ranker import Rank1
from rank1_hf.engine.readout import score
from rank1_hf.io.store import JudgementStore, pair_key, settings_key

REPO = Path(__file__).resolve().parents[1]

# sentence-transformers 5.x, CrossEncoder (sentence_transformers/cross_encoder/CrossEncoder.py), transcribed:
#   predict(self, sentences, batch_size=32, show_progress_bar=None, activation_fn=None, apply_softmax=False,
#           convert_to_numpy=True, convert_to_tensor=False)
#   rank(self, query, documents, top_k=None, return_documents=False, batch_size=32, show_progress_bar=None,
#        activation_fn=None, apply_softmax=False, convert_to_numpy=True, convert_to_tensor=False)
# (6.x inserts prompt_name and prompt after the first parameters and drops the convert flags from rank.)
CE5_PREDICT = ["sentences", "batch_size", "show_progress_bar", "activation_fn", "apply_softmax", "convert_to_numpy",
               "convert_to_tensor"]
CE5_RANK = ["query", "documents", "top_k", "return_documents", "batch_size", "show_progress_bar", "activation_fn",
            "apply_softmax", "convert_to_numpy", "convert_to_tensor"]




def positional(fn) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self"]


# ---------------------------------------------------------------------------------------------- CrossEncoder


def test_positional_order_is_crossencoders():
    assert positional(Rank1.predict) == CE5_PREDICT
    assert positional(Rank1.rank) == CE5_RANK
    assert inspect.signature(Rank1.rank).parameters["instruction"].kind is inspect.Parameter.KEYWORD_ONLY


def test_rank_fifth_positional_is_batch_size_not_instruction(tiny, monkeypatch):
    # rank(q, docs, 10, False, 32) must not score the query "q 32".
    ranker = ranker_for(tiny)
    seen = []
    monkeypatch.setattr(ranker, "judge", lambda pairs, **kw: seen.extend(pairs) or [
        Judgement(0.5, "fallback", "", 0, 1, None, None, False) for _ in pairs])
    ranker.rank("q", ["a", "b"], 10, False, 32)
    assert seen == [("q", "a", None), ("q", "b", None)]


def _tiny_crossencoder(path: Path):
    """A real sentence-transformers CrossEncoder: a 1-layer BERT with one label and a hand-made vocabulary."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = "what is a cat cats are small felines dogs bark bread q d".split()
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=5 + len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(path)
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(path), device="cpu")


def test_crossencoder_documented_calls_give_the_same_shapes(tiny, tmp_path):
    # The calls of CrossEncoder's docs, run on the real CrossEncoder and on Rank1: same types and shapes.
    pytest.importorskip("sentence_transformers", reason="compares with a real sentence-transformers CrossEncoder")
    ce, ranker = _tiny_crossencoder(tmp_path), ranker_for(tiny)
    pairs = [("what is a cat", "cats are small felines"), ("what is a cat", "dogs bark"), ("q", "bread")]
    docs = ["cats are small felines", "dogs bark", "bread"]
    for model in (ce, ranker):
        one = model.predict(pairs[0])
        assert isinstance(one, np.floating) and one.dtype == np.float32
        many = model.predict(pairs)
        assert isinstance(many, np.ndarray) and many.shape == (3,) and many.dtype == np.float32
        assert 0 <= many.min() and many.max() <= 1  # sigmoid by default
        tensor = model.predict(pairs, convert_to_tensor=True)
        assert isinstance(tensor, torch.Tensor) and tensor.shape == (3,)
        listed = model.predict(pairs, convert_to_numpy=False)
        assert isinstance(listed, list) and len(listed) == 3 and all(isinstance(t, torch.Tensor) for t in listed)
        raw = model.predict(pairs, activation_fn=torch.nn.Identity())
        np.testing.assert_allclose(1 / (1 + np.exp(-raw.astype(np.float64))), many, rtol=1e-5)
        hits = model.rank("what is a cat", docs, top_k=2, return_documents=True)
        assert len(hits) == 2 and set(hits[0]) == {"corpus_id", "score", "text"}
        assert hits[0]["score"] >= hits[1]["score"] and hits[0]["text"] == docs[hits[0]["corpus_id"]]
        assert [h["corpus_id"] for h in model.rank("what is a cat", docs)] == list(np.argsort(-many_for(model, docs)))


def many_for(model, docs):
    return np.asarray(model.predict([("what is a cat", d) for d in docs]), dtype=np.float64)


def test_margins_and_rank_on_full_precision(tiny, tmp_path):
    # Margins 20 and 25: float32 probabilities are both exactly 1.0, the float64 ones and margins are not.
    ranker = ranker_for(tiny, store=tmp_path / "s.sqlite")
    stored = {"sure": (20.0, 0.0), "surer": (25.0, 0.0), "fallback": None}
    skey = ranker.store.register_settings(ranker.settings())
    for doc, logits in stored.items():
        j = (Judgement(0.5, "fallback", "", 0, 9, None, None, False) if logits is None
             else Judgement(score(*logits), "answered", "", 3, 9, logits[0], logits[1], False))
        ranker.store.put_many(skey, [(pair_key("q", doc), j)])
    docs = list(stored)
    assert ranker.predict([("q", d) for d in docs])[:2].tolist() == [1.0, 1.0]  # float32, as CrossEncoder
    assert ranker.predict([("q", d) for d in docs], activation_fn=torch.nn.Identity()).tolist() == [20.0, 25.0, 0.0]
    hits = ranker.rank("q", docs)
    assert [h["corpus_id"] for h in hits] == [1, 0, 2]
    assert hits[0]["score"] == score(25.0, 0.0) and hits[0]["score"] > hits[1]["score"]
    # The CLI's order of the same judgements (pipeline.reranked_run) is the same.
    items = [pipeline.Item("q1", d, "q", d, None, i + 1, 0.0) for i, d in enumerate(docs)]
    found = ranker.judge([("q", d) for d in docs])
    run = pipeline.reranked_run(items, {("q1", d): j for d, j in zip(docs, found)})
    assert [d for d, _ in run["q1"]] == [docs[h["corpus_id"]] for h in hits]
    assert [h["corpus_id"] for h in ranker.rank("q", docs, activation_fn=torch.nn.Identity())] == [1, 0, 2]


# ---------------------------------------------------------------------------------------------- the store


def test_store_reused_by_judge_predict_rank_and_the_cli_keys(tiny, tmp_path, monkeypatch):
    path = tmp_path / "judgements.sqlite"
    pairs = [("how do cats purr", "Cats purr by vibrating.", "be strict"), ("best oven", "A deck oven.", None)]
    first = ranker_for(tiny, store=path, dataset_prompt="Find: FILL_QUERY_HERE").judge(pairs)
    again = ranker_for(tiny, store=path, dataset_prompt="Find: FILL_QUERY_HERE")

    def fail(*a, **k):
        raise AssertionError("judged again")

    monkeypatch.setattr(again, "judge_iter", fail)
    assert again.judge(pairs) == first
    assert again.predict(pairs).tolist() == np.array([j.score for j in first], dtype=np.float32).tolist()
    assert again.rank("how do cats purr", ["Cats purr by vibrating."], instruction="be strict")[0]["score"] == first[0].score
    # The CLI's key for the same pairs finds them too: pipeline.judge_items judges nothing.
    items = [pipeline.Item(f"q{i}", f"d{i}", q, p, ins, 1, 1.0) for i, (q, p, ins) in enumerate(pairs)]
    with JudgementStore(path) as store:
        result = pipeline.judge_items(again, items, store, shard=pipeline.Shard())
        assert pipeline.item_key(again, items[0]) == pair_key(query_text(*pairs[0][::2], "Find: FILL_QUERY_HERE"),
                                                             pairs[0][1])
    assert (result.summary.reused, result.summary.judged_now) == (2, 0)
    # Another dataset prompt is other settings: nothing is reused.
    other = ranker_for(tiny, store=path)
    monkeypatch.setattr(other, "judge_iter", fail)
    with pytest.raises(AssertionError, match="judged again"):
        other.judge(pairs)


def test_store_behind_the_dropin_and_the_mteb_adapter(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "s.sqlite"
    pairs = make_pairs(3, seed=4)
    dropin = rank1.from_model(model, tok, max_output_tokens=6, context_size=512, device="cpu", store=str(path))
    scores = dropin.predict(pairs)
    with JudgementStore(path) as store:
        assert store.count(settings_key(dropin.ranker.settings())) == 3
    pytest.importorskip("mteb", reason="the mteb adapter needs mteb (the [mteb] extra)")
    from rank1_hf.mteb import Rank1CrossEncoder

    adapter = Rank1CrossEncoder.from_ranker(dropin.ranker)
    adapter.ranker.judge_iter = None  # everything must come from the store  # type: ignore[assignment]
    queries = [{"text": [q for q, _ in pairs]}]
    documents = [{"text": [p for _, p in pairs]}]
    task = type("Meta", (), {"name": "NoSuchTask"})()
    got = adapter.predict(queries, documents, task_metadata=task, hf_split="test", hf_subset="default")
    assert got.tolist() == np.asarray(scores, dtype=np.float32).tolist()


CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
from rank1_hf.testing import qwen_tokenizer, tiny_model
from rank1_hf.ranker import Rank1
from conftest import make_pairs
tok = qwen_tokenizer()
ranker = Rank1.from_model(tiny_model(tok), tok, max_new_tokens=24, context_size=512, batch_size=1,
                          engine="generate", store=sys.argv[2])
print("ready", flush=True)
ranker.judge(make_pairs(int(sys.argv[3]), seed=7))
print("done", flush=True)
"""


def test_kill_9_then_resume_matches_an_uninterrupted_run(tiny, tmp_path):
    path, n = tmp_path / "s.sqlite", 30
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(REPO), str(path), str(n)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready", child.stderr.read()
        model, tok = tiny
        keyed = Rank1.from_model(model, tok, max_new_tokens=24, context_size=512, batch_size=1, engine="generate")
        skey = settings_key(keyed.settings())
        deadline = time.monotonic() + 240
        done = 0
        while done < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
            if path.exists():
                with JudgementStore(path) as store:
                    done = store.count(skey)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        child.kill()
        child.communicate()
    assert 3 <= done < n, "the child should have been killed half-way"
    pairs = make_pairs(n, seed=7)
    resumed = Rank1.from_model(model, tok, max_new_tokens=24, context_size=512, batch_size=4, store=path)
    judged = []
    real = resumed.judge_iter
    resumed.judge_iter = lambda p, **kw: (judged.append(len(p)), real(p, **kw))[1]  # type: ignore[method-assign]
    got = resumed.judge(pairs)
    with JudgementStore(path) as store:
        kept = store.count(skey)
    assert judged and judged[0] <= n - done and kept == n
    expected = keyed.judge(pairs)
    assert [(j.reasoning, j.outcome) for j in got] == [(j.reasoning, j.outcome) for j in expected]
    assert max(abs(a.score - b.score) for a, b in zip(got, expected)) <= 1e-4


# ---------------------------------------------------------------------------------------------- logging


def test_logging_truncation_forced_store_engine_and_oom(tiny, tmp_path, caplog):
    model, tok = tiny
    caplog.set_level(logging.DEBUG, logger="rank1_hf")
    long_passage = " ".join(["bread"] * 400)
    ranker = Rank1.from_model(model, tok, max_new_tokens=6, context_size=300, batch_size=4, store=tmp_path / "s")
    ranker.judge([("oven", long_passage), ("cat", "felines")])
    messages = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert any(m.startswith("engine: ") for _, _, m in messages)
    assert ("rank1_hf.judging", logging.WARNING,
            "1 of 2 passages were cut to fit context_size=300 (the passage only; the template stays whole)") in messages
    assert any("pair 0: passage cut" in m for _, _, m in messages)
    assert any("did not close </think>" in m and "reached max_new_tokens=6" in m for _, _, m in messages)
    caplog.clear()
    ranker.judge([("cat", "felines")])
    assert [r.getMessage() for r in caplog.records] == [f"judgement store {tmp_path / 's'}: 1 of 1 pairs reused"]
    assert all(r.name.startswith("rank1_hf") for r in caplog.records)
    caplog.clear()

    def oom(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[0] > 1 and not hook.fired:
            hook.fired = True
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    hook = model.register_forward_pre_hook(oom, with_kwargs=True)
    hook.fired = False
    try:
        Rank1.from_model(model, tok, max_new_tokens=6, context_size=512, batch_size=4).judge(make_pairs(4, seed=9))
    finally:
        hook.remove()
    assert any(r.levelno == logging.WARNING and "out-of-memory retries" in r.getMessage() for r in caplog.records)


def test_importing_rank1_hf_prints_nothing():
    code = "import rank1_hf, rank1_hf.io.formats, rank1_hf.pipeline, rank1_hf.io.store, rank1_hf.io.evaluate, rank1_hf.cli"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == "" and out.stderr == ""
