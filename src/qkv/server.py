"""Serving: OpenAI's HTTP API over one continuously batched model (FastAPI + uvicorn).

    POST /v1/completions        {"model", "prompt": str | [str], "max_tokens", "temperature", ...}
    POST /v1/chat/completions   {"model", "messages": [{"role", "content"}], ...}: qkv's template
    POST /v1/embeddings         {"model", "input": str | [str] | [int] | [[int]]}: encoders only
    POST /v1/explain            {"text" | "token_ids", "layers", "heads", "top", sampling}: every
                                stage of one forward pass (qkv.explain.payload); GET / shows it
    GET  /v1/models, GET /health, GET /metrics (Prometheus), POST /tokenize, POST /detokenize

One engine thread owns the Batcher (qkv.batching): requests are handed to it through a queue and
join the running batch at its next step; each request's text comes back piece by piece (the
incremental detokenizer holds back a possible start of a stop string), streamed as server-sent
events in OpenAI's chunk format, or gathered. Errors are OpenAI's error object
{"error": {"message", "type", "param", "code"}} with 400 (invalid request), 401 (API key),
404 (unknown model), 413 (body too large) or 503 (queue full, with Retry-After).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import queue
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

from qkv.batching import Batcher, Sequence, TokenLogprob
from qkv.chat_template import chat_prompt, chat_stops, has_chat_template
from qkv.checkpoint import load_for_inference
from qkv.device import resolve_device
from qkv.embed import embed_ids
from qkv.errors import QkvError
from qkv.explain import MAX_WORDS, NOTES_SENTENCE, explain_model, explain_text, payload
from qkv.explorer import page
from qkv.generate import GenerationConfig
from qkv.model import DecoderLM, Encoder, EncoderDecoder
from qkv.sampling import SamplingConfig
from qkv.tokenizer import Tokenizer

MAX_BODY = 8 << 20  # bytes of a request body
MAX_EXPLAINS = 4  # explain requests waiting for or holding the model; more get a 503
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # Continuation's -> OpenAI's


class ApiError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(
        self, status: int, message: str, param: str | None = None, kind: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": None}
        return JSONResponse({"error": body}, self.status, headers=headers)


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """The request fields both endpoints take (OpenAI's, and vLLM's top_k and
    repetition_penalty)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 8 or not all(stops):
            raise ValueError("give at most 8 stop strings, none empty")
        return stops


class CompletionRequest(Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)  # this many alternatives per token


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class TokenizeRequest(BaseModel):
    prompt: str | None = None
    messages: list[Message] | None = None


class DetokenizeRequest(BaseModel):
    tokens: list[int]


class ExplainRequest(BaseModel):
    """POST /v1/explain: a text (or its token ids), which layers and heads to include, how many
    top entries of vocabulary-wide stages, the sampling of the next-token panel, and whether to
    draw one token (with `seed`)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    text: str | None = None
    token_ids: list[int] | None = None
    layers: list[int] | None = Field(None, min_length=1)
    heads: list[int] | None = Field(None, min_length=1)
    top: int = Field(10, ge=1, le=100)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
    sample: bool = False
    seed: int | None = Field(None, ge=0, lt=2**63)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


# (choice index, new text, finish reason or None, new logprobs) -> one choice of a response
Shape = Callable[[int, str, str | None, list[TokenLogprob]], dict[str, Any]]


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

    def submit(self, tickets: list[Ticket]) -> None:
        if self.deadline is not None:
            raise ApiError(503, "the server is shutting down")
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
        else does meanwhile); its result or exception arrives in the future."""
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

    def _loop(self) -> None:
        while not self.stopping:
            self._take(block=not self.batcher.busy)
            if self.deadline is not None and time.monotonic() >= self.deadline:
                self._publish(self.batcher.end_all())
            elif self.batcher.busy:
                self._publish(self.batcher.step())

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
                ticket.sequence = self.batcher.add(
                    ticket.prompt_ids, ticket.config, top_logprobs=ticket.top_logprobs
                )
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
            if sequence.finished:
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


