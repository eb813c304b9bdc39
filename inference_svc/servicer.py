"""`InferenceService` (loraserve.v1): proto -> engine call -> proto, nothing else.

Errors are raised as the typed errors of `inference_svc.errors`; `loraserve.grpc_errors.ErrorInterceptor`
turns them into status codes with `errors_grpc.status_for`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from inference_svc import errors
from inference_svc.async_engine import AsyncEngine
from inference_svc.engine import RequestOutput
from inference_svc.membership import resident_to_proto
from inference_svc.replica_agent import ReplicaAgent
from inference_svc.sampling import SamplingParams
from inference_svc.tokenizer import ChatPrompt, Prompt, TextPrompt
from loraserve import auth
from loraserve.adapter_paths import resolve_adapter_dir
from loraserve.names import ID_RE
from loraserve.v1 import inference_pb2, inference_pb2_grpc

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
# What a refusal names when the base model was asked for and a routing rule chose an adapter.
ROUTED = "(chosen by a routing rule)"
# Longest request_id accepted (it is echoed in every response and logged).
MAX_REQUEST_ID_CHARS = 128
FINISH_REASONS = {
    "length": inference_pb2.FINISH_REASON_LENGTH,
    "stop": inference_pb2.FINISH_REASON_STOP,
}


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """Serves one `AsyncEngine`.

    Args:
        engine: the running engine bridge.
        adapter_roots: directories LoadAdapter may register adapters from (standalone mode); empty
            disables loading by path.
        agent: the adapter manager's agent (managed mode): it resolves aliases and routing rules
            and fetches adapters the engine does not hold; None = standalone.
        sampling_defaults: the checkpoint's defaults for unset sampling fields
            (`GenerationConfig.sampling_defaults`, from generation_config.json).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        adapter_roots: tuple[str | Path, ...] = (),
        agent: ReplicaAgent | None = None,
        sampling_defaults: Mapping[str, float | int] | None = None,
    ):
        self.engine = engine
        self.adapter_roots = tuple(Path(r).resolve() for r in adapter_roots)
        self.agent = agent
        self.sampling_defaults = dict(sampling_defaults or {})

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        request_id = request_id_from(request.request_id)
        prompt = prompt_from(request)
        params = sampling_params_from(request.params, self.sampling_defaults)
        adapter_id = request.adapter_id
        if self.agent is not None:
            # routing's choice must be the caller's too, checked before anything is fetched; a
            # refusal names only what the caller asked for, never the rule's target
            requested = request.adapter_id or ROUTED

            async def authorize(concrete: str) -> None:
                await auth.authorize_adapter(concrete, requested)

            adapter_id = await self.agent.resolve(adapter_id, auth.request_headers(context), authorize)
        # request ids are per tenant: one tenant can neither see nor take another's in-flight ids
        stream = self.engine.generate(
            prompt, params, adapter_id or None, request_id, namespace=auth.caller_tenant(context)
        )
        async with contextlib.aclosing(stream):  # leaving early (cancel, deadline) aborts the request
            async for batch in stream:
                yield response_from(batch, with_alternatives=params.logprobs > 0, request_id=request_id)

    async def GetEngineInfo(self, request, context) -> inference_pb2.GetEngineInfoResponse:
        return engine_info_to_proto(await self.engine.call(lambda engine: engine.info()))

    async def LoadAdapter(self, request: inference_pb2.LoadAdapterRequest, context):
        adapter_id = _adapter_id(request.adapter_id)
        path = self._allowed_path(request.path) if request.HasField("path") else None
        pin = request.pin if request.HasField("pin") else None
        if path is None and self.agent is not None:
            if request.sha256:  # the manager's command: hash, victims and pin come with it
                resident = await self.agent.load_commanded(
                    adapter_id, request.sha256, list(request.evict), request.to_slot, pin
                )
                return inference_pb2.LoadAdapterResponse(adapter=resident_to_proto(resident))
            await self.agent.ensure_local(adapter_id)  # fetched from the manager if not held
        if path is not None:
            await self.engine.call(lambda engine: engine.register_adapter(adapter_id, path))
        resident = await self.engine.load_adapter(adapter_id, to_slot=request.to_slot, pin=pin)
        return inference_pb2.LoadAdapterResponse(adapter=resident_to_proto(resident))

    async def EvictAdapter(self, request: inference_pb2.EvictAdapterRequest, context):
        adapter_id = _adapter_id(request.adapter_id)

        def evict(engine):
            if request.unpin:
                engine.adapters.unpin(adapter_id)
            return engine.evict_adapter(adapter_id)

        return inference_pb2.EvictAdapterResponse(evicted=await self.engine.call(evict))

    async def ListResidentAdapters(self, request, context):
        resident = await self.engine.call(lambda engine: engine.list_resident_adapters())
        return inference_pb2.ListResidentAdaptersResponse(adapters=[resident_to_proto(r) for r in resident])

    def _allowed_path(self, path: str) -> Path:
        if not self.adapter_roots:
            raise errors.FailedPrecondition(
                "loading adapters by path is disabled: start the server with --adapter-root DIR"
            )
        return resolve_adapter_dir(path, self.adapter_roots)


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


def _adapter_id(adapter_id: str) -> str:
    if not ID_RE.fullmatch(adapter_id):
        raise errors.InvalidRequest("adapter_id", f"{adapter_id[:200]!r} must match {ID_RE.pattern}")
    return adapter_id


# --- proto -> domain ---------------------------------------------------------------------------


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


# --- domain -> proto ---------------------------------------------------------------------------


def response_from(
    batch: list[RequestOutput], with_alternatives: bool, request_id: str | None = None
) -> inference_pb2.GenerateResponse:
    """One message for the outputs one request has accumulated since its previous message
    (`request_id`: the id the client knows it by, default the engine's)."""
    last = batch[-1]
    response = inference_pb2.GenerateResponse(
        request_id=last.request_id if request_id is None else request_id,
        adapter_id=last.adapter_id or "",
        token_ids=[o.token.token_id for o in batch],
        text="".join(o.text for o in batch),
        logprobs=[o.token.logprob for o in batch],
    )
    if with_alternatives:
        for o in batch:
            alternatives = [
                inference_pb2.TokenLogprob(token_id=t, logprob=lp) for t, lp in o.token.top_logprobs
            ]
            response.top_logprobs.add(alternatives=alternatives)
    if last.finished:
        response.finish_reason = FINISH_REASONS[last.finish_reason]
        response.usage.prompt_tokens = last.usage.prompt_tokens
        response.usage.completion_tokens = last.usage.completion_tokens
    return response


def engine_info_to_proto(info: dict) -> inference_pb2.GetEngineInfoResponse:
    return inference_pb2.GetEngineInfoResponse(
        config=_message(inference_pb2.EngineConfig, info["config"]),
        model=_message(inference_pb2.ModelSummary, info["model"]),
        memory_plan=_message(inference_pb2.MemoryPlan, info["memory_plan"]),
        occupancy=_message(inference_pb2.Occupancy, info["occupancy"]),
        cache_stats=_message(inference_pb2.CacheStats, info["cache_stats"]),
    )


def _message(cls, values: dict):
    """`cls` from the entries of `values` it has fields for; None leaves a field unset."""
    fields = cls.DESCRIPTOR.fields_by_name
    return cls(**{k: v for k, v in values.items() if k in fields and v is not None})
