"""A few hundred randomly generated requests against every route of a real ``rank1-hf serve`` process:
wrong types, nesting, sizes, unicode (lone surrogates as JSON escapes, control characters), bodies that
are not JSON. None may be answered 5xx, every 4xx is ``{"message": ...}``, and after them the server is
healthy, its queue empty and its /metrics counts agree with what was sent. Bounded in count and time."""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from server_process import Server, save_tiny_model

pytest.importorskip("fastapi")
pytestmark = pytest.mark.server

REQUESTS = 300
DEADLINE_S = 240.0  # stop sending after this; at least MIN_SENT must have gone
MIN_SENT = 100
JUDGING = ("/v2/rerank", "/v1/rerank", "/rerank", "/score", "/v1/score")
GETS = ("/v1/models", "/models", "/info", "/health", "/metrics", "/openapi.json", "/docs")
STRINGS = ["cat law river", "a", "", " ", "\x00", "q\x1b[31m\x07", "\u200b\ufeff", "e\u0301" * 5, "\U0001F600 ok",
           "\u202e\u05d0", "<|endoftext|>", "</think> true", "FILL_QUERY_HERE", "SciFact", "bright-biology",
           "\uffff\U0010ffff", "word " * 200, "\ud800", "x\udfffy", "\udc00\ud800", "ü" * 40, "null"]
NUMBERS = [0, 1, 2, -1, -2, 3, 10**30, -(10**30), 2**63, 0.5, -0.0, 1e308, float("nan"), float("inf")]


def value(rng: random.Random, depth: int = 0):
    kind = rng.random()
    if kind < 0.35 or depth > 2:
        return rng.choice(STRINGS)
    if kind < 0.55:
        return rng.choice(NUMBERS)
    if kind < 0.65:
        return rng.choice([None, True, False])
    if kind < 0.85:
        return [value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["text", "title", "x", "", "\ud800"]): value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def documents(rng: random.Random):
    return [rng.choice(STRINGS[:17]) if rng.random() < 0.8 else {"text": rng.choice(STRINGS), "title": "t"}
            for _ in range(rng.randint(0, 5))]


def template(rng: random.Random, path: str) -> dict:
    """A body near the route's own shape (often valid), before it is mangled."""
    common = {"instruction": rng.choice(STRINGS), "dataset_prompt": rng.choice(STRINGS + [None] * 4),
              "return_reasoning": rng.random() < 0.5, "model": "rank1"}
    if path in ("/score", "/v1/score"):
        body = {"text_1": rng.choice(STRINGS[:5]), "text_2": [rng.choice(STRINGS) for _ in range(rng.randint(0, 4))]}
    elif path == "/rerank" and rng.random() < 0.5:
        body = {"query": rng.choice(STRINGS), "texts": [rng.choice(STRINGS) for _ in range(rng.randint(0, 4))],
                "truncate": rng.choice([True, False, None]), "raw_scores": rng.random() < 0.5,
                "return_text": rng.random() < 0.5, "truncation_direction": rng.choice(["left", "Right", "up"])}
    else:
        body = {"query": rng.choice(STRINGS), "documents": documents(rng), "top_n": rng.choice(NUMBERS),
                "return_documents": rng.random() < 0.5, "max_tokens_per_doc": rng.choice(NUMBERS),
                "truncate_prompt_tokens": rng.choice(NUMBERS + [None] * 5),
                "rank_fields": rng.choice([None, ["text"], ["title", "text"], [], "text", ["\ud800"]])}
    body.update({k: v for k, v in common.items() if rng.random() < 0.3})
    return body


def mangled(rng: random.Random, body: dict):
    """Keys dropped, values replaced by random JSON, junk keys added; sometimes the body is not an object."""
    if rng.random() < 0.05:
        return value(rng)
    out = {}
    for key, val in body.items():
        roll = rng.random()
        if roll < 0.1:
            continue
        out[key] = value(rng) if roll < 0.3 else val
    if rng.random() < 0.1:
        out[rng.choice(["extra", "texts", "documents", "\ud800"])] = value(rng)
    return out


RAW = [b"", b"{", b"[]", b"null", b"\xff\xfe\x00", b'{"query": "\xc3\x28"}', b"[" * 5000 + b"]" * 5000,
       b'{"query": 1e999999}', b'{"query": "a", "texts": ["b"], "query": 5}', b"\x00" * 100]