@dataclass
class Served:
    """What the app serves: a decoder (with its engine) or an encoder, its tokenizer, the name
    clients use; or, with no model, the notes' example (POST /v1/explain and the page only)."""

    model: DecoderLM | Encoder | EncoderDecoder | None
    tokenizer: Tokenizer | None
    name: str
    engine: Engine | None  # None for an encoder
    api_key: str | None = None
    metrics: Metrics = field(default_factory=Metrics)
    encoding: asyncio.Lock = field(default_factory=asyncio.Lock)  # one embedding batch at a time
    explaining: int = 0  # explain requests waiting for or holding the model (event loop only)
    summary: str = ""  # what runs: family, parameters, dtype, memory

    @property
    def window(self) -> int:
        return MAX_WORDS if self.model is None else self.model.config.max_seq_len

    def loaded(self) -> tuple[DecoderLM | Encoder | EncoderDecoder, Tokenizer]:
        """The model and its tokenizer, or a 400 when serving the notes' example."""
        if self.model is None or self.tokenizer is None:
            message = ("this server explains the notes' untrained example and has no trained "
                       "model or tokenizer: start it with --model DIR")  # fmt: skip
            raise ApiError(400, message, "model")
        return self.model, self.tokenizer

    async def exclusive(self, work: Callable[[], Any]) -> Any:
        """Run `work` (which may use the model) off the event loop, alone with the model: on the
        engine's thread between steps, under the encoder's lock, or (the notes' example, a
        model of its own per call) on a worker thread. At most MAX_EXPLAINS wait at a time;
        running out of memory is a 503, the server keeps serving."""
        if self.explaining >= MAX_EXPLAINS:
            raise ApiError(503, f"the server is busy ({MAX_EXPLAINS} explain requests are "
                           "waiting); retry shortly")  # fmt: skip
        self.explaining += 1
        try:
            if self.engine is not None:
                return await asyncio.wrap_future(self.engine.call(work))
            async with self.encoding:
                return await asyncio.to_thread(work)
        except (MemoryError, torch.OutOfMemoryError):
            raise ApiError(503, "not enough memory to explain this input; give a shorter text "
                           "or fewer layers") from None  # fmt: skip
        finally:
            self.explaining -= 1

    def settings(self) -> dict[str, Any]:
        """What the explorer page needs to know of this server: its model's name, whether it
        is the notes' example, whether it chats (a decoder with role tokens) and whether its
        next token can be sampled and appended (a decoder, or the notes' example)."""
        decoder = isinstance(self.model, DecoderLM)
        notes = self.model is None
        chat = decoder and self.tokenizer is not None and has_chat_template(self.tokenizer)
        return {"api": True, "model": self.name, "notes": notes, "text": NOTES_SENTENCE,
                "chat": chat, "sample": decoder or notes}  # fmt: skip

    def check_name(self, name: str | None) -> None:
        if name not in (None, self.name):
            raise ApiError(404, f"the model {name!r} does not exist; this server has "
                           f"{self.name!r}", "model", "invalid_request_error")  # fmt: skip

    def check_ids(self, ids: list[int], param: str) -> None:
        size = self.tokenizer.vocab_size
        if any(not 0 <= t < size for t in ids):
            raise ApiError(400, f"{param}: token ids must be 0 to {size - 1}", param)

    def decoding(self) -> Engine:
        """The engine, or a 400 for an encoder."""
        model, _ = self.loaded()
        if isinstance(model, EncoderDecoder):
            raise ApiError(400, f"{self.name} is an encoder-decoder: it serves /v1/explain and "
                           "the page at / only", "model")  # fmt: skip
        if self.engine is None:
            raise ApiError(400, f"{self.name} is an encoder: it serves /v1/embeddings, not "
                           "completions", "model")  # fmt: skip
        return self.engine


