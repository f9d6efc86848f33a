"""The OpenAI-compatible API end to end: a real uvicorn server on 127.0.0.1 over the float64
reference forward, driven by the official `openai` client, compared with a from-scratch
greedy reference."""
from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from test_server_harness import (ReferenceEngine, chat_prompt_ids, greedy_reference, serve)
from trimode.model.reference import ReferenceForward
from trimode.runtime.decode import DecodeParams
from trimode.runtime.generation import GenerationRequest, SamplingParams, generate
from trimode.runtime.healing import heal
from trimode.runtime.server.app import ServerSettings

GREEDY_AR = {"temperature": 0, "extra_body": {"mode": "ar"}}


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    return ReferenceEngine(tiny_gguf)


@pytest.fixture(scope="module")
def server(engine):
    settings = ServerSettings(n_ctx=2 * 160, n_slots=2, model_name="tiny",
                              decode=DecodeParams(mode="ar"))
    with serve(lambda: engine, settings) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def expected_text(engine, prompt_ids, n):
    ids = greedy_reference(engine.model, prompt_ids, n, engine.config.eos_token_id)
    return ids, engine.tokenizer.decode(ids)


def test_chat_completion_matches_the_greedy_reference(engine, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, **GREEDY_AR)
    prompt = chat_prompt_ids(engine, messages)
    ids, text = expected_text(engine, prompt, 8)
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == len(ids)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == text
    assert reply.choices[0].finish_reason == ("length" if len(ids) == 8 else "stop")
    assert reply.object == "chat.completion" and reply.model == "tiny"


def test_completion_from_token_ids_reports_usage_and_timings(engine, client):
    prompt = [1, 400, 401, 402, 403]
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, **GREEDY_AR)
    ids, text = expected_text(engine, prompt, 6)
    assert reply.choices[0].text == text
    assert reply.usage.prompt_tokens == 5 and reply.usage.completion_tokens == len(ids)
    timings = reply.model_extra["timings"]
    assert timings["predicted_n"] == len(ids)
    # AR: one prefill, then one forward per further token.
    assert timings["forwards"] == len(ids)
    assert timings["tokens_per_forward"] == pytest.approx(1.0)
    assert timings["prompt_n"] + timings["cache_n"] == 5
    for key in ("prompt_ms", "prompt_per_second", "predicted_ms", "predicted_per_second",
                "accepted_per_cycle"):
        assert timings[key] >= 0


def test_text_completion_prompt_gets_bos(engine, client):
    reply = client.completions.create(model="tiny", prompt="def main():", max_tokens=5, **GREEDY_AR)
    prompt = [engine.tokenizer.bos_id, *engine.tokenizer.encode("def main():")]
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.choices[0].text == expected_text(engine, prompt, 5)[1]


def test_text_completion_heals_its_prompt_on_request(engine, client):
    tok = engine.tokenizer
    prompt = [tok.bos_id, *tok.encode("def main():")]
    reply = client.completions.create(model="tiny", prompt="def main():", max_tokens=5,
                                      temperature=0, extra_body={"mode": "ar", "token_healing": True})
    healed = heal(tok, GenerationRequest(prompt_ids=tuple(prompt), max_tokens=5,
                                         decode=DecodeParams(mode="ar")))
    assert healed.prompt_ids == tuple(prompt[:-1])
    *_, done = generate(ReferenceForward(engine.model, 64), tok, healed)
    assert done.tokens[0] in healed.first_ids
    assert reply.choices[0].text == tok.decode(prompt[1:-1] + done.tokens)[len("def main():"):]
    assert reply.usage.completion_tokens == len(done.tokens)


def test_streamed_chat_equals_the_whole_reply(client):
    messages = [{"role": "user", "content": "Count to three."}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, **GREEDY_AR)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                                 stream=True, stream_options={"include_usage": True},
                                                 **GREEDY_AR))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_stream_is_server_sent_events_ending_with_done(server):
    body = {"prompt": [1, 500, 501], "max_tokens": 4, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(line[6:]) for line in events[:-1]]
    assert all(p["object"] == "text_completion" for p in payloads)
    assert "usage" not in payloads[-1]  # only with stream_options.include_usage
    assert payloads[-1]["timings"]["predicted_n"] >= 1


