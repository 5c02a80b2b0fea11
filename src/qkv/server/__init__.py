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

The package, one concern per module: schemas (request bodies, the error object), engine (the
Batcher's thread, metrics), served (what is served), respond (completions as JSON or a stream),
guard (the checks before any route), app (the routes and uvicorn).
"""

from qkv.server.app import check_port, create_app, serve
from qkv.server.schemas import MAX_BODY, MAX_EXPLAINS, ApiError
from qkv.server.served import Served, load_served, notes_served

__all__ = [
    "MAX_BODY",
    "MAX_EXPLAINS",
    "ApiError",
    "Served",
    "check_port",
    "create_app",
    "load_served",
    "notes_served",
    "serve",
]
