"""OpenAI's completions and chat completions <-> `GenerateRequest` and engine outputs. Pure functions.

A request body becomes the same `GenerateRequest` a gRPC client would send (so defaults, limits and
validation are the engine's, once), plus the few things only the HTTP answer needs (`Options`).
Fields OpenAI defines that the engine cannot honour are refused with a 400 naming them; fields
nobody defines are ignored, as OpenAI does. vLLM's extensions `top_k`, `min_p`,
`repetition_penalty`, `ignore_eos`, `stop_token_ids`, `chat_template_kwargs`,
`add_generation_prompt` and `return_tokens_as_token_ids` are read too.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from inference_svc.engine import RequestOutput
from inference_svc.errors import InvalidRequest
from loraserve.names import REQUEST_KEY_HEADER
from loraserve.v1 import inference_pb2

# Engine field -> the chat request's parameter that sets it, for error messages.
CHAT_PARAMS = {"logprobs": "top_logprobs"}


@dataclass(frozen=True)
class Options:
    """What the answer needs beyond the engine's outputs."""

    model: str  # as the request named it (echoed in every response)
    chat: bool
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    logprobs: bool = False  # answer with a logprobs object
    tokens_as_ids: bool = False  # vLLM's return_tokens_as_token_ids: "token_id:123" for token strings
    headers: dict[str, str] = field(default_factory=dict)  # routing headers the body adds (`user`)


# --- requests --------------------------------------------------------------------------------


def _get(body: dict, name: str, kinds: type | tuple, what: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise InvalidRequest(name, f"must be {what}")
    if not isinstance(value, kinds):
        raise InvalidRequest(name, f"must be {what}")
    return value


def _refuse(body: dict, name: str, unsupported: Callable[[object], bool], why: str) -> None:
    if body.get(name) is not None and unsupported(body[name]):
        raise InvalidRequest(name, why)


def _common(body: dict, base_model: str, chat: bool) -> tuple[inference_pb2.GenerateRequest, Options]:
    """The fields completions and chat share: model, sampling, stop, n, stream, user."""
    if not isinstance(body, dict):
        raise InvalidRequest("body", "must be a JSON object")
    model = _get(body, "model", str, "a string")
    if not model:
        raise InvalidRequest("model", "is required: an adapter id, an alias or the base model's name")
    n = _get(body, "n", int, "an integer", 1)
    if n != 1:
        raise InvalidRequest("n", f"only n=1 is supported (got {n}); send one request per choice")
    _refuse(body, "logit_bias", bool, "is not supported")
    params = inference_pb2.SamplingParams()
    for name in (
        "temperature",
        "top_p",
        "min_p",
        "repetition_penalty",
        "frequency_penalty",
        "presence_penalty",
    ):
        value = _get(body, name, (int, float), "a number")
        if value is not None:
            setattr(params, name, value)
    top_k = _get(body, "top_k", int, "an integer")
    if top_k is not None:
        params.top_k = max(top_k, 0)  # vLLM: -1 = all, as 0 here
    seed = _get(body, "seed", int, "an integer")
    if seed is not None:
        if not 0 <= seed < 2**64:
            raise InvalidRequest("seed", f"must be in 0..2**64-1, got {seed}")
        params.seed = seed
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise InvalidRequest("stop", "must be a string or a list of strings")
    params.stop.extend(stop or ())
    stop_ids = _get(body, "stop_token_ids", list, "a list of token ids", [])
    if not all(isinstance(t, int) and t >= 0 for t in stop_ids):
        raise InvalidRequest("stop_token_ids", "must be a list of token ids")
    params.stop_token_ids.extend(stop_ids)
    params.ignore_eos = _get(body, "ignore_eos", bool, "true or false", False)
    stream = _get(body, "stream", bool, "true or false", False)
    stream_options = _get(body, "stream_options", dict, "an object", {})
    if stream_options and not stream:
        raise InvalidRequest("stream_options", "is only allowed with stream: true")
    user = _get(body, "user", str, "a string", "")
    request = inference_pb2.GenerateRequest(
        request_id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        adapter_id="" if model == base_model else model,
        params=params,
    )
    options = Options(
        model=model,
        chat=chat,
        stream=stream,
        include_usage=bool(_get(stream_options, "include_usage", bool, "true or false", False)),
        tokens_as_ids=_get(body, "return_tokens_as_token_ids", bool, "true or false", False),
        headers={REQUEST_KEY_HEADER: user} if user else {},
    )
    return request, options


def completion_request(body: dict, base_model: str) -> tuple[inference_pb2.GenerateRequest, Options]:
    """POST /v1/completions -> (GenerateRequest, Options); InvalidRequest naming a bad field."""
    request, options = _common(body, base_model, chat=False)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        request.text = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and t >= 0 for t in prompt):
        request.token_ids.ids.extend(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str | list) for p in prompt):
        raise InvalidRequest("prompt", "one prompt per request: batches of prompts are not supported")
    else:
        raise InvalidRequest("prompt", "must be a string or a non-empty list of token ids")
    max_tokens = _get(body, "max_tokens", int, "an integer")
    if max_tokens is not None:
        request.params.max_tokens = max_tokens
    logprobs = _get(body, "logprobs", int, "an integer")
    if logprobs is not None:
        request.params.logprobs = logprobs
    _refuse(body, "echo", bool, "is not supported")
    _refuse(body, "suffix", bool, "is not supported")
    _refuse(body, "best_of", lambda v: v != 1, "only best_of=1 is supported")
    return request, dataclasses.replace(options, logprobs=logprobs is not None)


