"""`trimode serve`: the OpenAI-compatible server, with llama-server's flags where they apply."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import click

from trimode.cli import kv_cache_of, kv_cache_options
from trimode.runtime.decode import (CPU_DRAFT_LENGTH, DEFAULT_DRAFT_LENGTH, MAX_BLOCK, MODES, DecodeParams,
                                    draft_params)


@click.command()
@click.option("-m", "--model", "model_path", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="GGUF model file (default: the embedded model).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("-c", "--ctx-size", "n_ctx", default=None, type=click.IntRange(min=2),
              help="KV cache tokens over all slots; each slot gets ctx-size / parallel. "
                   "[default: 4096, or the model's context if shorter]")
@click.option("-np", "--parallel", "n_slots", default=1, show_default=True, type=click.IntRange(min=1),
              help="Requests generated concurrently; more wait in arrival order.")
@click.option("-a", "--alias", default=None, help="Model name /v1/models reports (default: the file name).")
@click.option("--api-key", default=None, envvar="TRIMODE_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1 routes, /tokenize, /detokenize, /metrics.")
@click.option("--reasoning", type=click.Choice(["on", "off"]), default="off", show_default=True,
              help="Off: the think block is closed in the prompt and <think> tokens are never generated.")
@click.option("--reasoning-format", type=click.Choice(["none"]), default="none", show_default=True,
              help="How thinking text is returned; 'none' leaves it in the content (llama-server's name).")
@click.option("--mode", type=click.Choice(MODES), default=DecodeParams.mode, show_default=True,
              help="Decoding mode of requests that do not choose one (their 'mode' field).")
@click.option("--draft-length", default=None, type=click.IntRange(0, MAX_BLOCK - 1),
              help="Self-speculation: masked draft slots per cycle, unless a request sets draft_length  "
                   f"[default: {DEFAULT_DRAFT_LENGTH} on a GPU, {CPU_DRAFT_LENGTH} on the CPU to start "
                   "with, then chosen by measured speed].")
@click.option("--max-queue", default=256, show_default=True, type=click.IntRange(min=1),
              help="Requests allowed to wait for a slot; beyond that new ones get a 503.")
@click.option("-t", "--threads", default=None, type=click.IntRange(min=1),
              help="CPU threads for the llvm target  [default: one per physical core]")
@kv_cache_options
def serve(model_path, host, port, n_ctx, n_slots, alias, api_key, reasoning, reasoning_format,
          mode, draft_length, max_queue, threads, cache_type_k, cache_type_v):
    """Serve MODEL over HTTP: /v1/chat/completions, /v1/completions, /v1/models, /health,
    /metrics, /tokenize, /detokenize."""
    # --reasoning-format is accepted so llama-server command lines work; 'none' (thinking
    # text left in the content) is the only format, so there is nothing to pass on.
    del reasoning_format
    kv_cache = kv_cache_of(cache_type_k, cache_type_v)
    if threads is not None:
        os.environ["TVM_NUM_THREADS"] = str(threads)  # read when the runtime's pool starts
    import uvicorn

    from trimode.model.default_model import model_or_default

    model_path = model_or_default(model_path)
    from trimode.model.config import ModelError
    from trimode.runtime.server.app import ServerSettings, create_app

    from trimode.runtime.tvm_runtime import default_target
    target = default_target()

    def load_engine():
        from trimode.runtime.engine import load_engine as load_compiled
        return load_compiled(model_path, target, kv_cache=kv_cache)

    settings = ServerSettings(n_ctx=n_ctx, n_slots=n_slots, model_name=alias or model_path.name,
                              api_key=api_key, reasoning=reasoning == "on", max_queue=max_queue,
                              decode=DecodeParams(mode=mode, **draft_params(target, draft_length)))
    app = create_app(load_engine, settings)
    # Streams still open at Ctrl-C get a few seconds to finish, not their whole max_tokens.
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info",
                                           timeout_graceful_shutdown=5))
    scheduler = app.state.service.scheduler

    def report_load():
        started = time.monotonic()
        click.echo(f"loading {model_path} ...", err=True)
        scheduler.ready.wait()
        if scheduler.load_error is not None:
            server.should_exit = True
            return
        click.echo(f"model loaded in {time.monotonic() - started:.1f} s: {n_slots} slot(s) of "
                   f"{scheduler.slot_ctx} tokens; listening on http://{host}:{port}", err=True)

    threading.Thread(target=report_load, daemon=True).start()
    server.run()
    if scheduler.load_error is not None:
        raise ModelError(scheduler.load_error)
