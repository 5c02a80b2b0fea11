"""The FastAPI application: every route, and the uvicorn server running it."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from qkv.batching import TokenLogprob
from qkv.chat_template import chat_stops, has_chat_template
from qkv.embed import embed_ids
from qkv.errors import QkvError
from qkv.explain import MAX_TARGET, MAX_WORDS, explain_model, explain_text, payload
from qkv.explain.budget import check_explain_size
from qkv.explain.explorer import page
from qkv.model import Encoder, EncoderDecoder
from qkv.sampling import SamplingConfig
from qkv.server.guard import Guard
from qkv.server.respond import respond, tickets_for
from qkv.server.schemas import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ExplainRequest,
    TokenizeRequest,
)
from qkv.server.served import Served


def create_app(served: Served) -> FastAPI:
    """The FastAPI application serving `served`."""
    app = FastAPI(title="qkv", docs_url=None, redoc_url=None)

    app.add_middleware(Guard, served=served, routes=app.routes)

    @app.exception_handler(QkvError)
    async def refused(request: Request, err: QkvError) -> JSONResponse:
        return ApiError(400, str(err)).response()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        retry = {"Retry-After": "1"} if err.status == 503 else None
        return err.response(retry)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = str(err.detail)
        if err.status_code == 400:  # FastAPI's "error parsing the body": JSON it cannot read
            message = "the body could not be read as JSON (nested too deeply, or a number too long)"
        return ApiError(err.status_code, message).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        # a value's own complaint (a lone surrogate) says more than the union's other members'
        first = next((e for e in errors if e.get("type") == "value_error"), errors[0])
        if first.get("type") == "json_invalid":
            return ApiError(400, f"the body is not valid JSON ({first.get('msg')})").response()
        # field names and list indices, not pydantic's names of union members
        where = [str(part) for part in first.get("loc", ())
                 if part != "body" and re.fullmatch(r"\w+", str(part))]  # fmt: skip
        if not where and first.get("type") in ("model_attributes_type", "dict_type"):
            return ApiError(400, "the body must be a JSON object, sent with Content-Type: "
                            "application/json").response()  # fmt: skip
        detail = str(first.get("msg", "")).removeprefix("Value error, ")  # pydantic's prefix
        message = f"{'.'.join(where) or 'body'}: {detail}"
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

        if served.model is None or served.tokenizer is None:
            if body.text is None:
                raise ApiError(400, "the notes' example takes `text` (its words are its "
                               "vocabulary), not token_ids", "token_ids")  # fmt: skip
            walkthrough = await served.exclusive(lambda: explain_text(body.text))
        else:
            ids = body.token_ids
            if ids is None and body.text.strip():
                ids = (await served.encode([body.text], "text"))[0]
            config = served.model.config
            limit = min(MAX_WORDS, config.max_seq_len)
            if len(ids or ()) > limit:
                param = "text" if body.token_ids is None else "token_ids"
                raise ApiError(400, f"the text has {len(ids):,} tokens; explain shows at most "
                               f"{limit}", param)  # fmt: skip
            target = MAX_TARGET + 1 if config.arch == "encoder-decoder" else 0
            # sized before the forward pass: what shrinks it is named in the 400
            check_explain_size(config, len(ids or ()), body.layers, body.heads, body.top, target)
            model, tokenizer = served.model, served.tokenizer
            walkthrough = await served.exclusive(
                lambda: explain_model(model, tokenizer, body.text, ids)
            )
        # turned into JSON off the engine's thread: completions go on meanwhile
        data = await asyncio.to_thread(
            payload, walkthrough, body.layers, body.heads, body.top, sampling, seed
        )
        text = await asyncio.to_thread(json.dumps, data, allow_nan=False)  # megabytes: off the loop
        return Response(text, media_type="application/json")

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> JSONResponse:
        if served.engine is not None and not served.engine.running:
            return JSONResponse({"status": "the engine has stopped"}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(served.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        served.loaded()
        if body.messages is not None:
            tokens = await served.chat([(m.role, m.content) for m in body.messages])
        else:
            tokens = (await served.encode([body.prompt or ""]))[0]
        return {"tokens": tokens, "count": len(tokens), "max_model_len": served.window}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        served.loaded()
        if len(body.tokens) > served.window:
            raise ApiError(400, f"tokens: give at most {served.window} (the model's context), "
                           f"got {len(body.tokens):,}", "tokens")  # fmt: skip
        served.check_ids(body.tokens, "tokens")
        return {"prompt": await asyncio.to_thread(served.tokenizer.decode, body.tokens)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": served.name, "object": "model", "created": 0, "owned_by": "qkv",
                "max_model_len": served.window}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        engine = served.decoding()
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts:
            raise ApiError(400, "prompt: give at least one prompt", "prompt")
        engine.check_room(len(texts) * body.n)  # before tokenizing any of them
        prompts = await served.encode(texts)
        tickets = tickets_for(served, body, prompts, tuple(body.stop or ()), body.logprobs)

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
                    "text_offset": list(accumulate(map(len, tokens), initial=0))[:-1],
                }
            return {"index": index, "text": text, "finish_reason": reason, "logprobs": logprobs}

        return await respond(served, body, tickets, "text_completion", shape)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest) -> Any:
        served.decoding().check_room(body.n)
        if not has_chat_template(served.tokenizer):
            raise ApiError(400, "this model has no chat template (no role tokens, no "
                           "chat_template of its own); use /v1/completions, or fine-tune it "
                           "with `qkv finetune`", "messages")  # fmt: skip
        turns = [(m.role, m.content) for m in body.messages]
        prompt = await served.chat(turns)
        stop = (*chat_stops(served.tokenizer), *(body.stop or ()))
        top = (body.top_logprobs or 0) if body.logprobs else None
        tickets = tickets_for(served, body, [prompt], stop, top)

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

        return await respond(served, body, tickets, "chat.completion", shape)

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
        rows = await _embedding_rows(served, body.input)
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


async def _embedding_rows(served: Served, given: str | list[str] | list[int] | list[list[int]]
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
        rows = await asyncio.to_thread(served.tokenizer.encode_inputs, given)  # off the loop
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


def check_port(port: int) -> None:
    if not 0 < port < 65536:
        raise QkvError(f"--port must be 1 to 65535, got {port}")


LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARDS = ("0.0.0.0", "::", "")


def allowed_hosts(host: str, more: Sequence[str] = ()) -> frozenset[str] | None:
    """The Host header names a server listening on `host` answers: its local names, `host` and
    `more`; None (any name) on a wildcard address with no `more` given, where the names people
    reach it by cannot be known."""
    if host in WILDCARDS and not more:
        return None
    names = {*LOCAL_NAMES, *more} | (set() if host in WILDCARDS else {host})
    return frozenset(name.strip("[]").lower() for name in names)


def serve(
    served: Served,
    host: str = "127.0.0.1",
    port: int = 8000,
    grace: float = 3.0,
    on_ready: Callable[[], None] | None = None,
    more_hosts: Sequence[str] = (),
    request_timeout: float = 10.0,
    max_connections: int = 256,
) -> None:
    """Run the HTTP server until Ctrl-C / SIGTERM: then no new requests; running ones get
    `grace` seconds to finish, and the rest end with finish reason "length". `on_ready` is
    called once the server listens (`qkv explore` opens the browser then). Requests must name
    the host it listens as (allowed_hosts); a connection whose request (headers and body) has
    not all come within `request_timeout` seconds is closed; past `max_connections` at once, new
    requests get a 503."""
    import uvicorn

    check_port(port)
    if not 0 < request_timeout <= 3600:
        raise QkvError(f"--request-timeout must be more than 0 and at most 3600 seconds, got "
                       f"{request_timeout}")  # fmt: skip
    if not 0 < max_connections <= 65536:
        raise QkvError(f"--max-connections must be 1 to 65536, got {max_connections}")
    served.allowed_hosts = allowed_hosts(host, more_hosts)

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
        timeout_graceful_shutdown=grace + 2, limit_concurrency=max_connections,
        http=request_deadline(request_timeout),
    )  # fmt: skip
    try:
        Server(config).run()
    finally:
        if served.engine is not None:
            served.engine.stop()


def request_deadline(seconds: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request (headers and body) has not
    all come within `seconds` of its opening or of its last response: clients that send slowly,
    or stop halfway, hold no connection for long."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        deadline: asyncio.TimerHandle | None = None

        def arm(self) -> None:
            self.disarm()
            self.deadline = self.loop.call_later(seconds, self.expire)

        def disarm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def expire(self) -> None:
            if self.conn.their_state is not h11.DONE and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is h11.DONE:  # the whole request is in
                self.disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self.disarm()
            super().connection_lost(exc)

    return Protocol