def _config(request: Sampling, stop: tuple[str, ...], seed: int, room: int) -> GenerationConfig:
    tokens = request.max_completion_tokens or request.max_tokens or 16
    try:
        return GenerationConfig(
            max_new_tokens=min(tokens, room),
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            repetition_penalty=request.repetition_penalty,
            seed=seed,
            stop=stop,
        )
    except QkvError as err:
        raise ApiError(400, str(err)) from None


def _tickets(served: Served, request: Sampling, prompts: list[list[int]],
             stop: tuple[str, ...], top_logprobs: int | None) -> list[Ticket]:  # fmt: skip
    """One ticket per (prompt, n): seeds seed, seed + 1, ... (a random seed when none)."""
    served.check_name(request.model)
    seed = request.seed if request.seed is not None else secrets.randbelow(2**62)
    loop = asyncio.get_running_loop()
    tickets = []
    for number, ids in enumerate(prompts):
        if not ids:
            raise ApiError(400, f"prompt {number} is empty", "prompt")
        if len(ids) >= served.window:
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens but the model's context is {served.window}: "
                "shorten it",
                "prompt",
            )
        for choice in range(request.n):
            config = _config(request, stop, seed + choice, served.window - len(ids))
            tickets.append(Ticket(ids, config, loop, top_logprobs))
    return tickets


def _usage(prompts: int, completions: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompts,
        "completion_tokens": completions,
        "total_tokens": prompts + completions,
    }


async def _respond(
    served: Served,
    request: Sampling,
    tickets: list[Ticket],
    kind: str,
    shape: Shape,
) -> Any:
    """Run the tickets; a JSON response, or an SSE stream of chunks ending in [DONE]."""
    engine = served.decoding()
    engine.submit(tickets)
    ident, created = f"{kind[:4]}-{secrets.token_hex(12)}", int(time.time())
    prompt_tokens = sum(len(t.prompt_ids) for t in tickets[:: request.n])

    def envelope(obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": ident, "object": obj, "created": created, "model": served.name,
                "choices": choices}  # fmt: skip

    metrics = served.metrics
    metrics.prompt_tokens.inc(prompt_tokens)
    started = time.perf_counter()
    last: dict[int, float] = {}  # ticket -> when its last text came

    async def events() -> AsyncIterator[tuple[int, str, Any]]:
        pending = {asyncio.ensure_future(t.events.get()): i for i, t in enumerate(tickets)}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    index = pending.pop(future)
                    event, value = future.result()
                    now = time.perf_counter()
                    if event == "text":
                        if index in last:
                            metrics.inter_token.observe(now - last[index])
                        else:
                            metrics.first_token.observe(now - started)
                        last[index] = now
                        pending[asyncio.ensure_future(tickets[index].events.get())] = index
                    else:
                        metrics.completion_tokens.inc(value[1])
                    yield index, event, value
        finally:
            for future in pending:
                future.cancel()
            for index in pending.values():
                engine.cancel(tickets[index])
                metrics.cancelled.inc()

    if not request.stream:
        texts, reasons, counts = [""] * len(tickets), [""] * len(tickets), [0] * len(tickets)
        entries: list[list[TokenLogprob]] = [[] for _ in tickets]
        async for index, event, value in events():
            if event == "text":
                texts[index] += value[0]
                entries[index] += value[1]
            else:
                reasons[index], counts[index] = value
        choices = [shape(i, texts[i], reasons[i], entries[i]) for i in range(len(tickets))]
        return JSONResponse(
            {**envelope(kind, choices), "usage": _usage(prompt_tokens, sum(counts))}
        )

    chunk_kind = kind + (".chunk" if kind.startswith("chat") else "")
    usage = request.stream_options is not None and request.stream_options.include_usage

    async def stream() -> AsyncIterator[str]:
        completion_tokens = 0
        if kind.startswith("chat"):
            for index in range(len(tickets)):
                delta = {"role": "assistant", "content": ""}
                first = {"index": index, "delta": delta, "finish_reason": None, "logprobs": None}
                yield f"data: {json.dumps(envelope(chunk_kind, [first]))}\n\n"
        async for index, event, value in events():
            if event == "text":
                chunk = envelope(chunk_kind, [shape(index, value[0], None, value[1])])
                yield f"data: {json.dumps(chunk)}\n\n"
            else:
                completion_tokens += value[1]
                last = envelope(chunk_kind, [shape(index, "", value[0], [])])
                yield f"data: {json.dumps(last)}\n\n"
        if usage:
            tail = envelope(chunk_kind, []) | {"usage": _usage(prompt_tokens, completion_tokens)}
            yield f"data: {json.dumps(tail)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


