"""AdapterService over gRPC: proto -> domain call -> proto. No Redis, no files, no policy here.

Errors are raised by the manager and mapped to status codes by `loraserve.grpc_errors.ErrorInterceptor` with `errors.status_for`.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

from adapter_svc import errors
from adapter_svc.catalog import UploadHeader, WeightsInfo
from adapter_svc.manager import AdapterManager
from adapter_svc.records import AdapterRecord, Change, Load, ReplicaRecord, Resident
from loraserve.convert import resident_proto, rule_from, rule_proto
from loraserve.v1 import adapter_pb2 as pb
from loraserve.v1 import adapter_pb2_grpc, common_pb2, inference_pb2

# AcquireAdapter answers this long before its caller's deadline when it is still waiting for room.
ACQUIRE_DEADLINE_MARGIN_S = 0.5

CHANGE_KINDS = {
    pb.RESIDENCY_CHANGE_KIND_LOADED: "loaded",
    pb.RESIDENCY_CHANGE_KIND_ACTIVATED: "activated",
    pb.RESIDENCY_CHANGE_KIND_DEACTIVATED: "deactivated",
    pb.RESIDENCY_CHANGE_KIND_EVICTED: "evicted",
    pb.RESIDENCY_CHANGE_KIND_LOAD_FAILED: "load_failed",
}


# --- conversions --------------------------------------------------------------------------------


def state_proto(state: str) -> int:
    return pb.AdapterState.Value(f"ADAPTER_STATE_{state}")


def state_name(value: int) -> str:
    """'' for UNSPECIFIED (no filter), else the registry's state name; InvalidArgument for a
    number that is no AdapterState (proto3 enums are open: any int32 arrives)."""
    if value == pb.ADAPTER_STATE_UNSPECIFIED:
        return ""
    if value not in pb.AdapterState.values():
        names = [n.removeprefix("ADAPTER_STATE_") for n in pb.AdapterState.keys()[1:]]
        raise errors.InvalidArgument(f"state {value} is not an adapter state: one of {names} (or unset)")
    return pb.AdapterState.Name(value).removeprefix("ADAPTER_STATE_")


def adapter_proto(r: AdapterRecord) -> pb.RegisteredAdapter:
    return pb.RegisteredAdapter(
        adapter_id=r.adapter_id,
        source=r.source,
        sha256=r.sha256,
        rank=r.rank,
        lora_alpha=r.lora_alpha,
        use_rslora=r.use_rslora,
        target_modules=r.target_modules,
        size_bytes=r.size_bytes,
        tenant=r.tenant,
        metadata=r.metadata,
        state=state_proto(r.state),
        reason=r.reason,
        pinned=r.pinned,
        created_at_ms=r.created_at_ms,
        updated_at_ms=r.updated_at_ms,
        placements=[
            pb.AdapterPlacement(replica_id=k, state=state_proto(v)) for k, v in sorted(r.placements.items())
        ],
    )


def message_from(message_type, answer):
    """A `message_type` holding the fields of the dataclass `answer`, whose fields are named as the
    message's (a domain answer that mirrors its response)."""
    return message_type(**{f.name: getattr(answer, f.name) for f in dataclasses.fields(answer)})


def engine_dict(engine: inference_pb2.EngineConfig) -> dict:
    out = {}
    for f in engine.DESCRIPTOR.fields:
        if f.has_presence and not engine.HasField(f.name):
            continue
        value = getattr(engine, f.name)
        out[f.name] = list(value) if f.is_repeated else value
    return out


def engine_proto(engine: dict) -> inference_pb2.EngineConfig:
    known = {f.name for f in inference_pb2.EngineConfig.DESCRIPTOR.fields}
    return inference_pb2.EngineConfig(**{k: v for k, v in engine.items() if k in known and v is not None})


def resident_to_proto(r: Resident) -> common_pb2.ResidentAdapter:
    slot = r.slot if r.slot >= 0 else None
    return resident_proto(r.adapter_id, slot, r.pinned, r.last_used_ms * 1_000_000, r.sha256)


def resident_from(r: common_pb2.ResidentAdapter) -> Resident:
    return Resident(
        adapter_id=r.adapter_id,
        slot=r.slot if r.HasField("slot") else -1,
        pinned=r.pinned,
        last_used_ms=r.last_used.ToMilliseconds(),
        sha256=r.sha256,
    )


