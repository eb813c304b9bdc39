"""A generation request, whichever face it came through: gRPC `Generate` or the OpenAI-compatible
HTTP API (`inference_svc.openai_api`). Both build a `GenerateRequest` and hand it here, so prompt
rules, sampling defaults, routing (aliases, rules, sticky keys), tenant checks and the engine call
are one piece of code:

    generation = Generation(engine, agent, sampling_defaults)
    opened = await generation.open(request, headers)      # params, adapter_id, request_id, stream
    async with contextlib.aclosing(opened.stream):        # leaving early aborts the request
        async for batch in opened.stream: ...             # list[RequestOutput] per step
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import NamedTuple

from inference_svc import errors
from inference_svc.async_engine import AsyncEngine
from inference_svc.engine import RequestOutput
from inference_svc.replica_agent import ReplicaAgent
from inference_svc.sampling import SamplingParams
from inference_svc.tokenizer import ChatPrompt, Prompt, TextPrompt
from loraserve import auth
from loraserve.telemetry import MAX_REQUEST_ID_CHARS
from loraserve.v1 import inference_pb2

# What a refusal names when the base model was asked for and a routing rule chose an adapter.
ROUTED = "(chosen by a routing rule)"


class Opened(NamedTuple):
    params: SamplingParams
    adapter_id: str  # the concrete adapter routing chose ("" = base model)
    request_id: str  # the client's id, or a new one (the engine keys it per tenant)
    stream: AsyncIterator[list[RequestOutput]]


class Generation:
    """Opens generation streams on one `AsyncEngine`.

    Args:
        engine: the running engine bridge.
        agent: the adapter manager's agent (managed mode): it resolves aliases and routing rules
            and fetches adapters the engine does not hold; None = standalone.
        sampling_defaults: the checkpoint's defaults for unset sampling fields
            (`GenerationConfig.sampling_defaults`, from generation_config.json).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        agent: ReplicaAgent | None = None,
        sampling_defaults: Mapping[str, float | int] | None = None,
    ):
        self.engine = engine
        self.agent = agent
        self.sampling_defaults = dict(sampling_defaults or {})

    async def open(self, request: inference_pb2.GenerateRequest, headers: Mapping[str, str]) -> Opened:
        """The request's sampling params, concrete adapter, request id and the engine's stream of
        output batches.

        `headers` are the call's routing headers (`loraserve.auth.routing_headers`). Raises the
        typed errors of a bad prompt or parameter, an unknown or hidden adapter, or a manager that
        cannot be reached; the stream raises the engine's (QueueFull, Draining ...) on first read.
        """
        request_id = request_id_from(request.request_id)
        prompt = prompt_from(request)
        params = sampling_params_from(request.params, self.sampling_defaults)
        adapter_id = await self.resolve(request.adapter_id, headers)
        # request ids are per tenant: one tenant can neither see nor take another's in-flight ids
        tenant = auth.caller_tenant(headers.items())
        stream = self.engine.generate(prompt, params, adapter_id or None, request_id, namespace=tenant)
        return Opened(params, adapter_id, request_id, stream)

    async def resolve(self, adapter_id: str, headers: Mapping[str, str]) -> str:
        """The concrete adapter ("" = base model) a request naming `adapter_id` is served by.

        Routing's choice must be the caller's too, checked before anything is fetched; a refusal
        names only what the caller asked for, never a rule's target.
        """
        if self.agent is None:
            return adapter_id
        requested = adapter_id or ROUTED

        async def authorize(concrete: str) -> None:
            await auth.authorize_adapter(concrete, requested)

        return await self.agent.resolve(adapter_id, headers, authorize)


# --- proto -> domain ---------------------------------------------------------------------------


def request_id_from(request_id: str) -> str:
    """The client's request id, or a new one; InvalidRequest beyond MAX_REQUEST_ID_CHARS or for
    control characters (ids are echoed and logged)."""
    if not request_id:
        return uuid.uuid4().hex
    if len(request_id) > MAX_REQUEST_ID_CHARS or not request_id.isprintable():
        raise errors.InvalidRequest(
            "request_id",
            f"must be at most {MAX_REQUEST_ID_CHARS} printable characters (got {len(request_id)})",
        )
    return request_id


def prompt_from(request: inference_pb2.GenerateRequest) -> Prompt:
    """The prompt oneof: text, token ids or chat messages (InvalidRequest "prompt" when none is set)."""
    which = request.WhichOneof("prompt")
    special = request.add_special_tokens if request.HasField("add_special_tokens") else None
    if which == "text":
        return request.text if special is None else TextPrompt(request.text, special)
    if which == "token_ids":
        return list(request.token_ids.ids)
    if which == "messages":
        chat = request.messages
        prompt = ChatPrompt(
            messages=tuple({"role": m.role, "content": m.content} for m in chat.messages),
            add_generation_prompt=not chat.HasField("add_generation_prompt") or chat.add_generation_prompt,
            template_kwargs=_template_kwargs(chat.chat_template_kwargs),
        )
        if not prompt.messages:
            raise errors.InvalidRequest("messages", "must contain at least one message")
        return prompt if special is None else dataclasses.replace(prompt, add_special_tokens=special)
    raise errors.InvalidRequest("prompt", "set `text`, `token_ids` or `messages`")


def _template_kwargs(text: str) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise errors.InvalidRequest("messages.chat_template_kwargs", f"not valid JSON: {e}") from e
    except RecursionError as e:
        raise errors.InvalidRequest("messages.chat_template_kwargs", "JSON nests too deeply") from e
    if not isinstance(value, dict):
        raise errors.InvalidRequest("messages.chat_template_kwargs", "must be a JSON object")
    return value


# SamplingParams fields a request may leave unset (proto3 `optional`)
DEFAULTABLE = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_params_from(
    p: inference_pb2.SamplingParams, checkpoint_defaults: Mapping[str, float | int] | None = None
) -> SamplingParams:
    """Proto -> SamplingParams; validation happens in the engine.

    An unset optional field takes the checkpoint's default (generation_config.json) when it has
    one, else SamplingParams' own; a set field always wins.
    """
    defaults = {
        **{name: getattr(SamplingParams, name) for name in DEFAULTABLE},
        **(checkpoint_defaults or {}),
    }
    resolved = {name: getattr(p, name) if p.HasField(name) else defaults[name] for name in DEFAULTABLE}
    return SamplingParams(
        **resolved,
        frequency_penalty=p.frequency_penalty,
        presence_penalty=p.presence_penalty,
        seed=p.seed if p.HasField("seed") else None,
        stop=tuple(p.stop),
        stop_token_ids=tuple(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        logprobs=p.logprobs,
    )
