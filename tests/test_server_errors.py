"""Every bad request gets an OpenAI-style error body with a 4xx status, never a traceback,
and the server keeps serving afterwards."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from test_server_harness import ReferenceEngine, serve
from trimode.runtime.decode import DecodeParams
from trimode.runtime.server.app import MAX_BODY_BYTES, ServerSettings

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tiny_gguf):
    engine = ReferenceEngine(tiny_gguf)
    with serve(lambda: engine, ServerSettings(n_ctx=128, decode=DecodeParams(mode="ar"))) as running:
        yield running


def chat(**fields) -> dict:
    return {"messages": USER, "max_tokens": 2, **fields}


BAD_JSON_BODIES = {
    "malformed JSON": (b'{"messages": [', "not valid JSON"),
    "invalid UTF-8": (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', "UTF-8"),
    "not an object": (b'[1, 2, 3]', "JSON object"),
    "empty body": (b'', "JSON object"),
    "lone surrogate": (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "surrogate"),
}

BAD_CHAT_FIELDS = {
    "empty messages": ({"messages": []}, "messages"),
    "messages not a list": ({"messages": "hi"}, "messages"),
    "unknown role": ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
    "content a number": ({"messages": [{"role": "user", "content": 5}]}, "content"),
    "negative max_tokens": (chat(max_tokens=-1), "max_tokens"),
    "max_tokens a string": (chat(max_tokens="5"), "max_tokens"),
    "max_tokens a float": (chat(max_tokens=2.5), "max_tokens"),
    "temperature a string": (chat(temperature="hot"), "temperature"),
    "temperature too high": (chat(temperature=7), "temperature"),
    "top_p zero": (chat(top_p=0), "top_p"),
    "stream a string": (chat(stream="yes"), "stream"),
    "n of 17": (chat(n=17), "n"),
    "n of 0": (chat(n=0), "n"),
    "huge stop list": (chat(stop=["x"] * 1000), "stop"),
    "huge stop string": (chat(stop="x" * 100_000), "stop"),
    "unknown mode": (chat(mode="turbo"), "mode"),
    "draft length too long": (chat(draft_length=10_000), "draft_length"),
    "threshold above 1": (chat(threshold=1.5), "threshold"),
    "top_logprobs past 20": (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    "top_logprobs without logprobs": (chat(top_logprobs=2), "needs logprobs"),
    "logprobs a number": (chat(logprobs=3), "logprobs"),
    "tools": (chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tool"),
    "giant seed": (chat(seed=10 ** 30), "seed"),
    "frequency penalty past OpenAI's range": (chat(frequency_penalty=3.0), "frequency_penalty"),
    "presence penalty a string": (chat(presence_penalty="high"), "presence_penalty"),
    "zero repeat penalty": (chat(repeat_penalty=0), "repeat_penalty"),
    "repeat_last_n under -1": (chat(repeat_last_n=-2), "repeat_last_n"),
    "logit bias key not an id": (chat(logit_bias={"hello": 1}), "token id"),
    "logit bias past 100": (chat(logit_bias={"5": 500}), "logit_bias"),
    "logit bias a list": (chat(logit_bias=[[5, 1.0]]), "logit_bias"),
    "logit bias id out of vocabulary": (chat(logit_bias={"1000000": -1}), "vocabulary"),
    "huge logit bias": (chat(logit_bias={str(i): -1 for i in range(5000)}), "logit_bias"),
    "JSON mode": (chat(response_format={"type": "json_object"}), "response_format is not supported"),
    "typical-p sampling": (chat(typical_p=0.9), "typical_p is not supported"),
    "a grammar": (chat(grammar="root ::= \"a\""), "grammar is not supported"),
    "mirostat": (chat(mirostat=2), "mirostat is not supported"),
    "ignore_eos": (chat(ignore_eos=True), "ignore_eos is not supported"),
    "tool_choice required": (chat(tool_choice="required"), "tool_choice is not supported"),
    "negative n_predict": (chat(n_predict=-1), "n_predict"),
}

BAD_COMPLETION_FIELDS = {
    "no prompt": ({"max_tokens": 2}, "prompt"),
    "empty token list": ({"prompt": []}, "prompt"),
    "token id out of vocabulary": ({"prompt": [1, 10 ** 6]}, "vocabulary"),
    "negative token id": ({"prompt": [1, -5]}, "prompt"),
    "prompt longer than the context": ({"prompt": [1] + [300] * 500}, "context"),
    "a batch with an empty token list": ({"prompt": [[1, 2], []]}, "prompt"),
    "a batch mixing text and ids": ({"prompt": ["a", [1, 2]]}, "prompt"),
    "a batch of 65": ({"prompt": ["a"] * 65}, "prompt"),
    "more generations than the queue holds": ({"prompt": ["a"] * 20, "n": 16}, "queues at most"),
    "echo with token healing": ({"prompt": "x", "echo": True, "token_healing": True}, "echo"),
    "echo a string": ({"prompt": "x", "echo": "yes"}, "echo"),
    "suffix (fill in the middle)": ({"prompt": "x", "suffix": "y"}, "suffix is not supported"),
    "best_of 3": ({"prompt": "x", "best_of": 3}, "best_of is not supported"),
    "logprobs past 20": ({"prompt": "x", "logprobs": 21}, "logprobs"),
    "logprobs true (a count here)": ({"prompt": "x", "logprobs": True}, "logprobs"),
    "prompt logprobs": ({"prompt": "x", "prompt_logprobs": 1}, "prompt_logprobs is not supported"),
}


def assert_openai_error(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["type"] == "invalid_request_error"
    assert words.lower() in error["message"].lower(), error["message"]


@pytest.mark.parametrize("name", BAD_JSON_BODIES)
def test_unreadable_bodies(server, name):
    body, words = BAD_JSON_BODIES[name]
    r = httpx.post(server.base_url + "/v1/chat/completions", content=body,
                   headers={"content-type": "application/json"})
    assert_openai_error(r, 400, words)


@pytest.mark.parametrize("name", BAD_CHAT_FIELDS)
def test_bad_chat_requests(server, name):
    body, words = BAD_CHAT_FIELDS[name]
    assert_openai_error(httpx.post(server.base_url + "/v1/chat/completions", json=body), 400, words)


@pytest.mark.parametrize("name", BAD_COMPLETION_FIELDS)
def test_bad_completion_requests(server, name):
    body, words = BAD_COMPLETION_FIELDS[name]
    assert_openai_error(httpx.post(server.base_url + "/v1/completions", json=body), 400, words)


def test_bad_detokenize_ids(server):
    r = httpx.post(server.base_url + "/detokenize", json={"tokens": [1, 10 ** 7]})
    assert_openai_error(r, 400, "vocabulary")


def test_oversized_body_is_refused_unread(server):
    r = httpx.post(server.base_url + "/v1/completions",
                   content=b"{" + b" " * (MAX_BODY_BYTES + 10) + b"}")
    assert_openai_error(r, 413, "exceeds")


def test_form_encoded_json_is_still_read(server):
    # `curl -d '{...}'` sends form-urlencoded; llama-server reads the JSON anyway.
    r = httpx.post(server.base_url + "/v1/completions", content=b'{"prompt": [1, 2], "max_tokens": 1}',
                   headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 2


def test_unknown_route_and_method(server):
    r = httpx.get(server.base_url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404
    r = httpx.get(server.base_url + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == 405


def test_openai_client_sees_bad_requests_and_server_survives(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="n"):
        client.chat.completions.create(model="m", messages=USER, n=30)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="m", prompt="x", max_tokens=-4)
    reply = client.chat.completions.create(model="m", messages=USER, max_tokens=2)
    assert reply.usage.completion_tokens <= 2


class PoisonedEngine(ReferenceEngine):
    """The reference, except that any forward over token POISON raises, as a broken kernel would."""
    POISON = 1999

    def new_sequence(self, n_ctx):
        forward = super().new_sequence(n_ctx)
        causal = forward.causal

        def poisoned(tokens, last_only=False):
            if self.POISON in tokens:
                raise RuntimeError("kernel exploded")
            return causal(tokens, last_only)

        forward.causal = poisoned
        return forward


def test_an_engine_failure_is_a_500_and_the_server_carries_on(tiny_gguf):
    engine = PoisonedEngine(tiny_gguf)
    with serve(lambda: engine, ServerSettings(n_ctx=64, decode=DecodeParams(mode="ar"))) as server:
        url = server.base_url + "/v1/completions"
        r = httpx.post(url, json={"prompt": [1, PoisonedEngine.POISON], "max_tokens": 3})
        assert r.status_code == 500 and "Traceback" not in r.text
        assert r.json()["error"]["message"] == "generation failed: RuntimeError: kernel exploded"
        with httpx.stream("POST", url, json={"prompt": [1, PoisonedEngine.POISON], "stream": True}) as s:
            lines = [line for line in s.iter_lines() if line]
        assert json.loads(lines[0].removeprefix("data: "))["error"]["code"] == 500
        assert lines[-1] == "data: [DONE]"
        fine = httpx.post(url, json={"prompt": [1, 2, 3], "max_tokens": 2})
        assert fine.status_code == 200 and fine.json()["usage"]["completion_tokens"] >= 1
