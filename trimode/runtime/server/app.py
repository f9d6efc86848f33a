"""The OpenAI-compatible HTTP API (FastAPI), in front of the scheduler thread.

    app = create_app(load_engine, ServerSettings(n_ctx=8192, n_slots=2))  # service.py
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
from typing import Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response

from trimode.model.config import ModelError
from trimode.runtime.server.errors import APIError, install_error_handlers
from trimode.runtime.server.prompts import chat_request, choices, completion_request
from trimode.runtime.server.request_body import BoundedJsonBodies
from trimode.runtime.server.scheduler import Engine
from trimode.runtime.server.schemas import (ChatCompletionRequest, CompletionRequest,
                                            DetokenizeRequest, TokenizeRequest)
from trimode.runtime.server.service import Service, ServerSettings

MAX_BODY_BYTES = 8 << 20


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
        return await service.respond("chat", body.stream, body.include_usage, choices(gen, body.n), request,
                                     n=body.n)

    @private.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        engine = service.engine()
        tok, settings = engine.tokenizer, service.prompt_settings()

        def requests() -> tuple[list, list]:
            gens, echoes = [], []
            for prompt in body.prompts():
                gens += choices(completion_request(body, prompt, tok, settings), body.n)
                # echo: the prompt as the client gave it (its ids were checked just above)
                echoes += [(prompt if isinstance(prompt, str) else tok.decode(prompt)) if body.echo else None] * body.n
            return gens, echoes
        gens, echoes = await asyncio.to_thread(requests)
        return await service.respond("completion", body.stream, body.include_usage, gens, request,
                                     echoes, body.n)

    app.include_router(public)
    app.include_router(private)
    app.add_middleware(BoundedJsonBodies, max_bytes=MAX_BODY_BYTES)
    return app
