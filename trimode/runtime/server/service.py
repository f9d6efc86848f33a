"""What the HTTP handlers share: settings, the scheduler, metrics, and the relay of one
generation's events to a client as a whole response or a server-sent event stream."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from trimode.model.config import ModelError
from trimode.runtime.generation import DecodeParams, DoneEvent, GenerationRequest, TokenEvent
from trimode.runtime.server.errors import APIError, error_body, error_response
from trimode.runtime.server.metrics import ServerMetrics
from trimode.runtime.server.prompts import PromptSettings, settings_from_metadata
from trimode.runtime.server.responses import Choice, ResponseBuilder, sse
from trimode.runtime.server.scheduler import Engine, Failed, Job, QueueFull, Scheduler


@dataclass(frozen=True)
class ServerSettings:
    n_ctx: Optional[int] = None  # -c: KV tokens over all slots (None: scheduler.slot_context)
    n_slots: int = 1             # -np
    model_name: str = "trimode"  # the id /v1/models reports
    api_key: Optional[str] = None
    reasoning: bool = False
    decode: DecodeParams = DecodeParams()  # the mode of requests that do not name one
    max_queue: int = 256         # requests waiting for a slot before new ones get a 503


class ClientGone(Exception):
    pass


class Service:
    """The state the handlers share: the scheduler, metrics and prompt settings."""

    def __init__(self, load_engine: Callable[[], Engine], settings: ServerSettings):
        problem = settings.decode.problem()
        if problem:
            raise ModelError(problem)
        self.settings = settings
        self.metrics = ServerMetrics(settings.n_slots)
        self.scheduler = Scheduler(load_engine, settings.n_slots, settings.n_ctx,
                                   settings.max_queue, self.metrics)
        self._prompts: Optional[PromptSettings] = None

    def engine(self) -> Engine:
        """The loaded engine, or the 503 (still loading) / 500 (load failed) a client gets."""
        s = self.scheduler
        if s.load_error is not None:
            raise APIError(500, f"the model failed to load: {s.load_error}")
        if s.engine is None:
            raise APIError(503, "Loading model")
        return s.engine

    def prompt_settings(self) -> PromptSettings:
        if self._prompts is None:
            self._prompts = settings_from_metadata(self.engine().metadata, self.settings.reasoning,
                                                   self.scheduler.slot_ctx, self.settings.decode)
        return self._prompts

    async def events(self, request: Request, gens: list[GenerationRequest]) -> AsyncIterator[tuple[int, object]]:
        """Submit one job per choice and relay their events as (choice index, event), until
        each has given its DoneEvent or the first Failed; a client disconnect cancels them
        all at once."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def deliver_to(index: int):
            return lambda event: loop.call_soon_threadsafe(queue.put_nowait, (index, event))
        jobs = [Job(gen, deliver=deliver_to(i)) for i, gen in enumerate(gens)]
        if len(jobs) > self.scheduler.max_queue:  # no wait would make room: a 400, not a 503
            raise APIError(400, f"the request asks for {len(jobs)} generations (prompts x n); this "
                           f"server queues at most {self.scheduler.max_queue}")
        try:
            self.scheduler.submit(*jobs)
        except QueueFull as err:
            raise APIError(503, str(err)) from None
        gone = asyncio.ensure_future(_disconnected(request))
        running = len(jobs)
        try:
            while running:
                get = asyncio.ensure_future(queue.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    raise ClientGone()
                index, event = get.result()
                yield index, event
                if isinstance(event, Failed):
                    return
                running -= isinstance(event, DoneEvent)
        finally:
            gone.cancel()
            for job in jobs:
                self.scheduler.cancel(job)  # no-op once it has finished

    async def respond(self, kind: str, stream: bool, include_usage: bool, gens: list[GenerationRequest],
                      request: Request, echoes: Optional[list] = None, n: int = 1) -> Response:
        """The reply to one generation request, a choice per entry of `gens`: JSON, or an
        SSE stream ending in [DONE]. echoes: each choice's prompt text its text starts with
        (completions' echo); n: choices a prompt."""
        gen = gens[0]
        builder = ResponseBuilder(kind, self.settings.model_name, self.engine().tokenizer,
                                  logprobs=gen.logprobs is not None, echoes=echoes,
                                  prompt_ids=[g.prompt_ids for g in gens], n=n)
        events = self.events(request, gens)
        if stream:
            # Take the first event here so a full queue is still a plain 503, not a stream.
            try:
                first = await events.__anext__()
            except ClientGone:
                self.record(kind, "disconnected", [])
                return Response(status_code=499)
            echo_first = bool(echoes and echoes[0] is not None) and gen.prompt_logprobs is None  # else with the prompt's scores
            return StreamingResponse(self._stream(kind, builder, len(gens), echo_first, first, events,
                                                  include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        choices = [Choice("", None, [] if builder.logprobs else None) for _ in gens]
        try:
            async for index, event in events:
                got = choices[index]
                if isinstance(event, TokenEvent):
                    got.text += event.text
                    if got.scored is not None:
                        got.scored += event.logprobs or []  # none on the prompt's event
                    got.prompt_scored = got.prompt_scored or event.prompt_logprobs
                elif isinstance(event, Failed):
                    self.record(kind, "error", [])
                    return error_response(500, event.message)
                else:
                    got.done = event
        except ClientGone:
            self.record(kind, "disconnected", [])
            return Response(status_code=499)
        self.record(kind, "ok", [c.done for c in choices], n)
        return JSONResponse(builder.whole(choices))

    async def _stream(self, kind: str, builder: ResponseBuilder, count: int, echo_first: bool,
                      first: tuple[int, object], events: AsyncIterator, include_usage: bool):
        """count: the choices."""
        outcome, dones = "disconnected", {}
        try:
            for index in range(count):
                if kind == "chat":
                    yield sse(builder.first_chunk(index))
                elif echo_first:
                    yield sse(builder.echo_chunk(index, None))
            item = first
            while True:
                index, event = item
                if isinstance(event, TokenEvent):
                    if event.prompt_logprobs is not None:
                        yield sse(builder.echo_chunk(index, event.prompt_logprobs))
                    elif event.text or event.logprobs:  # a token's logprobs may come before its text
                        yield sse(builder.text_chunk(index, event.text, event.logprobs))
                elif isinstance(event, Failed):
                    outcome = "error"
                    yield sse(error_body(500, event.message))
                    break
                else:
                    dones[index] = event
                    yield sse(builder.final_chunk(index, event))
                    if len(dones) == count:
                        outcome = "ok"
                        if include_usage:
                            yield sse(builder.usage_chunk([dones[i] for i in range(count)]))
                        break
                item = await events.__anext__()
            yield sse("[DONE]")
        except ClientGone:
            pass
        finally:
            await events.aclose()
            self.record(kind, outcome, [dones[i] for i in range(count)] if outcome == "ok" else [],
                        builder.n)

    def record(self, endpoint: str, outcome: str, dones: list[DoneEvent], n: int = 1) -> None:
        """One finished request in the metrics: each prompt once (`n` choices a prompt), its
        choices' tokens, forwards and time summed."""
        if not dones:
            self.metrics.requests.labels(endpoint, outcome).inc()
            return
        stats, firsts = [d.stats for d in dones], [d.stats for d in dones[::n]]
        self.metrics.record_generation(endpoint, outcome, sum(s.prompt_tokens for s in firsts),
                                       sum(s.cached_tokens for s in firsts),
                                       sum(s.generated_tokens for s in stats), sum(s.forwards for s in stats),
                                       sum(s.prefill_s + s.decode_s for s in stats))


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next message on the channel is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