class Guard:
    """ASGI middleware around the app: refuses a request before it is read (a body too large,
    a wrong API key) and counts every request by path and status. Plain ASGI, so a streamed
    response's chunks go straight through."""

    def __init__(self, app: ASGIApp, served: Served) -> None:
        self.app, self.served = app, served

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        status = 500

        async def sending(message: AsgiMessage) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await (self.refusal(request) or self.app)(scope, receive, sending)
        finally:
            self.served.metrics.requests.labels(request.url.path, str(status)).inc()

    def refusal(self, request: Request) -> JSONResponse | None:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY:
            return ApiError(413, f"the request body is over {MAX_BODY >> 20} MiB").response()
        key = self.served.api_key
        if request.url.path.startswith("/v1/") and key is not None:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given, f"Bearer {key}"):
                return ApiError(401, "a missing or wrong API key; send 'Authorization: Bearer "
                                "KEY'", kind="authentication_error").response()  # fmt: skip
        return None


def create_app(served: Served) -> FastAPI:
    """The FastAPI application serving `served`."""
    app = FastAPI(title="qkv", docs_url=None, redoc_url=None)

    app.add_middleware(Guard, served=served)

    @app.exception_handler(QkvError)
    async def refused(request: Request, err: QkvError) -> JSONResponse:
        return ApiError(400, str(err)).response()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        retry = {"Retry-After": "1"} if err.status == 503 else None
        return err.response(retry)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = "the body is not UTF-8 JSON" if err.status_code == 400 else str(err.detail)
        return ApiError(err.status_code, message).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            return ApiError(400, f"the body is not valid JSON ({first.get('msg')})").response()
        message = f"{'.'.join(where) or 'body'}: {first.get('msg')}"
        return ApiError(400, message, where[0] if where else None).response()

    @app.get("/", include_in_schema=False)
    async def explorer() -> HTMLResponse:
        return HTMLResponse(page(served.settings()))

    @app.post("/v1/explain")
    async def explain(body: ExplainRequest) -> JSONResponse:
        served.check_name(body.model)
        if (body.text is None) == (body.token_ids is None):
            raise ApiError(400, "give the text to explain as `text`, or its `token_ids` (one of "
                           "the two)", "text")  # fmt: skip
        sampling = SamplingConfig(body.temperature, body.top_k, body.top_p, body.repetition_penalty)
        seed = None
        if body.sample:
            seed = body.seed if body.seed is not None else secrets.randbelow(2**62)

        def work() -> dict[str, Any]:
            if served.model is None or served.tokenizer is None:
                if body.text is None:
                    raise ApiError(400, "the notes' example takes `text` (its words are its "
                                   "vocabulary), not token_ids", "token_ids")  # fmt: skip
                walkthrough = explain_text(body.text)
            else:
                walkthrough = explain_model(served.model, served.tokenizer, body.text,
                                            body.token_ids)  # fmt: skip
            return payload(walkthrough, body.layers, body.heads, body.top, sampling, seed)

        data = await served.exclusive(work)
        text = await asyncio.to_thread(json.dumps, data, allow_nan=False)  # megabytes: off the loop
        return Response(text, media_type="application/json")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(served.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        _, tokenizer = served.loaded()
        if body.messages is not None:
            tokens = chat_prompt([(m.role, m.content) for m in body.messages], tokenizer)
        else:
            tokens = tokenizer.encode_inputs([body.prompt or ""])[0]
        return {"tokens": tokens, "count": len(tokens), "max_model_len": served.window}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        served.loaded()
        served.check_ids(body.tokens, "tokens")
        return {"prompt": served.tokenizer.decode(body.tokens)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": served.name, "object": "model", "created": 0, "owned_by": "qkv",
                "max_model_len": served.window}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        served.decoding()
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts:
            raise ApiError(400, "prompt: give at least one prompt", "prompt")
        prompts = served.tokenizer.encode_inputs(texts)
        tickets = _tickets(served, body, prompts, tuple(body.stop or ()), body.logprobs)

        def alternatives(entry: TokenLogprob) -> dict[str, float]:
            """text -> log p, likeliest first; tokens that decode alike keep the likeliest."""
            found: dict[str, float] = {}
            for token_id, logprob in entry.top:
                found.setdefault(served.tokenizer.decode([token_id]), logprob)
            return found

        def shape(index: int, text: str, reason: str | None,
                  entries: list[TokenLogprob]) -> dict[str, Any]:  # fmt: skip
            logprobs = None
            if body.logprobs is not None:
                tokens = [served.tokenizer.decode([e.token]) for e in entries]
                logprobs = {
                    "tokens": tokens,
                    "token_logprobs": [e.logprob for e in entries],
                    "top_logprobs": [alternatives(e) for e in entries],
                    "text_offset": [sum(map(len, tokens[:i])) for i in range(len(tokens))],
                }
            return {"index": index, "text": text, "finish_reason": reason, "logprobs": logprobs}

        return await _respond(served, body, tickets, "text_completion", shape)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest) -> Any:
        served.decoding()
        if not has_chat_template(served.tokenizer):
            raise ApiError(400, "this model has no chat template (no role tokens, no "
                           "chat_template of its own); use /v1/completions, or fine-tune it "
                           "with `qkv finetune`", "messages")  # fmt: skip
        turns = [(m.role, m.content) for m in body.messages]
        prompt = chat_prompt(turns, served.tokenizer)
        stop = (*chat_stops(served.tokenizer), *(body.stop or ()))
        top = (body.top_logprobs or 0) if body.logprobs else None
        tickets = _tickets(served, body, [prompt], stop, top)

        def token(token_id: int, logprob: float) -> dict[str, Any]:
            text = served.tokenizer.decode([token_id])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        def shape(index: int, text: str, reason: str | None,
                  entries: list[TokenLogprob]) -> dict[str, Any]:  # fmt: skip
            logprobs = None
            if top is not None:
                logprobs = {"content": [
                    token(e.token, e.logprob) | {"top_logprobs": [token(*t) for t in e.top]}
                    for e in entries
                ]}  # fmt: skip
            if body.stream:
                return {"index": index, "delta": {"content": text} if text else {},
                        "finish_reason": reason, "logprobs": logprobs}  # fmt: skip
            message = {"role": "assistant", "content": text}
            return {"index": index, "message": message, "finish_reason": reason,
                    "logprobs": logprobs}  # fmt: skip

        return await _respond(served, body, tickets, "chat.completion", shape)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        served.check_name(body.model)
        served.loaded()
        if not isinstance(served.model, Encoder):
            kind = "an encoder-decoder" if isinstance(served.model, EncoderDecoder) else "a decoder"
            raise ApiError(400, f"{served.name} is {kind}; embeddings need an encoder (such "
                           "as a BERT directory)", "model")  # fmt: skip
        size = served.model.config.d_model
        if body.dimensions not in (None, size):
            raise ApiError(400, f"dimensions: this model's embeddings have {size}", "dimensions")
        rows = _embedding_rows(served, body.input)
        async with served.encoding:
            vectors = await asyncio.to_thread(
                embed_ids, served.model, rows, served.tokenizer.pad_id
            )
        data = [
            {"object": "embedding", "index": i, "embedding": _vector(vector, body.encoding_format)}
            for i, vector in enumerate(vectors)
        ]
        tokens = sum(map(len, rows))
        served.metrics.prompt_tokens.inc(tokens)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return {"object": "list", "data": data, "model": served.name, "usage": usage}

    return app


