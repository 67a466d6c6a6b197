"""`uniopd serve-teacher` rejects what it should (401, 413, 4xx on malformed and out-of-vocabulary
input) and survives fuzzed request bodies; its scores are the in-process teacher's."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uniopd.cli import main
from uniopd.config import ModelConfig
from uniopd.models.forward import build_layout, response_logprobs
from uniopd.models.loading import load_model
from uniopd.serve.app import build_app
from uniopd.serve.scoring import BatchScorer

KEY = "s3cret"


@pytest.fixture(scope="module")
def loaded(tiny_teacher_dir):
    return load_model(ModelConfig(path=str(tiny_teacher_dir)), trainable=False)


@pytest.fixture(scope="module")
def client(loaded):
    from starlette.testclient import TestClient

    scorer = BatchScorer(loaded, max_batch_tokens=512)
    app = build_app(scorer, model_name="tiny", api_key=KEY, max_body_bytes=4096, max_model_len=64, max_top_k=5)
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def test_health_needs_no_token_but_everything_else_does(client):
    assert client.get("/health", headers={"Authorization": ""}).status_code == 200
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        reply = client.post("/v1/score", json={"sequences": [[5, 6]], "starts": [1]}, headers=headers)
        assert reply.status_code == 401 and reply.json()["type"] == "AuthenticationError"
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"


def test_oversized_bodies_get_413(client):
    big = {"sequences": [[5] * 60] * 40, "starts": [1] * 40}
    reply = client.post("/v1/score", content=json.dumps(big).encode())
    assert reply.status_code == 413 and "over 4096 bytes" in reply.json()["message"]

    def chunks():  # no Content-Length: counted while it streams in
        yield b'{"sequences": ['
        for _ in range(400):
            yield b"[5, 6, 7, 8, 9, 10, 11, 12], "
        yield b"[5, 6]]}"

    assert client.post("/v1/score", content=chunks()).status_code == 413


@pytest.mark.parametrize("body, message", [
    (b"{", "not JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (json.dumps({"sequences": [[5, 6]], "starts": [0]}), "starts[0]: expected an integer in [1, 2]"),
    (json.dumps({"sequences": [[5, 6]], "starts": [1, 1]}), "one start position per sequence"),
    (json.dumps({"sequences": [[5, 100]], "starts": [1]}), "token id 100 is outside the vocabulary [0, 100)"),
    (json.dumps({"sequences": [[5, -1]], "starts": [1]}), "token id -1 is outside the vocabulary"),
    (json.dumps({"sequences": [[5, 6.0]], "starts": [1]}), "is not a token id"),
    (json.dumps({"sequences": [[5, True]], "starts": [1]}), "is not a token id"),
    (json.dumps({"sequences": [[5] * 65], "starts": [1]}), "65 tokens, more than the model's 64"),
    (json.dumps({"sequences": [[5, 6]], "starts": [1], "top_k": 6}), "top_k: expected an integer in [0, 5]"),
    (json.dumps({"prompt": [5, 6], "prompt_logprobs": 2, "stream": True}), "streaming is not supported"),
    (json.dumps({"prompt": [[5, 6], []], "prompt_logprobs": 2}), "prompt[1]: expected a non-empty list"),
    (json.dumps({"prompt": {"a": 1}}), "prompt: expected token ids"),
])
def test_malformed_and_out_of_vocabulary_requests_get_400(client, body, message):
    path = "/v1/completions" if b"prompt" in (body if isinstance(body, bytes) else body.encode()) else "/v1/score"
    reply = client.post(path, content=body)
    assert reply.status_code == 400, reply.text
    assert message in reply.json()["message"]


def test_scores_are_the_in_process_forward(client, loaded):
    seqs, starts = [[5, 6, 7, 8, 9], [10, 11, 12]], [2, 1]
    reply = client.post("/v1/score", json={"sequences": seqs, "starts": starts, "top_k": 3}).json()
    layout = build_layout([s[:p] for s, p in zip(seqs, starts)], [s[p:] for s, p in zip(seqs, starts)], 0)
    with torch.no_grad():
        expected, _ = response_logprobs(loaded.model, layout)
    got = torch.tensor(reply["logprobs"][0] + reply["logprobs"][1])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert [len(r) for r in reply["topk_ids"]] == [3, 2] and all(len(p) == 3 for r in reply["topk_ids"] for p in r)
    # The vLLM form of the same request: every position after the first, actual token included.
    comp = client.post("/v1/completions", json={"prompt": seqs[0], "max_tokens": 1, "prompt_logprobs": 2}).json()
    positions = comp["choices"][0]["prompt_logprobs"]
    assert positions[0] is None and len(positions) == 5
    assert positions[4]["9"]["logprob"] == pytest.approx(reply["logprobs"][0][-1], abs=1e-6)


_json = st.recursive(st.none() | st.booleans() | st.integers(-5, 200) | st.floats(allow_nan=True) | st.text(max_size=5),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                         st.sampled_from(["sequences", "starts", "top_k", "prompt", "prompt_logprobs", "max_tokens",
                                          "model", "stream", "add_special_tokens", "x"]), inner, max_size=4),
                     max_leaves=20)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/score", "/v1/completions", "/tokenize"]), body=_json, raw=st.binary(max_size=40),
       use_raw=st.booleans())
def test_fuzzed_requests_never_crash_the_server(client, path, body, raw, use_raw):
    content = raw if use_raw else json.dumps(body).encode()
    reply = client.post(path, content=content)
    assert reply.status_code in (200, 400, 413), (reply.status_code, reply.text)
    assert client.get("/health").status_code == 200


def test_binding_beyond_loopback_needs_a_token(tiny_teacher_dir, capsys, monkeypatch):
    monkeypatch.delenv("UNIOPD_API_KEY", raising=False)
    assert main(["serve-teacher", "--model", str(tiny_teacher_dir), "--host", "0.0.0.0"]) == 2
    assert "needs a bearer token" in capsys.readouterr().err