def test_stop_string_cuts_the_text(engine, client):
    prompt = [1, 600, 601, 602]
    _, text = expected_text(engine, prompt, 12)
    stop = text[4:7]
    assert len(stop) == 3 and text.find(stop) >= 1
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, stop=[stop], **GREEDY_AR)
    assert reply.choices[0].text == text[:text.find(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_same_seed_same_sample(client):
    def sample(seed):
        return client.completions.create(model="tiny", prompt=[1, 700, 701], max_tokens=6,
                                         temperature=1.5, seed=seed,
                                         extra_body={"mode": "ar"}).choices[0].text
    assert sample(11) == sample(11)
    assert len({sample(seed) for seed in (1, 2, 3, 4)}) > 1


def test_penalties_and_logit_bias_shape_the_reply(engine, client):
    """The OpenAI client's frequency_penalty, presence_penalty and logit_bias (and
    llama-server's repeat_penalty) give what generate() gives with those settings on the
    float64 reference; banning the greedy reply's first token moves it."""
    prompt = [1, 400, 401, 402, 403]
    plain, _ = expected_text(engine, prompt, 8)
    fields = dict(frequency_penalty=1.5, presence_penalty=0.5, logit_bias={str(plain[0]): -100})
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                      extra_body={"mode": "spec", "draft_length": 3,
                                                  "repeat_penalty": 1.2}, **fields)
    sampling = SamplingParams(frequency_penalty=1.5, presence_penalty=0.5, repetition_penalty=1.2,
                              penalty_last_n=64, logit_bias=((plain[0], -100.0),))
    *_, done = generate(ReferenceForward(engine.model, 64), engine.tokenizer,
                        GenerationRequest(prompt_ids=tuple(prompt), max_tokens=8, sampling=sampling,
                                          decode=DecodeParams(mode="ar")))
    assert done.tokens[0] != plain[0]
    assert reply.choices[0].text == engine.tokenizer.decode(done.tokens)


def reference_logprobs(engine, prompt, n, n_top, mode="spec", suppress=()):
    *events, done = generate(ReferenceForward(engine.model, 64), engine.tokenizer,
                             GenerationRequest(prompt_ids=tuple(prompt), max_tokens=n, logprobs=n_top,
                                               decode=DecodeParams(mode=mode, draft_length=3),
                                               suppress_ids=suppress))
    return done.tokens, [s for e in events for s in e.logprobs]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_are_the_references(engine, client, stream):
    """logprobs + top_logprobs (OpenAI's chat shape: token text, bytes, alternatives) are
    generate()'s on the float64 reference, whole or streamed a cycle at a time."""
    messages = [{"role": "user", "content": "Name a colour."}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=3, stream=stream,
                                           extra_body={"mode": "spec", "draft_length": 3})
    if stream:
        entries = [e for c in reply if c.choices and c.choices[0].logprobs
                   for e in c.choices[0].logprobs.content]
    else:
        entries = reply.choices[0].logprobs.content
    tok = engine.tokenizer
    think = tuple(i for i in (tok.think_open_id, tok.think_close_id) if i is not None)  # off in chat
    tokens, want = reference_logprobs(engine, chat_prompt_ids(engine, messages), 8, 3, suppress=think)
    assert [e.token for e in entries] == [tok.token_text(t) for t in tokens]
    assert [bytes(e.bytes) for e in entries] == [tok.token_bytes(t) for t in tokens]
    for got, s in zip(entries, want):
        assert got.logprob == pytest.approx(s.logprob, abs=1e-9)
        assert [(t.token, t.logprob) for t in got.top_logprobs] == [(tok.token_text(i), pytest.approx(lp, abs=1e-9))
                                                                    for i, lp in s.top]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, **GREEDY_AR)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_in_the_legacy_shape(engine, client):
    """/v1/completions' logprobs N: tokens, token_logprobs, top_logprobs (N alternatives and
    the chosen token, by text) and each token's offset in the reply text."""
    prompt = [1, 400, 401, 402, 403]
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                      logprobs=2, extra_body={"mode": "ar"})
    got = reply.choices[0].logprobs
    tokens, want = reference_logprobs(engine, prompt, 6, 2, mode="ar")
    text = engine.tokenizer.token_text
    assert got.tokens == [text(t) for t in tokens]
    assert got.token_logprobs == pytest.approx([s.logprob for s in want], abs=1e-9)
    for top, s in zip(got.top_logprobs, want):
        expected = {text(i): lp for i, lp in s.top}
        expected.setdefault(text(s.token), s.logprob)
        assert top == pytest.approx(expected, abs=1e-9)
    assert got.text_offset == [sum(len(t) for t in got.tokens[:i]) for i in range(len(got.tokens))]
    assert "".join(got.tokens) == reply.choices[0].text