def _embedding_rows(served: Served, given: str | list[str] | list[int] | list[list[int]]
                    ) -> list[list[int]]:  # fmt: skip
    """An embedding request's input as token id rows, each checked: not empty, in the context,
    ids in the vocabulary."""
    if isinstance(given, str):
        given = [given]
    if not given:
        raise ApiError(400, "input: give at least one text", "input")
    if isinstance(given[0], int):
        given = [given]  # one row of ids
    if isinstance(given[0], str):
        rows = served.tokenizer.encode_inputs(given)
        empty = [i for i, text in enumerate(given) if not text.strip()]
    else:
        rows, empty = given, [i for i, ids in enumerate(given) if not ids]
        served.check_ids([t for ids in rows for t in ids], "input")
    if empty:
        raise ApiError(400, f"input {empty[0]} is empty", "input")
    for number, ids in enumerate(rows):
        if len(ids) > served.window:
            raise ApiError(400, f"input {number} has {len(ids)} tokens but the model's context "
                           f"is {served.window}: shorten it", "input")  # fmt: skip
    return rows


def _vector(vector: torch.Tensor, encoding: str) -> list[float] | str:
    """A vector as JSON floats, or base64 of its little-endian float32 bytes (OpenAI's)."""
    if encoding == "float":
        return vector.tolist()
    return base64.b64encode(vector.float().numpy().astype("<f4").tobytes()).decode("ascii")


