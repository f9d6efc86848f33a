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
from trimode.runtime.server.responses import ResponseBuilder, sse
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

    async def events(self, request: Request, gen: GenerationRequest) -> AsyncIterator[object]:
        """Submit `gen` and relay its events; a client disconnect cancels it at once."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job = Job(gen, deliver=lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
        try:
            self.scheduler.submit(job)
        except QueueFull as err:
            raise APIError(503, str(err)) from None
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while True:
                get = asyncio.ensure_future(queue.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    raise ClientGone()
                event = get.result()
                yield event
                if isinstance(event, (DoneEvent, Failed)):
                    return
        finally:
            gone.cancel()
            self.scheduler.cancel(job)  # no-op once it has finished

    async def respond(self, kind: str, stream: bool, include_usage: bool, gen: GenerationRequest,
                      request: Request, echo: Optional[str] = None) -> Response:
        """The reply to one generation request: JSON, or an SSE stream ending in [DONE].
        echo: the prompt text a completion's text starts with."""
        builder = ResponseBuilder(kind, self.settings.model_name, self.engine().tokenizer,
                                  logprobs=gen.logprobs is not None, echo=echo,
                                  prompt_ids=gen.prompt_ids)
        events = self.events(request, gen)
        if stream:
            # Take the first event here so a full queue is still a plain 503, not a stream.
            try:
                first = await events.__anext__()
            except ClientGone:
                self.record(kind, "disconnected", None)
                return Response(status_code=499)
            return StreamingResponse(self._stream(kind, builder, first, events, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text, scored, prompt_scored, done = [], [], None, None
        try:
            async for event in events:
                if isinstance(event, TokenEvent):
                    text.append(event.text)
                    scored += event.logprobs or []
                    prompt_scored = prompt_scored or event.prompt_logprobs
                elif isinstance(event, Failed):
                    self.record(kind, "error", None)
                    return error_response(500, event.message)
                else:
                    done = event
        except ClientGone:
            self.record(kind, "disconnected", None)
            return Response(status_code=499)
        self.record(kind, "ok", done)
        return JSONResponse(builder.whole("".join(text), done, scored, prompt_scored))

    async def _stream(self, kind: str, builder: ResponseBuilder, first: object,
                      events: AsyncIterator, include_usage: bool):
        outcome, done = "disconnected", None
        try:
            if kind == "chat":
                yield sse(builder.first_chunk())
            elif builder.echo is not None and getattr(first, "prompt_logprobs", None) is None:
                yield sse(builder.echo_chunk(None))
            event = first
            while True:
                if isinstance(event, TokenEvent):
                    if event.prompt_logprobs is not None:
                        yield sse(builder.echo_chunk(event.prompt_logprobs))
                    elif event.text or event.logprobs:  # a token's logprobs may come before its text
                        yield sse(builder.text_chunk(event.text, event.logprobs))
                elif isinstance(event, Failed):
                    outcome = "error"
                    yield sse(error_body(500, event.message))
                    break
                else:
                    outcome, done = "ok", event
                    for chunk in builder.final_chunk(event, include_usage):
                        yield sse(chunk)
                    break
                event = await events.__anext__()
            yield sse("[DONE]")
        except ClientGone:
            pass
        finally:
            await events.aclose()
            self.record(kind, outcome, done)

    def record(self, endpoint: str, outcome: str, done: Optional[DoneEvent]) -> None:
        if done is None:
            self.metrics.requests.labels(endpoint, outcome).inc()
            return
        s = done.stats
        self.metrics.record_generation(endpoint, outcome, s.prompt_tokens, s.cached_tokens,
                                       s.generated_tokens, s.forwards, s.prefill_s + s.decode_s)


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next message on the channel is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
