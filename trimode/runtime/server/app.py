"""The OpenAI-compatible HTTP API (FastAPI), in front of the scheduler thread.

    app = create_app(load_engine, ServerSettings(n_ctx=8192, n_slots=2))
    uvicorn.run(app, host="127.0.0.1", port=8080)

The app binds at once and loads the model in the background: /health answers 503 until the
engine is ready. Handlers only validate, tokenize and relay; every forward pass runs on the
scheduler thread.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from trimode.model.config import ModelError
from trimode.runtime.generation import DecodeParams, DoneEvent, GenerationRequest, TokenEvent
from trimode.runtime.server.errors import APIError, error_response, install_error_handlers
from trimode.runtime.server.metrics import ServerMetrics
from trimode.runtime.server.request_body import BoundedJsonBodies
from trimode.runtime.server.prompts import (PromptSettings, chat_request, completion_request,
                                            settings_from_metadata)
from trimode.runtime.server.responses import ResponseBuilder, sse
from trimode.runtime.server.scheduler import Engine, Failed, Job, QueueFull, Scheduler
from trimode.runtime.server.schemas import (ChatCompletionRequest, CompletionRequest,
                                            DetokenizeRequest, TokenizeRequest)

MAX_BODY_BYTES = 8 << 20


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


def create_app(load_engine: Callable[[], Engine], settings: ServerSettings) -> FastAPI:
    service = Service(load_engine, settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        service.scheduler.start()
        yield
        await asyncio.to_thread(service.scheduler.stop)

    app = FastAPI(title="trimode", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API for tri-mode diffusion language models.")
    app.state.service = service
    install_error_handlers(app)

    def authorized(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 settings.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)")

    public = APIRouter()
    private = APIRouter(dependencies=[Depends(authorized)])

    @public.get("/health")
    def health():
        service.engine()
        return {"status": "ok"}

    @private.get("/metrics")
    def metrics():
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @private.get("/v1/models")
    def models():
        engine = service.engine()
        cfg = engine.config
        return {"object": "list", "data": [{
            "id": settings.model_name, "object": "model", "created": int(time.time()),
            "owned_by": "trimode",
            "meta": {"n_ctx": service.scheduler.slot_ctx * settings.n_slots,
                     "n_ctx_slot": service.scheduler.slot_ctx,
                     "n_slots": settings.n_slots, "n_ctx_train": cfg.context_length,
                     "n_vocab": cfg.vocab, "n_layers": cfg.n_layers, "n_embd": cfg.hidden}}]}

    @private.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        tok = service.engine().tokenizer
        encode = tok.encode_template if body.parse_special else tok.encode
        ids = await asyncio.to_thread(encode, body.content, body.add_special)
        return {"tokens": ids}

    @private.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        tok = service.engine().tokenizer
        try:
            return {"content": await asyncio.to_thread(tok.decode, body.tokens)}
        except ModelError as err:
            raise APIError(400, str(err), "tokens") from None

    @private.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        engine = service.engine()
        gen = await asyncio.to_thread(chat_request, body, engine.tokenizer, service.prompt_settings())
        return await _respond("chat", body.stream, body.include_usage, gen, request)

    @private.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        engine = service.engine()
        gen = await asyncio.to_thread(completion_request, body, engine.tokenizer,
                                      service.prompt_settings())
        return await _respond("completion", body.stream, body.include_usage, gen, request)

    async def _respond(kind: str, stream: bool, include_usage: bool, gen: GenerationRequest,
                       request: Request):
        builder = ResponseBuilder(kind, settings.model_name)
        events = service.events(request, gen)
        if stream:
            # Take the first event here so a full queue is still a plain 503, not a stream.
            try:
                first = await events.__anext__()
            except ClientGone:
                service.record(kind, "disconnected", None)
                return Response(status_code=499)
            return StreamingResponse(_stream(kind, builder, first, events, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text, done = [], None
        try:
            async for event in events:
                if isinstance(event, TokenEvent):
                    text.append(event.text)
                elif isinstance(event, Failed):
                    service.record(kind, "error", None)
                    return error_response(500, event.message)
                else:
                    done = event
        except ClientGone:
            service.record(kind, "disconnected", None)
            return Response(status_code=499)
        service.record(kind, "ok", done)
        return JSONResponse(builder.whole("".join(text), done))

    async def _stream(kind: str, builder: ResponseBuilder, first: object, events: AsyncIterator,
                      include_usage: bool):
        outcome, done = "disconnected", None
        try:
            if kind == "chat":
                yield sse(builder.first_chunk())
            event = first
            while True:
                if isinstance(event, TokenEvent):
                    if event.text:
                        yield sse(builder.text_chunk(event.text))
                elif isinstance(event, Failed):
                    outcome = "error"
                    yield sse({"error": {"message": event.message, "type": "server_error",
                                         "param": None, "code": 500}})
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
            service.record(kind, outcome, done)

    app.include_router(public)
    app.include_router(private)
    app.add_middleware(BoundedJsonBodies, max_bytes=MAX_BODY_BYTES)
    return app
