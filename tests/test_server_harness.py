"""A real uvicorn server on 127.0.0.1 over the float64 reference forward, for the server
tests (imported by them; holds no tests of its own).

ReferenceEngine has the Engine interface the server needs (.config, .tokenizer, .metadata,
.new_sequence) over trimode.model.reference, so tests exercise the whole server quickly
without compiling anything.
"""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import uvicorn

from trimode.model.chat import render_chat
from trimode.model.gguf_file import load_model
from trimode.model.reference import ReferenceForward, ReferenceModel
from trimode.model.tokenizer import Tokenizer
from trimode.runtime.server.app import ServerSettings, create_app


class ReferenceEngine:
    def __init__(self, path: Path):
        model = load_model(path)
        self.config = model.config
        self.metadata = model.metadata
        self.tokenizer = Tokenizer.from_metadata(model.metadata)
        self.model = ReferenceModel(model.config, model.weights)

    def new_sequence(self, n_ctx: int) -> ReferenceForward:
        return ReferenceForward(self.model, n_ctx)


class RunningServer:
    def __init__(self, app, server: uvicorn.Server, thread: threading.Thread, port: int):
        self.app = app
        self.server = server
        self.thread = thread
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"

    @property
    def service(self):
        return self.app.state.service


@contextmanager
def serve(load_engine, settings: ServerSettings, wait_ready: bool = True):
    """Run the app on a free port in a thread; stop it on exit."""
    app = create_app(load_engine, settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    running = RunningServer(app, server, thread, port)
    if wait_ready:
        running.service.scheduler.ready.wait(120)
    try:
        yield running
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def greedy_reference(model: ReferenceModel, prompt: list[int], n: int, eos: int) -> list[int]:
    """Greedy AR continuation recomputed from scratch at every step (no KV cache): the oracle
    the server's output is compared with."""
    cfg = model.config
    empty = [np.zeros((0, cfg.n_kv_heads, cfg.head_dim))] * cfg.n_layers
    ids, out = list(prompt), []
    for _ in range(n):
        logits, _, _ = model.forward(ids, empty, empty, causal=True)
        token = int(logits[-1].argmax())
        if token == eos:
            break
        out.append(token)
        ids.append(token)
    return out


def chat_prompt_ids(engine: ReferenceEngine, messages: list[dict], reasoning: bool = False) -> list[int]:
    """The prompt a chat request should become: the GGUF template, BOS first."""
    tok = engine.tokenizer
    text = render_chat(engine.metadata.get("tokenizer.chat_template"), messages,
                       add_generation_prompt=True, reasoning=reasoning)
    ids = tok.encode_template(text)
    return ids if ids[:1] == [tok.bos_id] else [tok.bos_id, *ids]
