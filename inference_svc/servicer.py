"""`InferenceService` (loraserve.v1): proto -> engine call -> proto, nothing else.

Generate hands its request to `generation.Generation`, the request path the HTTP API shares.

Errors are raised as the typed errors of `inference_svc.errors`; `loraserve.grpc_errors.ErrorInterceptor`
turns them into status codes with `errors_grpc.status_for`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from inference_svc import errors
from inference_svc.async_engine import AsyncEngine
from inference_svc.engine import RequestOutput
from inference_svc.generation import Generation
from inference_svc.membership import resident_to_proto
from inference_svc.replica_agent import ReplicaAgent
from loraserve import auth
from loraserve.adapter_paths import resolve_adapter_dir
from loraserve.names import ID_RE
from loraserve.v1 import inference_pb2, inference_pb2_grpc

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
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
        agent, sampling_defaults: those of `generation.Generation`, which Generate runs on
            (managed mode's agent also fetches adapters LoadAdapter names).
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
        # the request path both faces share (the HTTP API gets this one from the server)
        self.generation = Generation(engine, agent, sampling_defaults)

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        opened = await self.generation.open(request, auth.request_headers(context))
        alternatives = opened.params.logprobs > 0
        async with contextlib.aclosing(opened.stream):  # leaving early (cancel, deadline) aborts the request
            async for batch in opened.stream:
                yield response_from(batch, with_alternatives=alternatives, request_id=opened.request_id)

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


def _adapter_id(adapter_id: str) -> str:
    if not ID_RE.fullmatch(adapter_id):
        raise errors.InvalidRequest("adapter_id", f"{adapter_id[:200]!r} must match {ID_RE.pattern}")
    return adapter_id


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
