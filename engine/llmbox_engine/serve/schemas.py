"""Request bodies of the OpenAI endpoints, validated strictly: a wrong type is a 400 naming the field.

Fields the OpenAI API has and this server does not act on (tools, logprobs, penalties, ...) are accepted and
ignored, so stock clients work unchanged.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmbox_engine.serve.errors import ApiError, bad_request

MAX_CHOICES = 16  # n per request: each is a sequence in the batch
MAX_PROMPTS = 16  # prompts in one /v1/completions request
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 512  # characters: each generated token is checked against every stop string
MAX_SEQUENCES = 64  # n x prompts in one request


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ImageUrl(_Strict):
    url: str
    detail: str | None = None


class TextPart(_Strict):
    """A content part: text, or (for vision models) an `image_url` whose `url` is a data URL or a path."""

    type: str
    text: str | None = None
    image_url: ImageUrl | str | None = None

    @property
    def url(self) -> str | None:
        return self.image_url.url if isinstance(self.image_url, ImageUrl) else self.image_url


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self, param: str) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise bad_request(f"only text content parts are supported, not {part.type!r}", f"{param}.content")
            texts.append(part.text)
        return "".join(texts)

    @property
    def has_images(self) -> bool:
        return isinstance(self.content, list) and any(p.type == "image_url" for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise bad_request(f"at most {MAX_STOP_STRINGS} stop sequences", "stop")
        if any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise bad_request(f"stop sequences are at most {MAX_STOP_LENGTH} characters", "stop")
        return tuple(s for s in stops if s)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def choices(self) -> int:
        return self.n or 1


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def has_images(self) -> bool:
        return any(m.has_images for m in self.messages)

    def conversation(self) -> list[dict[str, str]]:
        # "developer" is the newer name of "system"; chat templates only know the older one
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text(f"messages.{i}")}
            for i, m in enumerate(self.messages)
        ]


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    echo: bool = False

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else 16  # the OpenAI default for completions

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        prompts: list[str | list[int]]
        if isinstance(p, str):
            prompts = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [[x for x in p if isinstance(x, int)]]
        else:
            prompts = [x for x in p if isinstance(x, str | list)]
        if not prompts or any(len(x) == 0 for x in prompts):
            raise bad_request("prompt must not be empty", "prompt")
        if len(prompts) > MAX_PROMPTS:
            raise bad_request(f"at most {MAX_PROMPTS} prompts per request", "prompt")
        if len(prompts) * self.choices > MAX_SEQUENCES:
            raise bad_request(f"prompts x n is at most {MAX_SEQUENCES} answers per request", "n")
        return prompts


def parse(model: type[ChatRequest] | type[CompletionRequest], body: Any) -> Any:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _as_api_error(exc) from None


def _as_api_error(exc: ValidationError) -> ApiError:
    first = exc.errors()[0]
    # union members show up in the location (`stop.str`, `prompt.list[int]`): keep the field path only
    path = [str(p) for p in first["loc"] if isinstance(p, int) or not _is_type_tag(str(p))]
    param = ".".join(path) or None
    message = first["msg"]
    if first["type"] == "missing":
        message = "a required field is missing"
    return bad_request(f"{param}: {message}" if param else message, param, code="invalid_value")


def _is_type_tag(part: str) -> bool:
    return part in {"str", "int", "float", "bool", "none"} or part.startswith(("list[", "function-", "literal["))