def snapshot_from(request) -> list[Resident]:
    """The residents a replica's join, heartbeat or acquire request reports."""
    return [resident_from(r) for r in request.snapshot]


def load_from(load: pb.ReplicaLoad) -> Load:
    return Load(load.waiting, load.running, min(max(load.kv_free_fraction, 0.0), 1.0), load.draining)


def change_from(c: pb.ResidencyChange) -> Change:
    if c.kind not in CHANGE_KINDS:
        raise errors.InvalidArgument(f"residency change {c.seq}: kind {c.kind} is not a known kind")
    return Change(
        seq=c.seq,
        kind=CHANGE_KINDS[c.kind],
        adapter_id=c.adapter_id,
        slot=c.slot if c.HasField("slot") else -1,
        at_ms=c.at_ms,
        reason=c.reason,
    )


def replica_proto(r: ReplicaRecord) -> pb.ReplicaState:
    return pb.ReplicaState(
        replica_id=r.replica_id,
        address=r.address,
        status=pb.REPLICA_STATUS_UP if r.up else pb.REPLICA_STATUS_DOWN,
        epoch=r.epoch,
        joined_at_ms=r.joined_at_ms,
        last_heartbeat_ms=r.last_heartbeat_ms,
        engine=engine_proto(r.engine),
        adapters=[resident_to_proto(a) for a in r.residents],
        loading=r.loading,
        down_reason=r.down_reason,
    )


def alias_proto(name: str, variants) -> pb.Alias:
    return pb.Alias(name=name, variants=[pb.AliasVariant(adapter_id=a, weight=w) for a, w in variants])


# --- the service --------------------------------------------------------------------------------


