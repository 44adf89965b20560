"""``rank1-hf serve`` as a real process on 127.0.0.1, spoken to by real clients: the Cohere SDK (v1 and v2),
LangChain's CohereRerank, LlamaIndex's TEI postprocessor and raw HTTP (vLLM's, Infinity's and TEI's bodies,
/score, Cohere's rank_fields). Every expected score comes from a Rank1 on the same weights in this
process. Then what the server says about itself (/v1/models, /info, headers), auth, bad input, the queue
limit, a client that disconnects, start-up checks, SIGTERM, and kill -9 with a restart on the same store."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import threading
import time

import httpx
import pytest
import torch
from conftest import make_pairs
from server_process import Server, save_tiny_model

from rank1_hf import Rank1
from rank1_hf.dataset_prompts import resolve_dataset_prompt

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytestmark = pytest.mark.server

KEY = "test-key-22"
AUTH = {"Authorization": f"Bearer {KEY}"}
OPTIONS = {"max_new_tokens": 48, "context_size": 4096}
FLAGS = ["--max-new-tokens", "48", "--context-size", "4096", "--batch-size", "8"]
SLOW = {"max_new_tokens": 160, "context_size": 4096}  # every row reasons to the cap: ~1.3 s a pair, batch 1
SLOW_FLAGS = ["--max-new-tokens", "160", "--context-size", "4096", "--batch-size", "1"]
QUERY = "cat law river"
DOCS = [p for _, p in make_pairs(6, seed=22, max_words=20)]
TOL = 1e-4  # batches differ between the server and the reference, so float rounding may


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"planted": save_tiny_model(root / "planted", seed=0), "slow": save_tiny_model(root / "slow", 1, False)}


@pytest.fixture(scope="module")
def reference(models):
    """The library's judgements on the server's weights and options."""
    ranker = Rank1(str(models["planted"]), **OPTIONS)
    yield ranker
    ranker.close()


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    s = Server(models["planted"], [*FLAGS, "--api-key", KEY, "--max-documents", "8", "--max-body-bytes", "20000"],
               tmp_path_factory.mktemp("log") / "server.log").wait_healthy()
    yield s
    s.stop()


def expected(reference, query, docs, instruction=None, dataset_prompt=None):
    return reference.judge([(query, d, instruction) for d in docs], dataset_prompt=dataset_prompt)


def ranked(judgements, key=lambda j: j.score):
    """(index, value) best first, as the library orders them (ties by index)."""
    return sorted(((i, key(j)) for i, j in enumerate(judgements)), key=lambda t: (-t[1], t[0]))


def assert_ranked(got, want):
    assert [i for i, _ in got] == [i for i, _ in want], (got, want)
    assert max(abs(a - b) for (_, a), (_, b) in zip(got, want)) <= TOL


# ---------------------------------------------------------------------------------------------- real clients


def test_cohere_client_v2(server, reference):
    import cohere

    client = cohere.ClientV2(api_key=KEY, base_url=server.url)
    response = client.rerank(model="rank1", query=QUERY, documents=DOCS, top_n=4)
    want = ranked(expected(reference, QUERY, DOCS))[:4]
    assert_ranked([(r.index, r.relevance_score) for r in response.results], want)
    assert response.id and response.meta.billed_units.search_units == 1


def test_concurrent_cohere_clients_each_get_their_own_ranking(server, reference):
    """8 Cohere SDK clients in threads at once, each with its own query and documents: each gets exactly
    the library's ranking of its own pairs (their pairs share the server's decode steps)."""
    import cohere
    from concurrent.futures import ThreadPoolExecutor

    pairs = make_pairs(8 * 3, seed=31, max_words=20)
    asks = [(pairs[3 * k][0], [p for _, p in pairs[3 * k : 3 * k + 3]]) for k in range(8)]

    def ask(query_docs):
        query, docs = query_docs
        client = cohere.ClientV2(api_key=KEY, base_url=server.url)
        return client.rerank(model="rank1", query=query, documents=docs)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(ask, asks, timeout=120))
    for (query, docs), response in zip(asks, responses):
        assert_ranked([(r.index, r.relevance_score) for r in response.results],
                      ranked(expected(reference, query, docs)))


def test_cohere_client_v1_with_records_and_documents(server, reference):
    import cohere

    client = cohere.Client(api_key=KEY, base_url=server.url)
    documents = [DOCS[0], {"text": DOCS[1]}, DOCS[2]]
    response = client.rerank(model="rank1", query=QUERY, documents=documents, return_documents=True, top_n=2)
    want = ranked(expected(reference, QUERY, DOCS[:3]))[:2]
    assert_ranked([(r.index, r.relevance_score) for r in response.results], want)
    assert [r.document.text for r in response.results] == [DOCS[i] for i, _ in want]


def test_langchain_cohere_rerank_given_a_client(server, reference):
    import cohere
    from langchain_cohere import CohereRerank
    from langchain_core.documents import Document

    reranker = CohereRerank(client=cohere.ClientV2(api_key=KEY, base_url=server.url), model="rank1", top_n=3)
    out = reranker.compress_documents([Document(page_content=d, metadata={"n": i}) for i, d in enumerate(DOCS)], QUERY)
    want = ranked(expected(reference, QUERY, DOCS))[:3]
    assert_ranked([(d.metadata["n"], d.metadata["relevance_score"]) for d in out], want)


def test_llamaindex_tei_rerank(server, reference):
    from llama_index.core.schema import NodeWithScore, TextNode
    from llama_index.postprocessor.tei_rerank import TextEmbeddingInference

    reranker = TextEmbeddingInference(base_url=server.url, auth_token=f"Bearer {KEY}", top_n=3)
    nodes = [NodeWithScore(node=TextNode(text=d, id_=str(i)), score=0.0) for i, d in enumerate(DOCS)]
    out = reranker.postprocess_nodes(nodes, query_str=QUERY)
    want = ranked(expected(reference, QUERY, DOCS))[:3]
    assert_ranked([(int(n.node.id_), n.score) for n in out], want)


def test_raw_http_every_route_with_rank1s_fields(server, reference):
    instruction, prompt = "Prefer passages about animals.", "SciFact"
    want = expected(reference, QUERY, DOCS, instruction, resolve_dataset_prompt(prompt))
    common = {"query": QUERY, "instruction": instruction, "dataset_prompt": prompt, "return_reasoning": True}
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as http:
        v2 = http.post("/v2/rerank", json={**common, "model": "rank1", "documents": DOCS}).json()
        v1 = http.post("/v1/rerank", json={**common, "documents": [{"text": d} for d in DOCS]}).json()
        tei = http.post("/rerank", json={**common, "texts": DOCS, "raw_scores": True, "return_text": True}).json()
    assert_ranked([(r["index"], r["relevance_score"]) for r in v2["results"]], ranked(want))
    assert_ranked([(r["index"], r["relevance_score"]) for r in v1["results"]], ranked(want))
    assert v1["usage"]["total_tokens"] == sum(j.prompt_tokens + j.reasoning_tokens for j in want)
    margins = ranked(want, key=lambda j: j.true_logit - j.false_logit)
    assert_ranked([(r["index"], r["score"]) for r in tei], margins)
    assert [r["text"] for r in tei] == [DOCS[i] for i, _ in margins]
    for result in v2["results"] + v1["results"] + tei:
        j = want[result["index"]]
        assert (result["reasoning"], result["outcome"], result["reasoning_tokens"]) == (
            j.reasoning, j.outcome, j.reasoning_tokens)


def test_a_template_dataset_prompt_and_max_tokens_per_doc(server, reference):
    template = "Find evidence for: FILL_QUERY_HERE"
    tok = reference.tokenizer
    cut = []
    for d in DOCS:  # the first 5 tokens of each document, cut at a token boundary
        ends = [e for _, e in tok(d, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
        cut.append(d if len(ends) <= 5 else d[: ends[4]])
    assert cut != DOCS
    want = ranked(expected(reference, QUERY, cut, dataset_prompt=template))
    body = {"model": "rank1", "query": QUERY, "documents": DOCS, "max_tokens_per_doc": 5, "dataset_prompt": template}
    got = httpx.post(server.url + "/v2/rerank", json=body, headers=AUTH, timeout=60).json()
    assert_ranked([(r["index"], r["relevance_score"]) for r in got["results"]], want)


def test_vllm_and_infinity_shaped_rerank_bodies_on_rerank(server, reference):
    """POST /rerank with documents (vLLM's, Infinity's, Jina's body) gets the library's scores and order,
    answered as vLLM answers; before, only TEI's texts were accepted (422 "texts: Field required")."""
    want = expected(reference, QUERY, DOCS)
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as http:
        vllm = http.post("/rerank", json={"model": "rank1", "query": QUERY, "documents": DOCS, "top_n": 0}).json()
        infinity = http.post("/rerank", json={"query": QUERY, "documents": [{"text": d} for d in DOCS], "top_n": 2,
                                              "return_documents": False, "model": "rank1"}).json()
    assert_ranked([(r["index"], r["relevance_score"]) for r in vllm["results"]], ranked(want))  # top_n 0: all
    assert [r["document"]["text"] for r in vllm["results"]] == [DOCS[i] for i, _ in ranked(want)]
    assert vllm["id"] and vllm["model"] == str(server.model)
    assert vllm["usage"] == {"prompt_tokens": sum(j.prompt_tokens for j in want),
                             "total_tokens": sum(j.prompt_tokens + j.reasoning_tokens for j in want)}
    assert_ranked([(r["index"], r["relevance_score"]) for r in infinity["results"]], ranked(want)[:2])
    assert all("document" not in r for r in infinity["results"]) and infinity["object"] == "rerank"


@pytest.mark.parametrize("body,message", [
    ({"query": QUERY, "texts": DOCS[:1], "documents": DOCS[:1]}, "not both"),
    ({"query": QUERY}, "texts: Field required"),
    ({"query": QUERY, "documents": []}, "documents"),
])
def test_rerank_wants_texts_or_documents(server, body, message):
    r = httpx.post(server.url + "/rerank", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 422 and message in r.json()["message"], r.text


def test_score_pairs_text_1_with_text_2(server, reference):
    """vLLM's /score and /v1/score: one query with every document, or one query per document; data in
    input order."""
    queries = ["cat law", "river town", "old law"]
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as http:
        one = http.post("/score", json={"model": "rank1", "text_1": QUERY, "text_2": DOCS[:3]}).json()
        each = http.post("/v1/score", json={"text_1": queries, "text_2": DOCS[:3]}).json()
        bad = http.post("/score", json={"text_1": queries[:2], "text_2": DOCS[:3]})
    for got, want in ((one, expected(reference, QUERY, DOCS[:3])),
                      (each, reference.judge(list(zip(queries, DOCS[:3]))))):
        assert [d["index"] for d in got["data"]] == [0, 1, 2] and got["object"] == "list"
        assert all(d["object"] == "score" for d in got["data"])
        assert max(abs(d["score"] - j.score) for d, j in zip(got["data"], want)) <= TOL
    assert bad.status_code == 422 and "text_1" in bad.json()["message"]


def test_cohere_v1_rank_fields_judge_the_named_fields(server, reference):
    """rank_fields: each record is judged on its named fields, in that order, as 'field: value' lines."""
    records = [{"title": f"T{i}", "text": d, "year": 2000 + i} for i, d in enumerate(DOCS[:3])]
    body = {"query": QUERY, "documents": records, "rank_fields": ["year", "text"], "return_documents": True}
    got = httpx.post(server.url + "/v1/rerank", json=body, headers=AUTH, timeout=60).json()
    want = expected(reference, QUERY, [f"year: {r['year']}\ntext: {r['text']}" for r in records])
    assert_ranked([(r["index"], r["relevance_score"]) for r in got["results"]], ranked(want))
    assert [r["document"] for r in got["results"]] == [records[i] for i, _ in ranked(want)]  # as given
    r = httpx.post(server.url + "/v1/rerank", json={**body, "rank_fields": ["author"]}, headers=AUTH, timeout=30)
    assert r.status_code == 422 and "documents.0" in r.json()["message"] and "author" in r.json()["message"]


def test_tei_truncate_false_refuses_a_pair_that_would_be_cut(server):
    """TEI's truncate: false refuses (413) a pair too long for the context instead of cutting it silently;
    true or absent cuts the passage."""
    long_text = "law " * 4100  # more than context_size - max_new_tokens = 4048 tokens
    body = {"query": QUERY, "texts": [DOCS[0], long_text]}
    refused = httpx.post(server.url + "/rerank", json={**body, "truncate": False}, headers=AUTH, timeout=60)
    assert refused.status_code == 413 and "texts.1" in refused.json()["message"], refused.text
    assert httpx.post(server.url + "/rerank", json={"query": QUERY, "texts": [DOCS[0]], "truncate": False},
                      headers=AUTH, timeout=60).status_code == 200
    assert httpx.post(server.url + "/rerank", json={**body, "truncate": True}, headers=AUTH,
                      timeout=120).status_code == 200


def test_truncate_prompt_tokens_cuts_the_passage_to_fit(server, models):
    """vLLM's truncate_prompt_tokens: every prompt cut to N tokens (the passage only), as a ranker whose
    context leaves N prompt tokens cuts it."""
    limit = 40  # the prompts run 36..45 tokens; the template alone 33
    with Rank1(str(models["planted"]), max_new_tokens=48, context_size=48 + limit) as short:
        want = short.judge([(QUERY, d) for d in DOCS])
    assert any(j.truncated for j in want) and all(j.prompt_tokens <= limit for j in want)
    body = {"query": QUERY, "documents": DOCS, "truncate_prompt_tokens": limit, "return_documents": False}
    got = httpx.post(server.url + "/v2/rerank", json={**body, "model": "rank1"}, headers=AUTH, timeout=60).json()
    assert_ranked([(r["index"], r["relevance_score"]) for r in got["results"]], ranked(want))
    r = httpx.post(server.url + "/rerank", json={**body, "truncate_prompt_tokens": 20}, headers=AUTH, timeout=60)
    assert r.status_code == 422 and "truncate_prompt_tokens" in r.json()["message"]


def test_gateways_learn_what_the_server_is(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:
        models = http.get("/v1/models").json()
        infinity = http.get("/models").json()
        info = http.get("/info").json()
    assert models["object"] == "list" and infinity == models
    assert [(m["id"], m["object"]) for m in models["data"]] == [(str(server.model), "model")]
    assert isinstance(models["data"][0]["created"], int) and models["data"][0]["owned_by"]
    assert info["model_id"] == str(server.model) and "reranker" in info["model_type"]
    assert info["max_input_length"] == 4096 - 48 and info["max_client_batch_size"] == 8
    assert info["version"]


def test_timing_headers_and_the_request_id(server):
    body = {"model": "rank1", "query": "headers", "documents": DOCS[:2]}
    r = httpx.post(server.url + "/v2/rerank", json=body, headers={**AUTH, "x-request-id": "abc-123"}, timeout=60)
    assert r.headers["x-request-id"] == "abc-123" and r.json()["id"] == "abc-123"
    times = {k: int(r.headers[f"x-{k}-time"]) for k in ("queue", "inference", "compute", "total")}
    assert 0 <= times["queue"] <= times["compute"] <= times["total"] and times["inference"] <= times["compute"]
    assert times["inference"] > 0  # two pairs reasoned
    fresh = httpx.get(server.url + "/health", timeout=10)
    assert len(fresh.headers["x-request-id"]) >= 16 and "x-total-time" in fresh.headers
    odd = httpx.get(server.url + "/health", headers={"x-request-id": "a b\tc"}, timeout=10)
    assert odd.headers["x-request-id"] != "a b\tc"  # not echoed into a header: a fresh id


def test_404_and_405_answer_the_message_shape(server):
    missing = httpx.post(server.url + "/v3/rerank", json={}, headers=AUTH, timeout=10)
    wrong = httpx.get(server.url + "/v2/rerank", headers=AUTH, timeout=10)
    assert missing.status_code == 404 and "/v3/rerank" in missing.json()["message"]
    assert wrong.status_code == 405 and "GET" in wrong.json()["message"] and "POST" in wrong.headers["allow"]


TEXT_FIELDS = [  # (route, body with BAD where the text goes, the field the 422 names)
    ("/v2/rerank", {"model": "m", "query": "BAD", "documents": ["ok"]}, "query"),
    ("/v2/rerank", {"model": "m", "query": "q", "documents": ["ok", "BAD"]}, "documents.1"),
    ("/v2/rerank", {"model": "m", "query": "q", "documents": ["ok"], "instruction": "BAD"}, "instruction"),
    ("/v1/rerank", {"query": "q", "documents": [{"text": "BAD"}]}, "documents.0"),
    ("/v1/rerank", {"query": "q", "documents": [{"text": "ok", "meta": ["BAD"]}], "rank_fields": ["text"]},
     "documents.0"),
    ("/rerank", {"query": "q", "texts": ["BAD"]}, "texts.0"),
    ("/rerank", {"query": "q", "documents": ["BAD"]}, "documents.0"),
    ("/score", {"text_1": "q", "text_2": ["ok", "BAD"]}, "text_2"),
    ("/v2/rerank", {"model": "m", "query": "q", "documents": ["ok"], "dataset_prompt": "FILL_QUERY_HERE BAD"},
     "dataset_prompt"),
]


@pytest.mark.parametrize("bad", ["\\ud800", "a\\udfffb", "\\udc00\\ud800"])
@pytest.mark.parametrize("path,body,field", TEXT_FIELDS, ids=[f"{p}-{f}" for p, _, f in TEXT_FIELDS])
def test_text_the_tokenizer_cannot_encode_is_a_422_naming_the_field(server, path, body, field, bad):
    """A lone surrogate sent as a JSON escape decodes to a str the tokenizer refuses (it raised a TypeError:
    a 500); it is a 422 that names the field, and the server lives on."""
    raw = json.dumps(body).replace("BAD", bad).encode()
    r = httpx.post(server.url + path, content=raw, headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 422, r.text
    assert field in r.json()["message"] and "Unicode" in r.json()["message"], r.text
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_unusual_text_the_tokenizer_takes_is_judged(server):
    """Control characters, NUL, zero-width and private-use characters, combining marks, special-token text:
    judged like any other text."""
    docs = ["\x00\x01\x1b[31m bell\x07", "\u200b\ufeff\U0010ffff\uffff", "e\u0301" * 20,
            "<|endoftext|></think> true", "\u202e RTL \u05d0\u05d1"]
    r = httpx.post(server.url + "/rerank", json={"query": "q\x00", "texts": docs}, headers=AUTH, timeout=60)
    assert r.status_code == 200 and sorted(x["index"] for x in r.json()) == list(range(len(docs))), r.text


# ---------------------------------------------------------------------------------------------- auth


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"},
                                     {"Authorization": "Bearer"},  # an empty token (h11 strips a trailing space)
                                     {"Authorization": f"Bearer {KEY[:-1]}"}, {"Authorization": f"Bearer {KEY[:1]}"}],
                         ids=["none", "wrong", "no-scheme", "basic", "longer", "empty", "prefix",
                              "first-char"])
def test_requests_without_the_key_get_401(server, headers):
    body = {"model": "rank1", "query": QUERY, "documents": DOCS[:1]}
    for path in ("/v2/rerank", "/v1/rerank", "/rerank", "/score", "/metrics", "/v1/models", "/info"):
        get = path in ("/metrics", "/v1/models", "/info")
        r = httpx.request("GET" if get else "POST", server.url + path, json=None if get else body, headers=headers,
                          timeout=30)
        assert r.status_code == 401, (path, r.text)
        assert "API key" in r.json()["message"]
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200  # the probe stays open
    assert httpx.post(server.url + "/v2/rerank", json=body, headers=AUTH, timeout=60).status_code == 200


def test_the_api_key_comes_from_the_environment(models, tmp_path):
    s = Server(models["planted"], FLAGS, tmp_path / "log", env={"RANK1_HF_API_KEY": "from-env"}).wait_healthy()
    try:
        body = {"query": QUERY, "texts": DOCS[:1]}
        assert httpx.post(s.url + "/rerank", json=body, timeout=60).status_code == 401
        ok = httpx.post(s.url + "/rerank", json=body, headers={"Authorization": "Bearer from-env"}, timeout=60)
        assert ok.status_code == 200
        assert f"http://127.0.0.1:{s.port}" in s.log.read_text()  # the default bind: this machine only
    finally:
        s.stop()


# ---------------------------------------------------------------------------------------------- bad input

V2 = {"model": "rank1", "query": QUERY, "documents": DOCS[:2]}
BAD = [
    ("/v2/rerank", b"{not json", 400, "invalid JSON"),
    ("/v2/rerank", b"", 422, "Field required"),
    ("/v2/rerank", json.dumps([1, 2]).encode(), 422, "dictionary"),
    ("/v2/rerank", {**V2, "query": None}, 422, "query"),
    ("/v2/rerank", {k: v for k, v in V2.items() if k != "query"}, 422, "query: Field required"),
    ("/v2/rerank", {**V2, "query": "  "}, 422, "query must not be empty"),
    ("/v2/rerank", {k: v for k, v in V2.items() if k != "documents"}, 422, "documents: Field required"),
    ("/v2/rerank", {**V2, "documents": []}, 422, "documents"),
    ("/v2/rerank", {**V2, "documents": "one string"}, 422, "documents"),
    ("/v2/rerank", {**V2, "documents": [1, 2]}, 422, "documents.0"),
    ("/v2/rerank", {**V2, "documents": [{"text": "a record"}]}, 422, "documents.0"),  # v2 takes strings only
    ("/v2/rerank", {**V2, "top_n": 0}, 422, "top_n"),
    ("/v2/rerank", {**V2, "top_n": "2"}, 422, "top_n"),
    ("/v2/rerank", {**V2, "max_tokens_per_doc": 0}, 422, "max_tokens_per_doc"),
    ("/v2/rerank", {**V2, "dataset_prompt": "no such dataset"}, 422, "unknown dataset prompt"),
    ("/v2/rerank", {**V2, "documents": ["x"] * 9}, 413, "--max-documents"),
    ("/v2/rerank", {**V2, "documents": ["x" * 30000]}, 413, "--max-body-bytes"),
    ("/v1/rerank", {"query": QUERY, "documents": [{"title": "no text"}]}, 422, "documents.0"),
    ("/v1/rerank", {"query": QUERY, "documents": [None]}, 422, "documents.0"),
    ("/v1/rerank", {"query": QUERY, "documents": DOCS[:1], "top_n": -1}, 422, "top_n"),
    ("/rerank", {"query": QUERY}, 422, "texts: Field required"),
    ("/rerank", {"query": "", "texts": ["a"]}, 422, "query must not be empty"),
    ("/rerank", {"texts": ["a"]}, 422, "query: Field required"),
    ("/rerank", {"query": QUERY, "texts": {"a": 1}}, 422, "texts"),
]


@pytest.mark.parametrize("path,body,status,message", BAD, ids=[f"{p}-{m}-{i}" for i, (p, _, _, m) in enumerate(BAD)])
def test_bad_input_gets_a_4xx_json_message_and_the_server_lives(server, path, body, status, message):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content, headers={**AUTH, "Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == status, r.text
    assert message in r.json()["message"]
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_a_chunked_body_over_the_limit_gets_413(server):
    def chunks():
        for _ in range(30):
            yield b" " * 1000  # 30 kB of JSON whitespace, no Content-Length

    r = httpx.post(server.url + "/v2/rerank", content=chunks(), headers={**AUTH, "Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == 413 and "--max-body-bytes" in r.json()["message"]


def test_a_body_of_exactly_max_body_bytes_is_accepted_and_one_more_byte_is_not(server):
    body = json.dumps({"query": QUERY, "texts": DOCS[:1]}).encode()
    exact = body[:-1] + b" " * (20000 - len(body)) + b"}"  # JSON whitespace up to the limit
    assert len(exact) == 20000
    for content, status in ((exact, 200), (exact[:-1] + b" }", 413)):
        r = httpx.post(server.url + "/rerank", content=content, timeout=60,
                       headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == status, (len(content), r.text)


def test_a_form_body_is_told_to_send_json(server):
    r = httpx.post(server.url + "/v2/rerank", content=b"query=x", timeout=30,
                   headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and "application/json" in r.json()["message"]


# ---------------------------------------------------------------------------------------------- metrics


def test_metrics_count_requests_pairs_reuse_and_latency(server):
    before = server.metrics(AUTH)
    body = {"query": "a fresh query for the metrics", "texts": [DOCS[0], DOCS[1], DOCS[0]]}  # one repeated
    assert httpx.post(server.url + "/rerank", json=body, headers=AUTH, timeout=60).status_code == 200
    text = httpx.get(server.url + "/metrics", headers=AUTH, timeout=10).text
    after = server.metrics(AUTH)
    assert after["rank1_pairs_judged_total"] - before["rank1_pairs_judged_total"] == 2
    assert after["rank1_pairs_reused_total"] - before["rank1_pairs_reused_total"] == 1
    assert after["rank1_generated_tokens_total"] > before["rank1_generated_tokens_total"]
    assert after["rank1_pairs_queued"] == 0
    assert 'rank1_requests_total{route="/rerank",status="200"}' in text
    assert 'rank1_request_duration_seconds_bucket{le="+Inf",route="/rerank"}' in text
    assert httpx.get(server.url + "/docs", timeout=10).status_code == 200
    assert "/v2/rerank" in httpx.get(server.url + "/openapi.json", timeout=10).json()["paths"]


# ---------------------------------------------------------------------------------------------- queue, disconnect


@pytest.fixture(scope="module")
def slow_server(models, tmp_path_factory):
    s = Server(models["slow"], [*SLOW_FLAGS, "--max-queued-pairs", "4", "--max-documents", "4"],
               tmp_path_factory.mktemp("log") / "slow.log").wait_healthy()
    yield s
    s.stop()


def post_in_thread(url, body, timeout=120.0):
    box = {}

    def run():
        try:
            box["response"] = httpx.post(url, json=body, timeout=timeout)
        except Exception as error:  # noqa: BLE001 - looked at by the test
            box["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def test_a_full_queue_gets_503_with_retry_after(slow_server):
    thread, box = post_in_thread(slow_server.url + "/rerank", {"query": "queue", "texts": DOCS[:4]})
    slow_server.wait_for(lambda m: m["rank1_pairs_queued"] == 4, 30)
    r = httpx.post(slow_server.url + "/rerank", json={"query": "queue", "texts": DOCS[4:5]}, timeout=30)
    assert r.status_code == 503, r.text
    assert r.headers["Retry-After"] == "1" and "queue full" in r.json()["message"]
    thread.join(60)
    assert box["response"].status_code == 200 and len(box["response"].json()) == 4
    assert httpx.post(slow_server.url + "/rerank", json={"query": "queue", "texts": DOCS[4:5]},
                      timeout=60).status_code == 200


def test_a_client_that_disconnects_frees_its_waiting_pairs(slow_server):
    before = slow_server.metrics()
    body = json.dumps({"query": "gone", "texts": DOCS[:4]}).encode()
    with socket.create_connection(("127.0.0.1", slow_server.port), timeout=10) as sock:
        sock.sendall(b"POST /rerank HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        slow_server.wait_for(lambda m: m["rank1_engine_pending_prompts"] == 4, 30)
    started = time.monotonic()
    after = slow_server.wait_for(lambda m: m["rank1_engine_pending_prompts"] == 0 and m["rank1_pairs_queued"] == 0, 3)
    assert time.monotonic() - started < 3  # judging all four would take ~5 s
    assert after["rank1_pairs_judged_total"] - before["rank1_pairs_judged_total"] <= 1  # at most the one in flight


# ---------------------------------------------------------------------------------------------- stopping


def stored(path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0
    finally:
        db.close()  # sqlite3's own context manager commits but leaves the connection (and a WAL) open


def test_sigterm_finishes_what_is_in_flight_flushes_the_store_and_exits_0(models, tmp_path):
    store = tmp_path / "s.sqlite"
    s = Server(models["slow"], [*SLOW_FLAGS, "--store", str(store)], tmp_path / "log").wait_healthy()
    try:
        thread, box = post_in_thread(s.url + "/v2/rerank", {"query": "term", "documents": DOCS[:3]})
        s.wait_for(lambda m: m["rank1_pairs_queued"] == 3, 30)
        s.signal(signal.SIGTERM)
        assert s.wait_exit(60) == 0, s.log.read_text()
        thread.join(10)
        assert box["response"].status_code == 200 and len(box["response"].json()["results"]) == 3
        assert not (tmp_path / "s.sqlite-wal").exists()  # the store was closed: its WAL folded back in
        assert stored(store) == 3
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/health", timeout=5)
    finally:
        s.stop()


def test_kill_9_then_a_restart_reuses_every_committed_judgement(models, tmp_path):
    store = tmp_path / "s.sqlite"
    docs = DOCS[:5]
    s = Server(models["slow"], [*SLOW_FLAGS, "--store", str(store)], tmp_path / "log1").wait_healthy()
    try:
        thread, box = post_in_thread(s.url + "/v2/rerank", {"query": "kill", "documents": docs})
        deadline = time.monotonic() + 60
        while stored(store) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        s.signal(signal.SIGKILL)
        assert s.wait_exit(30) == -signal.SIGKILL
    finally:
        s.stop()
    thread.join(10)
    assert "response" not in box  # the request died with the server
    committed = stored(store)
    assert 2 <= committed < len(docs)
    again = Server(models["slow"], [*SLOW_FLAGS, "--store", str(store)], tmp_path / "log2").wait_healthy()
    try:
        got = httpx.post(again.url + "/v2/rerank", json={"query": "kill", "documents": docs}, timeout=60).json()
        m = again.metrics()
    finally:
        again.stop()
    assert got["meta"]["rank1"]["pairs_reused"] == committed
    assert m["rank1_pairs_judged_total"] == len(docs) - committed
    assert m["rank1_pairs_reused_total"] == committed  # the store's answers count as reused
    assert stored(store) == len(docs)
    with Rank1(str(models["slow"]), **SLOW) as reference:
        want = ranked(reference.judge([("kill", d) for d in docs]))
    assert_ranked([(r["index"], r["relevance_score"]) for r in got["results"]], want)


@pytest.mark.parametrize("flags,message", [
    (["--max-queued-pairs", "2", "--max-documents", "4"], "max_queued_pairs"),
    (["--max-body-bytes", "0"], "max_body_bytes"),
    (["--port", "70000"], "--port"),
    (["--dataset-prompt", "no such dataset"], "unknown dataset prompt"),
    (["--graceful-timeout", "0"], "--graceful-timeout must be positive"),  # 0 would cancel every request at once
    (["--dtype", "float64"], "--dtype"),
    ([], "--model"),  # the missing folder itself: found in a second, not after transformers' retries
])
def test_bad_serve_flags_fail_before_the_model_loads(flags, message, tmp_path):
    import subprocess
    import sys

    from server_process import ROOT

    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "rank1_hf", "serve", "--model", str(tmp_path / "missing"),
                          "--port", "0", *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and time.monotonic() - start < 20  # no model was loaded


def test_a_busy_port_fails_at_once_before_the_model_loads(tmp_path):
    """The address is bound first: a busy port is a one-line error, exit 2, before the model is looked at
    (the model path here does not exist; loading first would fail on the model, or uvicorn with exit 3
    after the model loaded)."""
    import subprocess
    import sys

    from server_process import ROOT

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "rank1_hf", "serve", "--model", str(tmp_path / "missing"),
                              "--port", str(port)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert time.monotonic() - started < 60


FAILING_WARM_UP = """
import sys, uvicorn
from rank1_hf import Rank1
from rank1_hf.serve import create_app
ranker = Rank1(sys.argv[1], max_new_tokens=8)
def warmup():
    raise RuntimeError("no memory for the KV pool (injected)")
ranker.warmup = warmup
uvicorn.run(create_app(ranker), host="127.0.0.1", port=int(sys.argv[2]))
"""


def test_a_failed_warm_up_is_not_healthy_and_refuses_judging(models, tmp_path):
    """The app on a ranker whose warm-up fails (in a real process): /health says so (503, not ready) and
    judging answers 503 with the reason."""
    s = Server(models["planted"], [], tmp_path / "log", script=FAILING_WARM_UP)
    try:
        deadline = time.monotonic() + 120
        health = None
        while time.monotonic() < deadline and s.process.poll() is None:
            try:
                health = httpx.get(s.url + "/health", timeout=5)
                if health.json()["status"] != "warming up":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert health is not None and health.status_code == 503, s.log.read_text()
        assert health.json()["status"] == "failed" and "injected" in health.json()["message"]
        r = httpx.post(s.url + "/rerank", json={"query": QUERY, "texts": DOCS[:1]}, timeout=30)
        assert r.status_code == 503 and "injected" in r.json()["message"]
    finally:
        s.stop()
