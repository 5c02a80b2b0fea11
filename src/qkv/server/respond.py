"""Completions: a request's tickets handed to the engine, and its answer as JSON or as a stream."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from qkv.batching import TokenLogprob
from qkv.errors import QkvError
from qkv.generate import GenerationConfig
from qkv.server.engine import Ticket
from qkv.server.schemas import ApiError, Sampling
from qkv.server.served import Served

# (choice index, new text, finish reason or None, new logprobs) -> one choice of a response
Shape = Callable[[int, str, str | None, list[TokenLogprob]], dict[str, Any]]


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


def tickets_for(served: Served, request: Sampling, prompts: list[list[int]],
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


async def respond(
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
                    elif event == "error":  # the model failed this sequence: a 500
                        raise ApiError(500, value)
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
        try:
            async for index, event, value in events():
                if event == "text":
                    chunk = envelope(chunk_kind, [shape(index, value[0], None, value[1])])
                    yield f"data: {json.dumps(chunk)}\n\n"
                else:
                    completion_tokens += value[1]
                    last = envelope(chunk_kind, [shape(index, "", value[0], [])])
                    yield f"data: {json.dumps(last)}\n\n"
        except ApiError as err:  # mid-stream: the error object as the last event
            yield f"data: {json.dumps(err.body())}\n\n"
            return
        if usage:
            tail = envelope(chunk_kind, []) | {"usage": _usage(prompt_tokens, completion_tokens)}
            yield f"data: {json.dumps(tail)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")