class AdapterServicer(adapter_pb2_grpc.AdapterServiceServicer):
    def __init__(self, manager: AdapterManager):
        self.catalog = manager.catalog
        self.routes = manager.routes
        self.placement = manager.placement
        self.membership = manager.membership

    # registry

    async def RegisterAdapter(self, request, context):
        record = await self.catalog.register_dir(
            request.adapter_id, request.path, request.tenant, dict(request.metadata)
        )
        return adapter_proto(record)

    async def UploadAdapter(self, request_iterator, context):
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "header":
            raise errors.InvalidArgument("UploadAdapter must start with a header message")
        h = first.header
        header = UploadHeader(h.adapter_id, h.adapter_config_json, h.tenant, dict(h.metadata), h.sha256)

        async def chunks() -> AsyncIterator[bytes]:
            async for message in request_iterator:
                if message.WhichOneof("part") != "chunk":
                    raise errors.InvalidArgument("UploadAdapter takes one header, then only chunks")
                yield message.chunk

        return adapter_proto(await self.catalog.upload(header, chunks()))

    async def GetAdapter(self, request, context):
        return adapter_proto(await self.catalog.get(request.adapter_id))

    async def ListAdapters(self, request, context):
        records, token = await self.catalog.list_adapters(
            request.page_size,
            request.page_token,
            request.tenant,
            state_name(request.state),
            request.replica_id,
        )
        return pb.ListAdaptersResponse(adapters=[adapter_proto(r) for r in records], next_page_token=token)

    async def UnregisterAdapter(self, request, context):
        evicted = await self.catalog.unregister(request.adapter_id, request.force)
        return pb.UnregisterAdapterResponse(evicted_from=evicted)

    # placement

    async def LoadAdapter(self, request, context):
        load = self.placement.load(request.adapter_id, request.replica_id, request.to_slot)
        remaining = context.time_remaining()  # None without a deadline
        if remaining is None:
            replica_id, resident = await load
        else:
            # answer before the caller's deadline (the load goes on, shared by later calls) when the
            # replica's host cache stays busy, as AcquireAdapter does
            try:
                replica_id, resident = await asyncio.wait_for(
                    load, max(0.0, remaining - ACQUIRE_DEADLINE_MARGIN_S)
                )
            except TimeoutError:
                raise errors.ResourceExhausted(
                    f"adapter {request.adapter_id!r} has not finished loading before the call's "
                    "deadline (the replica's host cache is busy loading or serving others); it goes "
                    "on loading: retry, or check with ListAdapters"
                ) from None
        return pb.ClusterLoadAdapterResponse(replica_id=replica_id, adapter=resident)

    async def EvictAdapter(self, request, context):
        evicted = await self.placement.evict(request.adapter_id, request.replica_id, request.force)
        return pb.ClusterEvictAdapterResponse(evicted_from=evicted)

    async def PinAdapter(self, request, context):
        return pb.PinAdapterResponse(replica_ids=await self.placement.pin(request.adapter_id))

    async def UnpinAdapter(self, request, context):
        await self.placement.unpin(request.adapter_id)
        return pb.UnpinAdapterResponse()

    async def GetClusterState(self, request, context):
        return pb.ClusterState(replicas=[replica_proto(r) for r in await self.placement.cluster_state()])

    # routing

    async def SetAlias(self, request, context):
        variants = [(v.adapter_id, v.weight) for v in request.alias.variants]
        return alias_proto(request.alias.name, await self.routes.set_alias(request.alias.name, variants))

    async def GetAlias(self, request, context):
        return alias_proto(request.name, await self.routes.get_alias(request.name))

    async def DeleteAlias(self, request, context):
        await self.routes.delete_alias(request.name)
        return pb.DeleteAliasResponse()

    async def SetRoutingRules(self, request, context):
        rules = await self.routes.set_rules([rule_from(r) for r in request.rules.rules])
        return pb.RoutingRules(rules=[rule_proto(r) for r in rules])

    async def GetRoutingRules(self, request, context):
        table = await self.routes.routing_table()
        return pb.RoutingRules(rules=[rule_proto(r) for r in table.rules])

    async def GetRoutingTable(self, request, context):
        table = await self.routes.routing_table()
        return pb.RoutingTable(
            version=table.version,
            aliases=[alias_proto(name, v) for name, v in sorted(table.aliases.items())],
            rules=[rule_proto(r) for r in table.rules],
        )

    async def ResolveAdapter(self, request, context):
        res = await self.routes.resolve(
            request.adapter_id, request.request_key, request.tenant, dict(request.headers)
        )
        return message_from(pb.ResolveAdapterResponse, res)

    # events

    async def WatchEvents(self, request, context):
        async for e in self.catalog.events(
            request.after_id, request.adapter_id, request.replica_id, ended=context.done
        ):
            yield message_from(pb.AdapterEvent, e)

    # replicas

    async def JoinReplica(self, request, context):
        joined = await self.membership.join(
            request.replica_id,
            request.address,
            engine_dict(request.engine),
            request.model_config_json,
            snapshot_from(request),
            request.snapshot_seq,
            request.manager_credential,
        )
        return message_from(pb.JoinReplicaResponse, joined)

    async def Heartbeat(self, request, context):
        answer = await self.membership.heartbeat(
            request.replica_id,
            request.epoch,
            snapshot_from(request),
            request.snapshot_seq,
            load_from(request.load) if request.HasField("load") else Load(),
        )
        return message_from(pb.HeartbeatResponse, answer)

    async def ReportResidency(self, request, context):
        changes = [change_from(c) for c in request.changes]
        ok = await self.membership.report(request.replica_id, request.epoch, changes)
        return pb.ReportResidencyResponse(rejoin=not ok)

    async def LeaveReplica(self, request, context):
        await self.membership.leave(request.replica_id, request.epoch)
        return pb.LeaveReplicaResponse()

    async def AcquireAdapter(self, request, context):
        remaining = context.time_remaining()  # None without a deadline
        acquired = await self.placement.acquire(
            request.replica_id,
            request.epoch,
            request.adapter_id,
            snapshot_from(request),
            # answer (RESOURCE_EXHAUSTED) before the replica's deadline instead of letting it expire
            None if remaining is None else max(0.0, remaining - ACQUIRE_DEADLINE_MARGIN_S),
        )
        return message_from(pb.AcquireAdapterResponse, acquired)

    async def FetchAdapterWeights(self, request, context):
        async for part in self.catalog.fetch(request.adapter_id):
            if isinstance(part, WeightsInfo):
                yield pb.AdapterWeightsChunk(header=message_from(pb.WeightsHeader, part))
            else:
                yield pb.AdapterWeightsChunk(data=part)
