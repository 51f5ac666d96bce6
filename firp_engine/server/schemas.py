"""Request bodies of the OpenAI API that the server takes, as pydantic models.

Fields the engine has no use for (logprobs, penalties, user, ...) are accepted and ignored,
as other OpenAI-compatible servers do, so that ordinary clients work unchanged; a value the
engine cannot honour (n > 1, a non-text message part) is refused with 400.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """What chat and text completions share."""

    model: str | None = None  # None: the served model
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)  # OpenAI's default; 0 is greedy
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # an extension (vLLM's): 0 or -1 is off
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class TextPart(BaseModel):
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls...: the chat template may use them

    role: str
    content: str | list[TextPart] | None = None

    def for_template(self) -> dict:
        """The message as a chat template reads it: content parts joined into one string."""
        msg = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            if any(p.type != "text" or p.text is None for p in self.content):
                raise ValueError("only text content parts are supported")
            msg["content"] = "".join(p.text for p in self.content)
        return msg


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


class CompletionRequest(Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