def chat_request(body: dict, base_model: str) -> tuple[inference_pb2.GenerateRequest, Options]:
    """POST /v1/chat/completions -> (GenerateRequest, Options); InvalidRequest naming a bad field."""
    request, options = _common(body, base_model, chat=True)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages", "must be a non-empty list of messages")
    chat = request.messages
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(f"messages[{i}]", "must be an object with a `role`")
        chat.messages.add(role=message["role"], content=_content(message.get("content"), i))
    if body.get("add_generation_prompt") is not None:
        chat.add_generation_prompt = _get(body, "add_generation_prompt", bool, "true or false")
    kwargs = _get(body, "chat_template_kwargs", dict, "an object")
    if kwargs:
        chat.chat_template_kwargs = json.dumps(kwargs)
    max_tokens = _get(body, "max_completion_tokens", int, "an integer")
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", int, "an integer")
    if max_tokens is not None:
        request.params.max_tokens = max_tokens
    logprobs = _get(body, "logprobs", bool, "true or false", False)
    top = _get(body, "top_logprobs", int, "an integer")
    if top is not None and not logprobs:
        raise InvalidRequest("top_logprobs", "needs logprobs: true")
    request.params.logprobs = top or 0
    _refuse(body, "tools", bool, "is not supported (no tool calling)")
    _refuse(body, "functions", bool, "is not supported (no tool calling)")
    _refuse(
        body,
        "response_format",
        lambda v: not (isinstance(v, dict) and v.get("type") == "text"),
        "only {'type': 'text'} is supported",
    )
    return request, dataclasses.replace(options, logprobs=logprobs)


def _content(content, i: int) -> str:
    """A message's content: a string, or text parts joined by newlines (None: empty)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "\n".join(p["text"] for p in content)
    raise InvalidRequest(f"messages[{i}].content", "must be a string or a list of text parts")


# --- responses -------------------------------------------------------------------------------


@dataclass
class Answer:
    """Builds the JSON answer of one request from its engine outputs, batch by batch."""

    options: Options
    request_id: str
    token_text: Callable[[int], str]  # a token id's text, for logprobs
    created: int = field(default_factory=lambda: int(time.time()))
    text: list[str] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # per token, in the endpoint's shape
    finish_reason: str | None = None
    usage: dict | None = None
    _offset: int = 0  # completions' text_offset of the next token

    @property
    def object(self) -> str:
        if self.options.chat:
            return "chat.completion.chunk" if self.options.stream else "chat.completion"
        return "text_completion"

    def add(self, batch: list[RequestOutput]) -> tuple[str, list]:
        """Take one batch; -> (its text, its logprob entries)."""
        text = "".join(o.text for o in batch)
        entries = [self._logprob(o) for o in batch] if self.options.logprobs else []
        self.text.append(text)
        self.logprobs += entries
        last = batch[-1]
        if last.finished:
            self.finish_reason = last.finish_reason
            prompt, completion = last.usage.prompt_tokens, last.usage.completion_tokens
            self.usage = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
        return text, entries

    def _token(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.options.tokens_as_ids else self.token_text(token_id)

    def _logprob(self, output: RequestOutput) -> dict:
        token = output.token
        text = self._token(token.token_id)
        if self.options.chat:
            return {
                "token": text,
                "logprob": token.logprob,
                "bytes": list(text.encode()),
                "top_logprobs": [
                    {"token": (t := self._token(i)), "logprob": lp, "bytes": list(t.encode())}
                    for i, lp in token.top_logprobs
                ],
            }
        entry = {
            "token": text,
            "logprob": token.logprob,
            "top": {self._token(i): lp for i, lp in token.top_logprobs},
            "offset": self._offset,
        }
        self._offset += len(text)
        return entry

    def _logprobs_object(self, entries: list) -> dict | None:
        if not self.options.logprobs:
            return None
        if self.options.chat:
            return {"content": entries}
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [e["top"] for e in entries],
            "text_offset": [e["offset"] for e in entries],
        }

    def _envelope(self, choices: list, usage: dict | None = None, with_usage: bool = True) -> dict:
        out = {
            "id": self.request_id,
            "object": self.object,
            "created": self.created,
            "model": self.options.model,
            "choices": choices,
        }
        if with_usage:
            out["usage"] = usage
        return out

    def whole(self) -> dict:
        """The non-streaming answer, after the last batch."""
        text = "".join(self.text)
        logprobs = self._logprobs_object(self.logprobs)
        if self.options.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=logprobs, finish_reason=self.finish_reason)
        return self._envelope([choice], self.usage)

    def chunk(self, text: str, entries: list, first: bool = False) -> dict:
        """One streamed chunk for a batch's text and logprobs (the finish reason on the last)."""
        if self.options.chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=self._logprobs_object(entries), finish_reason=self.finish_reason)
        return self._envelope([choice], None, with_usage=self.options.include_usage)

    def usage_chunk(self) -> dict:
        """stream_options.include_usage: the last chunk, no choices, the usage."""
        return self._envelope([], self.usage)


def sse(data: dict | str) -> bytes:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