def test_echo_with_logprobs_scores_prompt_and_reply(engine, client):
    """What evaluation harnesses send to score a continuation (echo, logprobs 1, one more
    token): the prompt's tokens (the first unscored) then the reply's, each with the float64
    reference's causal logprob; the text is the prompt's followed by the reply's."""
    prompt = [1, 400, 401, 402, 403, 77, 1023]
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0,
                                      logprobs=1, echo=True)
    got = reply.choices[0].logprobs
    *events, done = generate(ReferenceForward(engine.model, 64), engine.tokenizer,
                             GenerationRequest(prompt_ids=tuple(prompt), max_tokens=1, logprobs=1,
                                               prompt_logprobs=1, decode=DecodeParams(mode="spec")))
    want = events[0].prompt_logprobs + [s for e in events for s in e.logprobs or []]
    text = engine.tokenizer.token_text
    assert got.tokens == [text(t) for t in prompt + done.tokens]
    assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
    assert got.token_logprobs[1:] == pytest.approx([s.logprob for s in want[1:]], abs=1e-9)
    assert len(got.tokens) == len(prompt) + 1 and reply.usage.completion_tokens == 1
    assert reply.choices[0].text == engine.tokenizer.decode(prompt) + engine.tokenizer.decode(done.tokens)
    assert got.text_offset == [sum(len(t) for t in got.tokens[:i]) for i in range(len(got.tokens))]
    # the harness's is-greedy test: the reply's token is its row's most likely
    assert got.token_logprobs[-1] == max(got.top_logprobs[-1].values())


@pytest.mark.parametrize("stream", [False, True])
def test_echo_alone_and_with_no_new_tokens(client, stream):
    def text(**fields):
        reply = client.completions.create(model="tiny", prompt="def main():", temperature=0, stream=stream,
                                          extra_body={"mode": "ar"}, **fields)
        return "".join(c.choices[0].text for c in reply) if stream else reply.choices[0].text
    plain = text(max_tokens=4)
    assert text(max_tokens=4, echo=True) == "def main():" + plain
    assert text(max_tokens=0, echo=True) == "def main():"
    if stream:
        chunks = list(client.completions.create(model="tiny", prompt=[1, 400, 401], max_tokens=0, echo=True,
                                                logprobs=0, stream=True))
        scored = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
        assert len(scored) == 1 and len(scored[0].tokens) == 3 and scored[0].token_logprobs[0] is None


def test_spec_and_ar_give_the_same_greedy_text(client):
    messages = [{"role": "user", "content": "Write a haiku."}]
    def text(**extra):
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                               temperature=0, extra_body=extra)
        return reply.choices[0].message.content, reply.model_extra["timings"]
    ar, _ = text(mode="ar")
    spec, timings = text(mode="spec", draft_length=3)
    assert spec == ar
    # The last cycles draft fewer slots when fewer tokens are left to make.
    assert 0 < timings["drafted_n"] <= 3 * timings["cycles"]
    # Self-speculation: the prefill, then at most a draft and a verify pass per cycle.
    assert timings["cycles"] < timings["forwards"] <= 1 + 2 * timings["cycles"]


