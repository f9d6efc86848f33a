"""Prometheus metrics of one server, in a registry of its own (so several servers can live
in one process, as they do in the tests)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, n_slots: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("trimode_requests", "Generation requests finished, by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.prompt_tokens = Counter("trimode_prompt_tokens", "Prompt tokens received", registry=r)
        self.prompt_tokens_cached = Counter("trimode_prompt_tokens_cached",
                                            "Prompt tokens whose KV was reused from a slot's cache", registry=r)
        self.generated_tokens = Counter("trimode_generated_tokens", "Tokens generated", registry=r)
        self.forwards = Counter("trimode_forwards", "Forward passes run while decoding", registry=r)
        self.decode_seconds = Counter("trimode_decode_seconds", "Seconds spent decoding, summed over requests",
                                      registry=r)
        self.tokens_per_second = Gauge("trimode_tokens_per_second",
                                       "Decode speed of the last finished request", registry=r)
        self.tokens_per_forward = Gauge("trimode_tokens_per_forward",
                                        "Generated tokens per forward pass since start", registry=r)
        self.queue_depth = Gauge("trimode_queue_depth", "Requests waiting for a free slot", registry=r)
        self.slots_busy = Gauge("trimode_slots_busy", "Slots generating now", registry=r)
        self.slots_total = Gauge("trimode_slots_total", "Slots (-np)", registry=r)
        self.slots_total.set(n_slots)
        self._tokens = 0
        self._forwards = 0

    def record_generation(self, endpoint: str, outcome: str, prompt_tokens: int, cached_tokens: int,
                          generated: int, forwards: int, decode_seconds: float) -> None:
        self.requests.labels(endpoint, outcome).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.prompt_tokens_cached.inc(cached_tokens)
        self.generated_tokens.inc(generated)
        self.forwards.inc(forwards)
        self.decode_seconds.inc(decode_seconds)
        if decode_seconds > 0 and generated:
            self.tokens_per_second.set(generated / decode_seconds)
        self._tokens += generated
        self._forwards += forwards
        if self._forwards:
            self.tokens_per_forward.set(self._tokens / self._forwards)

    def render(self) -> bytes:
        return generate_latest(self.registry)