def load_served(
    model_dir: str | Path,
    device: str = "auto",
    name: str | None = None,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    dtype: str = "float32",
) -> Served:
    """A decoder (from a checkpoint, run, adapter or Hugging Face directory) or an encoder,
    ready to serve, in `dtype` (checkpoint.load_for_inference; `.summary` says what runs)."""
    model, tokenizer, summary = load_for_inference(model_dir, resolve_device(device), dtype)
    torch.set_flush_denormal(True)
    engine = (
        Engine(model, tokenizer, max_batch, max_queue) if isinstance(model, DecoderLM) else None
    )
    served = Served(model.eval(), tokenizer, name or Path(model_dir).name, engine, api_key,
                    summary=summary)  # fmt: skip
    if engine is not None:
        engine.metrics = served.metrics
    return served


def check_port(port: int) -> None:
    if not 0 < port < 65536:
        raise QkvError(f"--port must be 1 to 65535, got {port}")


def notes_served() -> Served:
    """The notes' example for the explorer: each text's words through a fresh seeded 4-dimensional
    decoder (qkv.explain.explain_text); no completions, chat or embeddings."""
    return Served(None, None, "notes-example", None)


def serve(
    served: Served,
    host: str = "127.0.0.1",
    port: int = 8000,
    grace: float = 3.0,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Run the HTTP server until Ctrl-C / SIGTERM: then no new requests; running ones get
    `grace` seconds to finish, and the rest end with finish reason "length". `on_ready` is
    called once the server listens (`qkv explore` opens the browser then)."""
    import uvicorn

    check_port(port)

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if on_ready is not None and self.started:
                on_ready()

        def handle_exit(self, sig: int, frame: Any) -> None:
            if served.engine is not None and served.engine.deadline is None:
                served.engine.drain(grace)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        create_app(served), host=host, port=port, log_level="warning",
        timeout_graceful_shutdown=grace + 2,
    )  # fmt: skip
    try:
        Server(config).run()
    finally:
        if served.engine is not None:
            served.engine.stop()