def test_diffusion_mode_runs(client):
    reply = client.completions.create(model="tiny", prompt=[1, 800, 801], max_tokens=8, temperature=0,
                                      extra_body={"mode": "diffusion", "block_length": 4, "threshold": 0.5})
    assert reply.usage.completion_tokens >= 1
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_next_chat_turn_reuses_the_cached_prompt(tiny_gguf, engine):
    settings = ServerSettings(n_ctx=200, n_slots=1, decode=DecodeParams(mode="ar"))
    with serve(lambda: engine, settings) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
        first = [{"role": "user", "content": "Tell me about the sea."}]
        reply = client.chat.completions.create(model="m", messages=first, max_tokens=6, **GREEDY_AR)
        second = first + [{"role": "assistant", "content": reply.choices[0].message.content},
                          {"role": "user", "content": "And the sky?"}]
        reused = client.chat.completions.create(model="m", messages=second, max_tokens=6, **GREEDY_AR)
        # Overwrite the slot's cache, then ask the second turn again from scratch.
        client.completions.create(model="m", prompt=[1, 900, 901], max_tokens=2, **GREEDY_AR)
        fresh = client.chat.completions.create(model="m", messages=second, max_tokens=6, **GREEDY_AR)
    # The earlier turn is re-rendered without its empty think block, so the cache serves
    # the prompt up to where the two renderings part.
    old, new = chat_prompt_ids(engine, first), chat_prompt_ids(engine, second)
    shared = next(i for i, (a, b) in enumerate(zip(old, new)) if a != b)
    assert shared > 10
    assert reused.model_extra["timings"]["cache_n"] == shared
    assert reused.usage.prompt_tokens_details.cached_tokens == reused.model_extra["timings"]["cache_n"]
    assert fresh.model_extra["timings"]["cache_n"] <= 1
    assert reused.choices[0].message.content == fresh.choices[0].message.content


def test_prompt_longer_than_a_slot_is_a_400(client):
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt=[1] + [300] * 200, max_tokens=1)


def test_models_tokenize_detokenize(engine, server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].model_extra["meta"]["n_ctx_slot"] == 160
    text = "Hello <|im_start|> world"
    ids = httpx.post(server.base_url + "/tokenize", json={"content": text}).json()["tokens"]
    assert ids == engine.tokenizer.encode_template(text)
    plain = httpx.post(server.base_url + "/tokenize",
                       json={"content": text, "parse_special": False, "add_special": True}).json()["tokens"]
    assert plain == [engine.tokenizer.bos_id, *engine.tokenizer.encode(text)]
    back = httpx.post(server.base_url + "/detokenize", json={"tokens": ids}).json()["content"]
    assert back == text


def test_metrics_count_requests_and_tokens(server, client):
    def scrape():
        text = httpx.get(server.base_url + "/metrics").text
        return {line.split(" ")[0]: float(line.split(" ")[1])
                for line in text.splitlines() if line and not line.startswith("#")}
    before = scrape()
    reply = client.completions.create(model="tiny", prompt=[1, 1000], max_tokens=3, **GREEDY_AR)
    after = scrape()
    key = 'trimode_requests_total{endpoint="completion",outcome="ok"}'
    assert after[key] - before.get(key, 0) == 1
    assert after["trimode_generated_tokens_total"] - before["trimode_generated_tokens_total"] == \
        reply.usage.completion_tokens
    assert after["trimode_slots_total"] == 2
    assert after["trimode_slots_busy"] == 0 and after["trimode_queue_depth"] == 0
    assert after["trimode_tokens_per_forward"] > 0 and after["trimode_tokens_per_second"] > 0


def test_health_is_503_until_the_model_is_loaded(engine):
    gate = threading.Event()

    def slow_load():
        gate.wait(60)
        return engine

    with serve(slow_load, ServerSettings(n_ctx=64), wait_ready=False) as server:
        loading = httpx.get(server.base_url + "/health")
        chat = httpx.post(server.base_url + "/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": "hi"}]})
        gate.set()
        server.service.scheduler.ready.wait(60)
        ready = httpx.get(server.base_url + "/health")
    assert loading.status_code == 503 and loading.json()["error"]["message"] == "Loading model"
    assert chat.status_code == 503
    assert ready.status_code == 200 and ready.json() == {"status": "ok"}


