"""The API's shapes: request bodies (pydantic, strict as OpenAI's) and its error object."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from qkv.errors import QkvError
from qkv.generate import MAX_STOP_CHARS
from qkv.text import check_unicode

MAX_BODY = 8 << 20  # bytes of a request body
MAX_EXPLAINS = 4  # explain requests waiting for or holding the model; more get a 503


class ApiError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(
        self, status: int, message: str, param: str | None = None, kind: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": None}
        return {"error": error}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=headers)


def _unicode(text: str) -> str:
    """Text the tokenizer can take: JSON's escapes can spell a lone surrogate ("\\ud800"),
    which is not Unicode (text.check_unicode, as pydantic's ValueError)."""
    try:
        return check_unicode(text)
    except QkvError as err:
        raise ValueError(str(err)) from None


Text = Annotated[str, AfterValidator(_unicode)]


class Body(BaseModel):
    """Strict as OpenAI's API: "5" is not a number, "yes" not a boolean, NaN and Infinity not
    numbers at all; fields it does not know are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(Body):
    include_usage: bool = False


class Sampling(Body):
    """The request fields both endpoints take (OpenAI's, and vLLM's top_k and
    repetition_penalty)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 8 or not all(stops) or max(map(len, stops), default=0) > MAX_STOP_CHARS:
            raise ValueError(f"give at most 8 stop strings, none empty, each of at most "
                             f"{MAX_STOP_CHARS} characters")  # fmt: skip
        return stops


class CompletionRequest(Sampling):
    prompt: Text | list[Text]
    logprobs: int | None = Field(None, ge=0, le=20)  # this many alternatives per token


class Message(Body):
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class TokenizeRequest(Body):
    prompt: Text | None = None
    messages: list[Message] | None = None


class DetokenizeRequest(Body):
    tokens: list[int]


class ExplainRequest(Body):
    """POST /v1/explain: a text (or its token ids), which layers and heads to include, how many
    top entries of vocabulary-wide stages, the sampling of the next-token panel, and whether to
    draw one token (with `seed`)."""

    model: str | None = None
    text: Text | None = None
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


class EmbeddingRequest(Body):
    model: str | None = None
    input: Text | list[Text] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
