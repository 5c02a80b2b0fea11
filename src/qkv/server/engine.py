"""The engine: the Batcher on a thread of its own, fed through a queue; and the server's metrics."""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)

from qkv.batching import Batcher, Sequence
from qkv.generate import GenerationConfig
from qkv.model import DecoderLM
from qkv.server.schemas import ApiError
from qkv.tokenizer import Tokenizer

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # Continuation's -> OpenAI's


@dataclass
class Ticket:
    """One sequence handed to the engine, and where its events go (an asyncio queue)."""

    prompt_ids: list[int]
    config: GenerationConfig
    loop: asyncio.AbstractEventLoop
    top_logprobs: int | None = None  # None: no logprobs
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    sequence: Sequence | None = None
    sent: int = 0  # the sequence's logprobs sent so far


class Engine:
    """The Batcher on its own thread: tickets come in through a queue; after every step each
    changed sequence's new text (and, at its end, its finish reason and token count) goes to its
    ticket. At most `max_queue` tickets wait for a row."""

    def __init__(self, model: DecoderLM, tokenizer: Tokenizer, max_batch: int, max_queue: int):
        self.batcher = Batcher(model, tokenizer, max_batch)
        self.max_queue = max_queue
        self.inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.tickets: dict[int, Ticket] = {}
        self.waiting = 0  # tickets submitted and not yet running (read by other threads)
        self.arriving = 0  # tickets in the inbox, not yet taken (under self.lock)
        self.lock = threading.Lock()
        self.stopping = False
        self.deadline: float | None = None  # draining: every row ends at this monotonic time
        self.metrics: Metrics | None = None  # the server's, once it serves
        self.thread = threading.Thread(target=self._loop, name="qkv-engine", daemon=True)
        self.thread.start()

    def check_room(self, count: int) -> None:
        """A 400 for a request of `count` sequences that can never fit the queue, a 503 when the
        engine does not run: checked before any work on the request."""
        if self.deadline is not None:
            raise ApiError(503, "the server is shutting down")
        if not self.running:
            raise ApiError(503, "the server's engine has stopped; restart the server")
        if count > self.max_queue:
            raise ApiError(400, f"this request asks for {count} sequences (prompts x n) but the "
                           f"server queues at most {self.max_queue}; send fewer prompts or a "
                           "smaller n, or start it with a larger --max-queue")  # fmt: skip

    def submit(self, tickets: list[Ticket]) -> None:
        self.check_room(len(tickets))
        if self.waiting + len(tickets) > self.max_queue:
            raise ApiError(503, "the server is busy (its queue is full); retry shortly")
        self.waiting += len(tickets)
        with self.lock:
            self.arriving += len(tickets)
        for ticket in tickets:
            self.inbox.put(("add", ticket))

    def cancel(self, ticket: Ticket) -> None:
        self.inbox.put(("cancel", ticket))

    def call(self, work: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run `work` on the engine's thread between two steps (it may use the model: nothing
        else does meanwhile), at most one such call between two steps; its result or exception
        arrives in the future."""
        self.check_room(0)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.inbox.put(("call", (work, future)))
        return future

    def drain(self, grace: float) -> None:
        """Shutting down: take no new tickets; rows still running after `grace` seconds end
        with finish reason "length"."""
        self.deadline = time.monotonic() + grace
        self.inbox.put(("drain", None))

    def stop(self) -> None:
        self.stopping = True
        self.inbox.put(("stop", None))
        self.thread.join(timeout=10)

    @property
    def running(self) -> bool:
        """Whether the engine's thread is alive to take requests (GET /health says so)."""
        return self.thread.is_alive() and not self.stopping

    def _loop(self) -> None:
        """Take commands, step, publish; an exception in a step ends the sequences in flight
        with an error (each request gets a 500) and the engine goes on with the next ones."""
        while not self.stopping:
            self._take(block=not self.batcher.busy)
            try:
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    self._publish(self.batcher.end_all())
                elif self.batcher.busy:
                    self._publish(self.batcher.step())
            except Exception as err:
                failure = f"the model failed on this batch ({type(err).__name__}: {err})"
                self._abort(failure.splitlines()[0])

    def _abort(self, message: str) -> None:
        """End every sequence in flight with `message` (each request gets a 500); where even
        that fails, tell every ticket and start on a fresh batcher."""
        try:
            self._publish(self.batcher.abort_all(message))
        except Exception:
            for ticket in self.tickets.values():
                ticket.loop.call_soon_threadsafe(ticket.events.put_nowait, ("error", message))
            self.tickets.clear()
            old = self.batcher
            self.batcher = Batcher(old.model, old.tokenizer, old.max_batch)

    def _take(self, block: bool) -> None:
        """Apply the commands queued since the last step (waiting for one when idle)."""
        while True:
            try:
                command, ticket = self.inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if ticket is None:  # stop or drain
                return
            if command == "add":
                with self.lock:
                    self.arriving -= 1
                try:
                    ticket.sequence = self.batcher.add(
                        ticket.prompt_ids, ticket.config, top_logprobs=ticket.top_logprobs
                    )
                except Exception as err:
                    event = ("error", f"the request could not start: {err}")
                    ticket.loop.call_soon_threadsafe(ticket.events.put_nowait, event)
                    continue
                self.tickets[id(ticket.sequence)] = ticket
            elif command == "cancel" and ticket.sequence is not None:
                self.batcher.cancel(ticket.sequence)
                self.tickets.pop(id(ticket.sequence), None)
            elif command == "call":
                work, future = ticket
                if not future.set_running_or_notify_cancel():  # its request went away
                    continue
                try:
                    future.set_result(work())
                except Exception as err:  # handed to the request that asked
                    future.set_exception(err)
                return  # a step before the next call: completions go on between explains

    def _publish(self, changed: list[Sequence]) -> None:
        waiting = sum(1 for s in self.batcher.waiting if not s.cancelled)
        with self.lock:
            self.waiting = waiting + self.arriving
        if self.metrics is not None:
            self.metrics.queue.set(self.waiting)
            self.metrics.running.set(len(self.batcher.running))
        for sequence in changed:
            ticket = self.tickets.get(id(sequence))
            if ticket is None:
                continue
            piece = sequence.continuation.new_text()
            entries = sequence.logprobs[ticket.sent :]
            ticket.sent = len(sequence.logprobs)
            if piece or entries:
                text = ("text", (piece, entries))
                ticket.loop.call_soon_threadsafe(ticket.events.put_nowait, text)
            if sequence.error is not None:
                ticket.loop.call_soon_threadsafe(
                    ticket.events.put_nowait, ("error", sequence.error)
                )
                del self.tickets[id(sequence)]
            elif sequence.finished:
                reason = FINISH[sequence.continuation.stop_reason or "length"]
                done = ("done", (reason, len(sequence.continuation.token_ids)))
                ticket.loop.call_soon_threadsafe(ticket.events.put_nowait, done)
                del self.tickets[id(sequence)]


class Metrics:
    """What GET /metrics shows (Prometheus), on a registry of this server's own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("qkv_requests", "HTTP requests", ["path", "status"], registry=r)
        self.prompt_tokens = Counter("qkv_prompt_tokens", "prompt tokens", registry=r)
        self.completion_tokens = Counter("qkv_completion_tokens", "tokens generated", registry=r)
        self.cancelled = Counter("qkv_cancelled", "sequences whose client left", registry=r)
        self.queue = Gauge("qkv_queue_depth", "sequences waiting for a row", registry=r)
        self.running = Gauge("qkv_running_batch", "sequences decoding together", registry=r)
        self.first_token = Histogram(
            "qkv_time_to_first_token_seconds", "request to its first text", registry=r
        )
        self.inter_token = Histogram(
            "qkv_inter_token_latency_seconds", "between pieces of text", registry=r,
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
        )  # fmt: skip