def test_api_key_guards_every_v1_route(engine):
    with serve(lambda: engine, ServerSettings(n_ctx=64, api_key="sesame",
                                              decode=DecodeParams(mode="ar"))) as server:
        url = server.base_url
        assert httpx.get(url + "/health").status_code == 200
        for method, path, body in [("GET", "/v1/models", None),
                                   ("POST", "/v1/completions", {"prompt": [1, 2], "max_tokens": 1}),
                                   ("POST", "/v1/chat/completions",
                                    {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1})]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
                r = httpx.request(method, url + path, json=body, headers=headers)
                assert r.status_code == 401, (path, headers)
                assert r.json()["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        assert good.completions.create(model="m", prompt=[1, 2], max_tokens=1).usage.completion_tokens <= 1


def test_n_choices_are_n_generations_with_consecutive_seeds(client):
    """n = 3 sampled with seed s: choice i is what n = 1 gives with seed s + i; usage counts
    the prompt once and every choice's tokens."""
    fields = dict(model="tiny", prompt=[1, 400, 401, 402], max_tokens=6, temperature=1.0,
                  extra_body={"mode": "spec", "draft_length": 3})
    reply = client.completions.create(n=3, seed=7, **fields)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    alone = [client.completions.create(seed=7 + i, **fields) for i in range(3)]
    assert [c.text for c in reply.choices] == [a.choices[0].text for a in alone]
    assert len({c.text for c in reply.choices}) > 1
    assert reply.usage.prompt_tokens == 4
    assert reply.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)


def test_n_choices_stream_by_index(client):
    messages = [{"role": "user", "content": "Count to three."}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, n=2,
                                           logprobs=True, **GREEDY_AR)
    assert whole.choices[0].message.content == whole.choices[1].message.content  # greedy
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, n=2,
                                                 stream=True, stream_options={"include_usage": True},
                                                 logprobs=True, **GREEDY_AR))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == whole.choices[index].message.content
        assert [e.token for c in mine if c.logprobs for e in c.logprobs.content] == \
            [e.token for e in whole.choices[index].logprobs.content]
        assert [c.finish_reason for c in mine if c.finish_reason] == [whole.choices[index].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_completions_keep_their_own_text_offsets(client):
    reply = client.completions.create(model="tiny", prompt=[1, 400, 401], max_tokens=4, n=2, logprobs=1,
                                      temperature=1.0, seed=3, extra_body={"mode": "ar"})
    for choice in reply.choices:
        lp = choice.logprobs
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


@pytest.mark.parametrize("stream", [False, True])
def test_a_batch_of_prompts_gives_n_choices_each(client, stream):
    """A list of prompts (strings or token lists, what evaluation harnesses send): choice
    i * n + j is prompt i's j-th, as the prompt alone with seed + j gives it; usage counts
    every prompt once."""
    prompts = [[1, 400, 401], [1, 500, 501, 502]]
    fields = dict(model="tiny", max_tokens=4, temperature=1.0, seed=5, extra_body={"mode": "ar"})
    reply = client.completions.create(prompt=prompts, n=2, stream=stream, stream_options={"include_usage": True}
                                      if stream else None, **fields)
    if stream:
        chunks = list(reply)
        texts = {}
        for c in chunks:
            for choice in c.choices:
                texts[choice.index] = texts.get(choice.index, "") + choice.text
        got, usage = [texts[i] for i in range(4)], chunks[-1].usage
    else:
        got, usage = [c.text for c in sorted(reply.choices, key=lambda c: c.index)], reply.usage
    want = [client.completions.create(prompt=p, n=2, **fields).choices[j].text for p in prompts for j in range(2)]
    assert got == want
    assert usage.prompt_tokens == 7 and usage.completion_tokens == 16


def test_harness_loglikelihood_request_shape(engine, client):
    """lm-evaluation-harness's local-completions: a batch of one token list, echo, logprobs 1,
    one new token; the continuation's logprobs are the reference's."""
    prompt = [1, 400, 401, 402, 403]
    reply = client.completions.create(model="tiny", prompt=[prompt], max_tokens=1, temperature=0,
                                      logprobs=1, echo=True, seed=1234)
    got = reply.choices[0].logprobs
    *events, _ = generate(ReferenceForward(engine.model, 64), engine.tokenizer,
                          GenerationRequest(prompt_ids=tuple(prompt), max_tokens=0, prompt_logprobs=1))
    want = [s.logprob for s in events[0].prompt_logprobs[1:]]
    assert got.token_logprobs[1:len(prompt)] == pytest.approx(want, abs=1e-9)
    assert len(got.token_logprobs) == len(prompt) + 1


def test_a_batch_of_strings_echoes_each(client):
    reply = client.completions.create(model="tiny", prompt=["def a():", "x ="], max_tokens=0, echo=True)
    assert [c.text for c in sorted(reply.choices, key=lambda c: c.index)] == ["def a():", "x ="]
