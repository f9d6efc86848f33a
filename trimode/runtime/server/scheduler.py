"""The one thread that runs every forward pass: slots, a FIFO queue, round-robin cycles.

The compiled engine is not thread-safe, so this thread loads it, allocates every slot's KV
cache up front (memory is fixed from then on) and runs all generation. Each pass over the
busy slots advances each by one decode cycle (one next() of its generator), so a long
request never blocks the others; requests beyond the slot count wait in arrival order.
Results go back to the web side through each job's `deliver` callback.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Protocol

from trimode.model.config import ModelConfig, ModelError
from trimode.model.tokenizer import Tokenizer
from trimode.runtime.forward import DEFAULT_CTX, Forward
from trimode.runtime.generation import DoneEvent, GenerationRequest, TokenEvent, cached_prefix, generate
from trimode.runtime.server.metrics import ServerMetrics

log = logging.getLogger("trimode.server")


class Engine(Protocol):
    """What the server needs of a loaded model (trimode.runtime.engine.Engine has it)."""
    config: ModelConfig
    tokenizer: Tokenizer
    metadata: dict

    def new_sequence(self, n_ctx: int) -> Forward: ...


@dataclass
class Failed:
    """The generation broke on the engine side; the message is safe to show a client."""
    message: str


class QueueFull(RuntimeError):
    pass


def slot_context(n_ctx: Optional[int], n_slots: int, model_ctx: Optional[int]) -> int:
    """KV tokens per slot: -c (default DEFAULT_CTX, or the model's context if shorter) split
    evenly over -np slots; a ModelError when that cannot work."""
    if n_slots < 1:
        raise ModelError(f"-np must be at least 1, got {n_slots}")
    total = n_ctx if n_ctx is not None else min(DEFAULT_CTX, model_ctx or DEFAULT_CTX)
    per_slot = total // n_slots
    if per_slot < 2:
        raise ModelError(f"-c {total} leaves {per_slot} tokens per slot for -np {n_slots}; "
                         "each slot needs at least 2")
    if model_ctx is not None and per_slot > model_ctx:
        raise ModelError(f"a slot of {per_slot} tokens is longer than the model's context "
                         f"({model_ctx}); lower -c or raise -np")
    return per_slot


@dataclass(eq=False)
class Job:
    request: GenerationRequest
    # Called on the scheduler thread with each TokenEvent, then one DoneEvent or Failed.
    deliver: Callable[[object], None]
    cancelled: bool = False
    cached_tokens: int = 0  # prompt tokens found in the slot's cache when it started


@dataclass(eq=False)
class Slot:
    forward: Forward
    # Ids of the last request (prompt + generated); the cache holds a prefix of them.
    history: list[int] = field(default_factory=list)
    job: Optional[Job] = None
    events: Optional[Iterator] = None

    def reusable_prefix(self, prompt: tuple[int, ...]) -> int:
        return cached_prefix(self.history, self.forward.length, prompt)


class Scheduler:
    def __init__(self, load_engine: Callable[[], Engine], n_slots: int, n_ctx: Optional[int],
                 max_queue: int, metrics: ServerMetrics):
        """n_ctx: KV tokens over all slots (None: see slot_context)."""
        self._load_engine = load_engine
        self.n_slots = n_slots
        self.n_ctx = n_ctx
        self.slot_ctx = slot_context(n_ctx, n_slots, None)  # final once the model is loaded
        self.max_queue = max_queue
        self.metrics = metrics
        self.engine: Optional[Engine] = None
        self.load_error: Optional[str] = None
        self.ready = threading.Event()      # set once loaded, or once loading failed
        self._slots: list[Slot] = []
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name="trimode-scheduler", daemon=True)

    # ---- web side (any thread) ----

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            for job in self._pending:
                job.cancelled = True
            for slot in self._slots:
                if slot.job:
                    slot.job.cancelled = True
            self._cond.notify()
        self._thread.join(timeout)

    def submit(self, *jobs: Job) -> None:
        """Queue the jobs (a request's choices), all of them or, when the queue has no room
        for all, none."""
        with self._cond:
            if len(self._pending) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are already waiting; try again later")
            self._pending.extend(jobs)
            self.metrics.queue_depth.set(len(self._pending))
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        with self._cond:
            job.cancelled = True
            self._cond.notify()

    @property
    def slots(self) -> tuple[Slot, ...]:
        return tuple(self._slots)

    def busy_slots(self) -> int:
        return sum(slot.job is not None for slot in self._slots)

    # ---- scheduler thread ----

    def _main(self) -> None:
        try:
            engine = self._load_engine()
            self.slot_ctx = slot_context(self.n_ctx, self.n_slots, engine.config.context_length)
            engine.tokenizer  # built here, once, rather than racing in the web threads
            self._slots = [Slot(engine.new_sequence(self.slot_ctx)) for _ in range(self.n_slots)]
            self.engine = engine
        except Exception as err:  # reported by /health and the CLI; the thread ends
            self.load_error = str(err) or type(err).__name__
            log.error("loading the model failed: %s", self.load_error)
            return
        finally:
            self.ready.set()
        while True:
            with self._cond:
                self._admit()
                busy = [slot for slot in self._slots if slot.job is not None]
                if not busy:
                    if self._stopping:
                        return
                    self._cond.wait()
                    continue
            for slot in busy:
                try:
                    self._step(slot)
                except Exception as err:  # the thread must outlive any one request
                    log.exception("generation failed")
                    self._abandon(slot, err)

    def _admit(self) -> None:
        """Start waiting jobs, oldest first, on free slots (the one whose cache shares the
        longest prefix with the prompt, so a conversation's next turn reuses its KV)."""
        while self._pending:
            free = [slot for slot in self._slots if slot.job is None]
            if not free:
                break
            job = self._pending.popleft()
            if job.cancelled:
                continue
            prompt = job.request.prompt_ids
            slot = max(free, key=lambda s: s.reusable_prefix(prompt))
            reuse = slot.reusable_prefix(prompt)
            slot.forward.truncate(reuse)
            job.cached_tokens = min(reuse, len(prompt) - 1)
            slot.history = list(prompt)
            slot.job = job
            slot.events = generate(slot.forward, self.engine.tokenizer, job.request)
        self.metrics.queue_depth.set(len(self._pending))
        self.metrics.slots_busy.set(self.busy_slots())

    def _step(self, slot: Slot) -> None:
        job = slot.job
        if job.cancelled:
            slot.events.close()  # stops generation; the cache stays a valid prefix
            self._release(slot)
            return
        try:
            event = next(slot.events)
        except StopIteration:
            event = Failed("generation ended without a result")
        if isinstance(event, TokenEvent):
            slot.history.extend(event.ids)
        if isinstance(event, (DoneEvent, Failed)):
            self._release(slot)  # before the reply: a client that has its answer finds the slot free
        self._send(job, event)

    def _abandon(self, slot: Slot, err: Exception) -> None:
        """Fail the slot's request and free the slot; nothing in its cache is trusted."""
        job, events = slot.job, slot.events
        slot.forward.truncate(0)
        slot.history = []
        self._release(slot)
        if events is not None:
            events.close()
        if job is not None:
            self._send(job, Failed(f"generation failed: {type(err).__name__}: {err}"))

    def _send(self, job: Job, event: object) -> None:
        try:
            job.deliver(event)
        except RuntimeError:  # the web side's event loop is gone (shutting down)
            job.cancelled = True

    def _release(self, slot: Slot) -> None:
        slot.job = None
        slot.events = None
        with self._cond:
            self.metrics.slots_busy.set(self.busy_slots())