GOOD = ["cat law river", "a", "q\x1b[31m\x07", "\u200b\ufeff", "e\u0301" * 5, "\U0001F600 ok", "\u202e\u05d0",
        "<|endoftext|>", "</think> true", "\uffff\U0010ffff", "word " * 200, "ü" * 40]


def valid(rng: random.Random, path: str) -> dict:
    """A body the route accepts (unusual text included), so that some requests are judged."""
    texts = [rng.choice(GOOD) for _ in range(rng.randint(1, 3))]
    if path in ("/score", "/v1/score"):
        return {"text_1": rng.choice(GOOD), "text_2": texts}
    if path == "/rerank" and rng.random() < 0.5:
        return {"query": rng.choice(GOOD), "texts": texts, "raw_scores": rng.random() < 0.5}
    return {"query": rng.choice(GOOD), "documents": texts, "top_n": rng.randint(1, 3)}


def one_request(rng: random.Random) -> tuple[str, str, bytes, dict[str, str]]:
    roll = rng.random()
    if roll > 0.75:
        path = rng.choice(JUDGING)
        return "POST", path, json.dumps(valid(rng, path)).encode(), {"Content-Type": "application/json"}
    if roll < 0.08:
        return rng.choice(["GET", "POST", "DELETE", "PUT"]), rng.choice(GETS + JUDGING + ("/nope", "/v1/x")), b"", {}
    path = rng.choice(JUDGING)
    headers = {"Content-Type": rng.choice(["application/json"] * 8 + ["text/plain", "application/x-www-form-urlencoded"])}
    if roll < 0.15:
        return "POST", path, rng.choice(RAW), headers
    return "POST", path, json.dumps(mangled(rng, template(rng, path))).encode(), headers


def labelled(text: str, name: str) -> dict[tuple[str, str], float]:
    out = {}
    for route, status, val in re.findall(name + r'\{route="([^"]+)",status="(\d+)"\} (\S+)', text):
        out[(route, status)] = float(val)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model = save_tiny_model(root / "model", seed=3)
    s = Server(model, ["--max-new-tokens", "8", "--context-size", "512", "--batch-size", "8", "--max-documents", "4",
                       "--max-body-bytes", "65536", "--log-level", "warning"], root / "server.log").wait_healthy()
    yield s
    s.stop()


def test_random_bodies_never_get_a_5xx_and_the_metrics_stay_consistent(server):
    rng = random.Random(33)
    planned = [one_request(rng) for _ in range(REQUESTS)]
    started = time.monotonic()
    sent: Counter = Counter()  # (route, status) of the judging routes
    failures = []

    def send(request):
        method, path, content, headers = request
        if time.monotonic() - started > DEADLINE_S:
            return None
        with httpx.Client(base_url=server.url, timeout=60) as http:
            r = http.request(method, path, content=content or None, headers=headers)
        return request, r

    with ThreadPoolExecutor(4) as pool:
        for done in pool.map(send, planned):
            if done is None:
                continue
            (method, path, content, _), r = done
            if path in JUDGING:  # every method: /metrics counts them all
                sent[(path, str(r.status_code))] += 1
            if r.status_code >= 500:
                failures.append((method, path, content[:300], r.status_code, r.text[:300]))
            elif r.status_code >= 400:
                assert isinstance(r.json()["message"], str), (path, content[:200], r.text)
    assert not failures, failures[:5]
    print(sorted(sent.items()))
    assert sum(sent.values()) >= MIN_SENT
    assert sent[("/rerank", "200")] + sent[("/v2/rerank", "200")] + sent[("/v1/rerank", "200")] > 0  # some judged

    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    text = httpx.get(server.url + "/metrics", timeout=10).text
    m = server.metrics()
    assert m["rank1_pairs_queued"] == 0 and m["rank1_engine_pending_prompts"] == 0
    assert labelled(text, "rank1_requests_total") == {k: float(v) for k, v in sent.items()}
    assert m["rank1_pairs_judged_total"] <= m["rank1_pairs_requested_total"]
    ok = httpx.post(server.url + "/rerank", json={"query": "cat law", "texts": ["a river", "the law"]}, timeout=60)
    assert ok.status_code == 200 and all(0 <= x["score"] <= 1 for x in ok.json())
