"""Slots, queue and disconnects: many streams at once give the same text as one at a time,
a long request does not hold up short ones, waiting requests start in arrival order, and a
client that goes away frees its slot."""
from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from test_server_harness import ReferenceEngine, greedy_reference, serve
from trimode.runtime.decode import DecodeParams
from trimode.runtime.generation import DoneEvent, GenerationRequest, SamplingParams, TokenEvent
from trimode.runtime.server.app import ServerSettings
from trimode.runtime.server.metrics import ServerMetrics
from trimode.model.config import ModelError
from trimode.runtime.server.scheduler import Job, QueueFull, Scheduler, slot_context

AR = DecodeParams(mode="ar")
# Sampled, so the long request does not fall into a repetition loop and stop early.
LONG = {"max_tokens": 120, "temperature": 1.0, "seed": 5}


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    return ReferenceEngine(tiny_gguf)


def wait_until(condition, what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def test_sixteen_concurrent_streams_match_the_reference(engine):
    prompts = [[1, 300 + 7 * i, 301 + 7 * i, 302 + 7 * i] for i in range(16)]
    expected = [engine.tokenizer.decode(greedy_reference(engine.model, p, 6, engine.config.eos_token_id))
                for p in prompts]
    with serve(lambda: engine, ServerSettings(n_ctx=4 * 64, n_slots=4, decode=AR)) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)

        def stream(i: int) -> str:
            # Half the requests self-speculate: greedy, so the text is the same as AR's.
            extra = {"mode": "spec", "draft_length": 2} if i % 2 else {"mode": "ar"}
            chunks = client.completions.create(model="m", prompt=prompts[i], max_tokens=6,
                                               temperature=0, stream=True, extra_body=extra)
            return "".join(c.choices[0].text for c in chunks)

        with ThreadPoolExecutor(16) as pool:
            texts = list(pool.map(stream, range(16)))
        assert server.service.scheduler.busy_slots() == 0
    assert texts == expected


def test_a_long_request_does_not_block_a_short_one(engine):
    with serve(lambda: engine, ServerSettings(n_ctx=2 * 160, n_slots=2, decode=AR)) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
        long = client.completions.create(model="m", prompt=[1, 2000, 2001], stream=True, **LONG)
        first = next(long)
        assert first.choices[0].finish_reason is None
        short = client.completions.create(model="m", prompt=[1, 1500], max_tokens=3, temperature=0)
        assert short.usage.completion_tokens >= 1
        assert server.service.scheduler.busy_slots() == 1  # the long one is still going
        rest = list(long)
    assert rest[-1].choices[0].finish_reason == "length"
    assert len(rest) + 1 >= 100  # it really was long


def test_a_disconnected_stream_frees_its_slot(engine):
    with serve(lambda: engine, ServerSettings(n_ctx=160, n_slots=1, decode=AR)) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
        scheduler = server.service.scheduler
        long = client.completions.create(model="m", prompt=[1, 2000, 2001], stream=True, **LONG)
        next(long), next(long)
        long.close()
        wait_until(lambda: scheduler.busy_slots() == 0, "the slot to be freed")
        made = len(scheduler.slots[0].history) - 3
        assert 2 <= made < LONG["max_tokens"]
        metrics = httpx.get(server.base_url + "/metrics").text
        assert 'trimode_requests_total{endpoint="completion",outcome="disconnected"} 1.0' in metrics
        # The single slot serves the next request.
        reply = client.completions.create(model="m", prompt=[1, 1500], max_tokens=2, temperature=0)
        assert reply.usage.completion_tokens >= 1


def test_a_disconnected_whole_request_stops_too(engine):
    with serve(lambda: engine, ServerSettings(n_ctx=160, n_slots=1, decode=AR)) as server:
        scheduler = server.service.scheduler
        body = json.dumps({"prompt": [1, 2000, 2001], **LONG}).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as conn:
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_until(lambda: scheduler.busy_slots() == 1, "generation to start")
        wait_until(lambda: scheduler.busy_slots() == 0, "the slot to be freed")
        assert len(scheduler.slots[0].history) - 3 < LONG["max_tokens"]


def _run_jobs(engine, n_slots: int, lengths: list[int]) -> list[tuple[int, str]]:
    """Submit one greedy job per length (in order) to a scheduler; returns the (job, kind)
    log of delivered events, in the order the scheduler thread produced them."""
    log: list[tuple[int, str]] = []
    done = threading.Semaphore(0)
    scheduler = Scheduler(lambda: engine, n_slots, 200, max_queue=16, metrics=ServerMetrics(n_slots))

    def deliver_for(index: int):
        def deliver(event):
            log.append((index, "done" if isinstance(event, DoneEvent) else "token"))
            if not isinstance(event, TokenEvent):
                done.release()
        return deliver

    jobs = [Job(GenerationRequest(prompt_ids=(1, 400 + i), max_tokens=n, loop_detection=False,
                                  sampling=SamplingParams(), decode=AR), deliver_for(i))
            for i, n in enumerate(lengths)]
    for job in jobs:  # all queued before the engine is ready, so arrival order is known
        scheduler.submit(job)
    scheduler.start()
    try:
        for _ in jobs:
            assert done.acquire(timeout=60)
    finally:
        scheduler.stop()
    return log


def test_waiting_requests_start_in_arrival_order(engine):
    log = _run_jobs(engine, n_slots=1, lengths=[3, 3, 3])
    order = [job for job, _ in log]
    # One slot: each job runs to its end before the next starts, oldest first.
    assert order == sorted(order)
    assert [job for job, kind in log if kind == "done"] == [0, 1, 2]


def test_slots_interleave_cycles_round_robin(engine):
    log = _run_jobs(engine, n_slots=2, lengths=[30, 3, 3])
    finished = [job for job, kind in log if kind == "done"]
    # Job 2 waits for a slot, takes job 1's, and both short ones finish before the long one.
    assert finished == [1, 2, 0]
    first_of_1 = log.index((1, "token"))
    assert log[first_of_1 - 1][0] == 0 and log[first_of_1 + 1][0] == 0


def test_a_full_queue_refuses_more(engine):
    scheduler = Scheduler(lambda: engine, 1, 64, max_queue=2, metrics=ServerMetrics(1))
    request = GenerationRequest(prompt_ids=(1, 2), max_tokens=1)
    scheduler.submit(Job(request, lambda e: None))
    scheduler.submit(Job(request, lambda e: None))
    with pytest.raises(QueueFull):
        scheduler.submit(Job(request, lambda e: None))


def test_a_requests_choices_queue_all_or_none(engine):
    scheduler = Scheduler(lambda: engine, 1, 64, max_queue=3, metrics=ServerMetrics(1))
    request = GenerationRequest(prompt_ids=(1, 2), max_tokens=1)
    scheduler.submit(Job(request, lambda e: None))
    with pytest.raises(QueueFull):
        scheduler.submit(*(Job(request, lambda e: None) for _ in range(3)))
    scheduler.submit(*(Job(request, lambda e: None) for _ in range(2)))  # nothing of the refused one queued


def test_slot_budget():
    assert slot_context(None, 1, 262144) == 4096  # llama-server's default -c
    assert slot_context(None, 2, 2048) == 1024    # ... or the model's context if shorter
    assert slot_context(1000, 3, 2048) == 333
    with pytest.raises(ModelError, match="longer than the model's context"):
        slot_context(100000, 1, 2048)
    with pytest.raises(ModelError, match="at least 2"):
        slot_context(3, 2, None)
