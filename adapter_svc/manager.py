"""The adapter manager's domain logic: one method per RPC, no protobuf and no Redis commands.

State lives in Redis (`Registry`), bytes in the content-addressed store (`BlobStore`); replicas are
told what to load and evict through their InferenceService (`ReplicaClient`). Any number of
managers may run against one Redis: everything they share is in Redis, and what they keep in memory
(single-flight loads, parsed engine profiles) is only an optimisation.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from adapter_svc import errors
from adapter_svc.blobs import BlobStore, StagedAdapter, UploadWriter, mismatch, read_hashed
from adapter_svc.config import ManagerConfig
from adapter_svc.placement import can_hold, choose_replica
from adapter_svc.registry import (
    HOLDING_STATES,
    STATES,
    AdapterRecord,
    Change,
    Event,
    Registry,
    ReplicaRecord,
    Resident,
    record_fields,
)
from adapter_svc.replica_client import ReplicaClient
from adapter_svc.validation import Profile, profile_from_flags, profile_from_replica, validate
from loraserve.adapter_paths import resolve_adapter_dir
from loraserve.engine_limits import AdapterLimits
from loraserve.errors import InvalidModel
from loraserve.model_summary import ModelConfig
from loraserve.names import ID_RE
from loraserve.peft_format import CONFIG_FILE, WEIGHTS_FILE
from loraserve.routing import Resolution, RoutingTable, Rule, check_alias, check_rules, resolve

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY = 128
MAX_METADATA_VALUE = 4096
UNREGISTER_ATTEMPTS = 3


@dataclass(frozen=True)
class UploadHeader:
    adapter_id: str
    adapter_config_json: bytes
    tenant: str
    metadata: dict
    sha256: str  # expected; "" = not checked


@dataclass(frozen=True)
class Acquired:
    """The host-cache policy's answer to a replica about to load an adapter."""

    adapter_id: str
    sha256: str
    size_bytes: int
    resident: bool  # already in its host cache
    evict: list[str]  # least recently used first
    pin: bool


@dataclass(frozen=True)
class Joined:
    epoch: int
    heartbeat_interval_ms: int
    drop: list[str]
    routing_version: int


@dataclass(frozen=True)
class HeartbeatAnswer:
    rejoin: bool
    routing_version: int = 0
    unpin: tuple[str, ...] = ()
    pin: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()


@dataclass(frozen=True)
class WeightsInfo:
    adapter_id: str
    sha256: str
    size_bytes: int
    adapter_config_json: bytes


def check_id(kind: str, value: str) -> None:
    if not ID_RE.match(value or ""):
        raise errors.InvalidArgument(f"{kind} {value!r} must match {ID_RE.pattern}")


def check_labels(tenant: str, metadata: Mapping[str, str]) -> None:
    if tenant:
        check_id("tenant", tenant)
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise errors.InvalidArgument(f"metadata has {len(metadata)} entries; at most {MAX_METADATA_ENTRIES}")
    for key, value in metadata.items():
        if not 0 < len(key) <= MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise errors.InvalidArgument(
                f"metadata {key[:40]!r}: keys must be 1..{MAX_METADATA_KEY} characters and values "
                f"at most {MAX_METADATA_VALUE}"
            )


class AdapterManager:
    def __init__(self, config: ManagerConfig, registry: Registry, blobs: BlobStore, replicas: ReplicaClient):
        self.config = config
        self.registry = registry
        self.blobs = blobs
        self.replicas = replicas
        self.flags_profile = profile_from_flags(config)
        self.fetches = 0  # FetchAdapterWeights streams served (observability)
        self._profiles: dict[tuple[str, str], Profile] = {}
        self._loads: dict[tuple[str, str, bool], asyncio.Future] = {}
        self._reconcile: asyncio.Task | None = None
        self._reconcile_again = False

    @property
    def ttl_ms(self) -> int:
        return int(self.config.replica_ttl_s * 1000)

    # --- registry -----------------------------------------------------------------------------

    async def register_dir(
        self, adapter_id: str, path: str, tenant: str, metadata: Mapping[str, str]
    ) -> AdapterRecord:
        """RegisterAdapter: validate a directory under an adapter root and keep a copy of it."""
        check_id("adapter_id", adapter_id)
        check_labels(tenant, metadata)
        source = await asyncio.to_thread(resolve_adapter_dir, path, self.config.adapter_roots)
        staged = await asyncio.to_thread(self.blobs.stage_directory, source)
        return await self._record(adapter_id, staged, f"dir:{source}", str(source), tenant, metadata)

    async def upload(self, header: UploadHeader, chunks: AsyncIterator[bytes]) -> AdapterRecord:
        """UploadAdapter: receive the weights, then validate and record like register_dir."""
        check_id("adapter_id", header.adapter_id)
        check_labels(header.tenant, header.metadata)
        writer = await asyncio.to_thread(
            UploadWriter, self.blobs, header.adapter_config_json, self.config.max_upload_bytes
        )
        try:
            async for chunk in chunks:
                await asyncio.to_thread(writer.write, chunk)
            staged = await asyncio.to_thread(writer.finish)
        except BaseException:
            await asyncio.to_thread(writer.abort)
            raise
        if header.sha256 and header.sha256.lower() != staged.sha256:
            self.blobs.discard(staged)
            raise errors.ChecksumMismatch(
                f"uploaded weights hash to {staged.sha256}, not the declared {header.sha256}"
            )
        return await self._record(
            header.adapter_id, staged, "upload", "upload", header.tenant, header.metadata
        )

    async def _record(
        self,
        adapter_id: str,
        staged: StagedAdapter,
        source: str,
        label: str,
        tenant: str,
        metadata: Mapping[str, str],
    ) -> AdapterRecord:
        try:
            profiles = await self._validation_profiles()
            manifest = await asyncio.to_thread(validate, staged.directory, profiles, label)
            await asyncio.to_thread(self.blobs.commit, staged)
        finally:
            self.blobs.discard(staged)  # a no-op once committed (the directory moved)
        fields = record_fields(
            adapter_id,
            source,
            staged.sha256,
            staged.config_sha256,
            manifest.rank,
            manifest.lora_alpha,
            manifest.use_rslora,
            manifest.target_modules,
            staged.size_bytes,
            tenant,
            dict(metadata),
        )
        status = await self.registry.register(adapter_id, fields)
        if status == "alias":
            raise errors.AlreadyExists(
                f"{adapter_id!r} is an alias; adapters and aliases share one namespace"
            )
        if status == "exists":
            raise errors.AlreadyExists(f"adapter {adapter_id!r} is already registered with other content")
        return await self.get(adapter_id)

    async def _validation_profiles(self) -> list[Profile]:
        profiles: dict[tuple[str, str], Profile] = {}
        for replica_id, engine_json, model_json in await self.registry.live_engines():
            key = (engine_json, model_json)
            if key not in self._profiles:
                self._profiles[key] = profile_from_replica(replica_id, engine_json, model_json)
            profiles.setdefault(key, self._profiles[key])
        if not profiles and self.flags_profile is not None:
            return [self.flags_profile]
        return list(profiles.values())

    async def get(self, adapter_id: str) -> AdapterRecord:
        record = await self.registry.get(adapter_id)
        if record is None:
            raise errors.AdapterNotFound(adapter_id)
        return record

    async def list_adapters(
        self, page_size: int, page_token: str, tenant: str = "", state: str = "", replica_id: str = ""
    ) -> tuple[list[AdapterRecord], str]:
        """ListAdapters: a page in id order after `page_token`, and the next token ('' = done)."""
        if page_size == 0:
            page_size = DEFAULT_PAGE_SIZE
        if not 1 <= page_size <= self.config.max_page_size:
            raise errors.InvalidArgument(f"page_size ({page_size}) must be in 1..{self.config.max_page_size}")
        if state and state not in STATES:
            raise errors.InvalidArgument(f"state {state!r} must be one of {list(STATES)}")
        if page_token:
            check_id("page_token", page_token)
        if not replica_id:
            return await self.registry.list_page(page_token, page_size, tenant, state)
        ids = [a for a in await self.registry.held_by(replica_id) if a > page_token]
        records = [
            r
            for r in await self.registry.get_many(ids)
            if (not tenant or r.tenant == tenant) and (not state or r.state == state)
        ]
        page = records[:page_size]
        return page, page[-1].adapter_id if len(records) > page_size else ""

    async def unregister(self, adapter_id: str, force: bool) -> list[str]:
        """UnregisterAdapter; -> replicas it was evicted from first."""
        for _ in range(UNREGISTER_ATTEMPTS):
            begun = await self.registry.unregister_begin(adapter_id, force)
            _raise_refusal(adapter_id, begun)
            try:
                evicted = await self._evict_on(adapter_id, begun[1:])
            except BaseException:
                await self.registry.unregister_abort(adapter_id)
                raise
            done = await self.registry.unregister_finish(adapter_id, force)
            if done[0] == "ok":
                return evicted
            if done[0] != "held":
                _raise_refusal(adapter_id, done)
        raise errors.FailedPrecondition(
            f"adapter {adapter_id!r} kept being loaded while unregistering; retry"
        )

    # --- placement ----------------------------------------------------------------------------

    async def load(self, adapter_id: str, replica_id: str = "", to_slot: bool = False):
        """LoadAdapter; -> (replica id, the replica's ResidentAdapter). One load per key at a time."""
        key = (adapter_id, replica_id, to_slot)
        running = self._loads.get(key)
        if running is None:
            running = asyncio.ensure_future(self._load(adapter_id, replica_id, to_slot))
            self._loads[key] = running
            running.add_done_callback(lambda _: self._loads.pop(key, None))
        return await asyncio.shield(running)

    async def _load(self, adapter_id: str, replica_id: str, to_slot: bool):
        record = await self._live_record(adapter_id)
        replicas = await self.registry.replicas()
        if replica_id:
            target = next((r for r in replicas if r.replica_id == replica_id), None)
            if target is None:
                raise errors.ReplicaNotFound(replica_id)
            if not target.up:
                raise errors.Unavailable(f"replica {replica_id!r} is down ({target.down_reason})")
            if not can_hold(target, record):
                raise errors.FailedPrecondition(
                    f"replica {replica_id!r} cannot hold adapter {adapter_id!r} (rank {record.rank}, "
                    f"modules {list(record.target_modules)})"
                )
            return target.replica_id, await self._load_on(target, record, to_slot)
        chosen = choose_replica(record, replicas)
        if chosen is None:
            raise errors.NoReplicaAvailable(f"no live replica can hold adapter {adapter_id!r}")
        claimed, ours = await self.registry.claim_placement(
            adapter_id, chosen.replica_id, int(self.config.load_timeout_s * 1000)
        )
        target = next((r for r in replicas if r.replica_id == claimed and r.up), chosen)
        try:
            return target.replica_id, await self._load_on(target, record, to_slot)
        finally:
            if ours:
                await self.registry.release_placement(adapter_id)

    async def _load_on(self, replica: ReplicaRecord, record: AdapterRecord, to_slot: bool):
        """One LoadAdapter command carrying what the replica needs: the content hash, the victims
        the host-cache policy chose, the pin. The replica fetches the bytes and reports once."""
        acquired = await self.acquire(replica.replica_id, replica.epoch, record.adapter_id, [])
        return await self.replicas.load(
            replica.replica_id,
            replica.address,
            record.adapter_id,
            to_slot,
            record.pinned,
            sha256=acquired.sha256,
            evict=acquired.evict,
        )

    async def _live_record(self, adapter_id: str) -> AdapterRecord:
        record = await self.get(adapter_id)
        if record.deleting:
            raise errors.FailedPrecondition(f"adapter {adapter_id!r} is being unregistered")
        return record

    async def evict(self, adapter_id: str, replica_id: str = "", force: bool = False) -> list[str]:
        """EvictAdapter from one replica or all holders; -> replicas it was evicted from."""
        record = await self.get(adapter_id)
        if record.pinned and not force:
            raise errors.AdapterPinned(f"adapter {adapter_id!r} is pinned; unpin it or pass force")
        if record.pinned:
            await self.registry.set_pinned(adapter_id, False)
        if replica_id:
            if await self.registry.replica(replica_id) is None:
                raise errors.ReplicaNotFound(replica_id)
            return await self._evict_on(adapter_id, [replica_id])
        return await self._evict_on(adapter_id, list(record.placements))

    async def _evict_on(self, adapter_id: str, replica_ids: list[str]) -> list[str]:
        """Evict from each live replica named (clearing its local pin); mirror each confirmation."""
        by_id = {r.replica_id: r for r in await self.registry.replicas()}
        evicted = []

        async def one(replica: ReplicaRecord) -> None:
            if await self.replicas.evict(replica.replica_id, replica.address, adapter_id, unpin=True):
                evicted.append(replica.replica_id)
            await self.registry.mirror_evicted(replica.replica_id, adapter_id)

        live = [by_id[r] for r in replica_ids if r in by_id and by_id[r].up]
        await asyncio.gather(*(one(r) for r in live))
        return sorted(evicted)

    async def pin(self, adapter_id: str) -> list[str]:
        """PinAdapter: pinned on every live holder, loaded somewhere if none; -> those replicas."""
        was_pinned = (await self._live_record(adapter_id)).pinned
        answer = await self.registry.set_pinned(adapter_id, True)
        _raise_refusal(adapter_id, answer)
        holders = [r for r, s in zip(answer[1::2], answer[2::2]) if s in ("CACHED", "ACTIVE")]
        by_id = {r.replica_id: r for r in await self.registry.replicas()}
        pinned_on: list[str] = []
        try:
            for replica in (by_id[r] for r in holders if r in by_id and by_id[r].up):
                await self._load_on(replica, await self.get(adapter_id), to_slot=False)
                pinned_on.append(replica.replica_id)
            if not pinned_on:
                replica_id, _ = await self.load(adapter_id)
                pinned_on.append(replica_id)
        except BaseException:
            if not was_pinned and not pinned_on:
                await self.registry.set_pinned(adapter_id, False)
            raise
        return sorted(pinned_on)

    async def unpin(self, adapter_id: str) -> None:
        """UnpinAdapter: evictable at once for the manager, and on every live holder (a holder that
        cannot be reached drops its pin at its next heartbeat)."""
        answer = await self.registry.set_pinned(adapter_id, False)
        _raise_refusal(adapter_id, answer)
        holders = {r for r, s in zip(answer[1::2], answer[2::2]) if s in ("CACHED", "ACTIVE")}
        for replica in await self.registry.replicas():
            if replica.replica_id not in holders or not replica.up:
                continue
            try:
                await self.replicas.load(replica.replica_id, replica.address, adapter_id, False, False)
            except errors.ManagerError as e:
                log.warning(
                    "unpinning %s on %s failed (its heartbeat will): %s", adapter_id, replica.replica_id, e
                )

    async def cluster_state(self) -> list[ReplicaRecord]:
        return await self.registry.replicas()

    # --- routing ------------------------------------------------------------------------------

    async def routing_table(self) -> RoutingTable:
        return RoutingTable.from_stored(*await self.registry.routing())

    async def set_alias(self, name: str, variants: list[tuple[str, float]]) -> list[tuple[str, float]]:
        check_alias(name, variants)
        answer = await self.registry.set_alias(name, [[a, w] for a, w in variants])
        if answer[0] == "conflict":
            raise errors.AlreadyExists(
                f"{name!r} is a registered adapter; adapters and aliases share one namespace"
            )
        if answer[0] == "unknown":
            raise errors.AdapterNotFound(answer[1])
        return variants

    async def get_alias(self, name: str) -> list[tuple[str, float]]:
        variants = (await self.routing_table()).aliases.get(name)
        if variants is None:
            raise errors.AliasNotFound(name)
        return list(variants)

    async def delete_alias(self, name: str) -> None:
        answer = await self.registry.delete_alias(name)
        if answer[0] == "not_found":
            raise errors.AliasNotFound(name)
        if answer[0] == "referenced":
            raise errors.FailedPrecondition(f"alias {name!r} is the target of {', '.join(answer[1:])}")

    async def set_rules(self, rules: list[Rule]) -> list[Rule]:
        check_rules(rules)
        answer = await self.registry.set_rules([r.to_dict() for r in rules])
        if answer[0] == "unknown":
            raise errors.NotFound(f"rule target {answer[1]!r} is neither a registered adapter nor an alias")
        return rules

    async def resolve(
        self, adapter_id: str, request_key: str, tenant: str, headers: Mapping[str, str]
    ) -> Resolution:
        """ResolveAdapter: the concrete adapter (registered) a request would be served by."""
        resolution = resolve(await self.routing_table(), adapter_id, request_key, tenant, headers)
        if resolution.adapter_id and await self.registry.get(resolution.adapter_id) is None:
            raise errors.AdapterNotFound(resolution.adapter_id)
        return resolution

    # --- events -------------------------------------------------------------------------------

    async def events(self, after_id: str, adapter_id: str = "", replica_id: str = "") -> AsyncIterator[Event]:
        """WatchEvents: events after `after_id` ('' = from now), until the caller stops."""
        position = after_id or await self.registry.last_event_id()
        while True:
            for event in await self.registry.read_events(position):
                position = event.event_id
                if (not adapter_id or event.adapter_id == adapter_id) and (
                    not replica_id or event.replica_id == replica_id
                ):
                    yield event

    # --- replicas -----------------------------------------------------------------------------

    async def join(
        self,
        replica_id: str,
        address: str,
        engine: dict,
        model_json: str,
        snapshot: list[Resident],
        snapshot_seq: int,
    ) -> Joined:
        check_id("replica_id", replica_id)
        if not address:
            raise errors.InvalidArgument("address must be set (host:port of the replica's InferenceService)")
        try:
            ModelConfig.from_dict(json.loads(model_json))
            AdapterLimits.from_dict(engine)
        except (ValueError, KeyError, TypeError, InvalidModel) as e:
            raise errors.InvalidArgument(f"replica {replica_id!r} sent an unusable configuration: {e}") from e
        epoch, version, drop = await self.registry.join(
            replica_id, address, engine, model_json, snapshot, snapshot_seq, self.ttl_ms
        )
        log.info("replica %s joined at %s (epoch %d, %d resident)", replica_id, address, epoch, len(snapshot))
        self.schedule_reconcile()
        return Joined(epoch, int(self.config.heartbeat_interval_s * 1000), drop, version)

    async def heartbeat(
        self, replica_id: str, epoch: int, snapshot: list[Resident], snapshot_seq: int
    ) -> HeartbeatAnswer:
        answer = await self.registry.heartbeat(replica_id, epoch, snapshot, snapshot_seq, self.ttl_ms)
        if answer is None:
            return HeartbeatAnswer(rejoin=True)
        version, unpin, pin, drop = answer
        return HeartbeatAnswer(False, version, tuple(unpin), tuple(pin), tuple(drop))

    async def report(self, replica_id: str, epoch: int, changes: list[Change]) -> bool:
        """ReportResidency; False when the replica must rejoin."""
        return await self.registry.report(replica_id, epoch, changes)

    async def leave(self, replica_id: str, epoch: int) -> None:
        if await self.registry.mark_down(replica_id, "left", only_if_lapsed=False, epoch=epoch):
            log.info("replica %s left", replica_id)
            self.schedule_reconcile()

    async def acquire(self, replica_id: str, epoch: int, adapter_id: str, usage: list[Resident]) -> Acquired:
        """AcquireAdapter: apply the host-cache policy for a replica about to load `adapter_id`."""
        replica = await self.registry.replica(replica_id)
        if replica is None:
            raise errors.ReplicaNotFound(replica_id)
        max_cpu_loras = int(replica.engine["max_cpu_loras"])
        timeout_ms = int(self.config.load_timeout_s * 1000)
        deadline = asyncio.get_running_loop().time() + self.config.load_timeout_s
        delay = 0.01
        while True:
            answer = await self.registry.acquire(
                replica_id, epoch, adapter_id, usage, max_cpu_loras, timeout_ms
            )
            # {'exhausted', held, pinned}: while some entries are only loading (not pinned), wait
            # for their loads to land and become evictable instead of refusing a burst of cold
            # requests; when every entry is pinned, refuse at once.
            transient = answer[0] == "exhausted" and int(answer[2]) < int(answer[1])
            if not transient or asyncio.get_running_loop().time() + delay > deadline:
                break
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.2)
        kind = answer[0]
        if kind == "rejoin":
            raise errors.StaleReplica(f"replica {replica_id!r} epoch {epoch} is not current: join again")
        if kind == "exhausted":
            raise errors.NoEvictableAdapter(
                f"all {answer[1]} host-cache entries of replica {replica_id!r} (max_cpu_loras="
                f"{max_cpu_loras}) are pinned or loading ({answer[2]} pinned); nothing can be evicted"
            )
        _raise_refusal(adapter_id, answer)
        if kind == "resident":
            return Acquired(adapter_id, answer[1], int(answer[2]), True, [], bool(answer[3]))
        return Acquired(adapter_id, answer[1], int(answer[2]), False, list(answer[4]), bool(answer[3]))

    async def fetch(self, adapter_id: str) -> AsyncIterator[WeightsInfo | bytes]:
        """FetchAdapterWeights: a WeightsInfo, then the weights file in chunks.

        The stored copy is hashed as it streams (one read): a copy that no longer matches its
        registered sha256 ends the stream with StoredCopyCorrupt instead of its last message, so
        the replica (which checks the sha256 too) discards what it received.
        """
        record = await self._live_record(adapter_id)
        directory = self.blobs.path_for(record.sha256, record.config_sha256)
        if not (directory / WEIGHTS_FILE).is_file():
            raise errors.FailedPrecondition(
                f"the stored copy of adapter {adapter_id!r} is missing from {directory}"
            )
        try:
            config = await asyncio.to_thread((directory / CONFIG_FILE).read_bytes)
            problem = mismatch(CONFIG_FILE, hashlib.sha256(config).hexdigest(), record.config_sha256)
            if problem is None:
                self.fetches += 1
                yield WeightsInfo(adapter_id, record.sha256, record.size_bytes, config)
                digest = hashlib.sha256()
                with (directory / WEIGHTS_FILE).open("rb") as f:
                    while chunk := await asyncio.to_thread(
                        read_hashed, f, digest, self.config.fetch_chunk_bytes
                    ):
                        yield chunk
                problem = mismatch(WEIGHTS_FILE, digest.hexdigest(), record.sha256)
        except OSError as e:
            problem = f"cannot be read ({e})"
        if problem is not None:  # bit rot or tampering: the bytes must not be used
            log.error("stored copy of adapter %s is corrupt: %s (%s)", adapter_id, problem, directory)
            raise errors.StoredCopyCorrupt(
                f"the stored copy of adapter {adapter_id!r} is corrupt: {problem}; register it again"
            )

    # --- background ---------------------------------------------------------------------------

    async def sweep_once(self) -> list[str]:
        """Mark down every replica whose heartbeat lapsed; -> their ids."""
        down = []
        for replica_id in await self.registry.lapsed_replicas(self.ttl_ms):
            if await self.registry.mark_down(replica_id, "heartbeat lapsed", only_if_lapsed=True):
                log.warning("replica %s marked down: heartbeat lapsed", replica_id)
                down.append(replica_id)
        if down:
            self.schedule_reconcile()
        return down

    async def run_sweeper(self) -> None:
        """sweep_once every sweep interval until cancelled; Redis outages are logged and outlived."""
        failing = False
        while True:
            try:
                await self.sweep_once()
                if failing:
                    log.info("replica sweeps work again")
                failing = False
            except Exception as e:  # Redis down, a script error: keep the manager alive
                if not failing:
                    log.warning("replica sweep failed (logged once until it works again): %s", e)
                failing = True
            await asyncio.sleep(self.config.sweep_interval_s)

    def schedule_reconcile(self) -> None:
        """Soon, load every pinned adapter that no live replica holds (membership changed)."""
        if self._reconcile is not None and not self._reconcile.done():
            self._reconcile_again = True
            return
        self._reconcile = asyncio.get_running_loop().create_task(self._reconcile_pins())

    async def _reconcile_pins(self) -> None:
        self._reconcile_again = True
        while self._reconcile_again:
            self._reconcile_again = False
            try:
                for adapter_id in await self.registry.pinned_ids():
                    record = await self.registry.get(adapter_id)
                    if record is None or record.deleting:
                        continue
                    if any(s in HOLDING_STATES for s in record.placements.values()):
                        continue
                    try:
                        await self.load(adapter_id)
                    except errors.ManagerError as e:
                        log.warning("pinned adapter %s has no replica: %s", adapter_id, e)
            except Exception as e:
                log.warning("pin reconciliation failed: %s", e)

    async def close(self) -> None:
        if self._reconcile is not None:
            self._reconcile.cancel()
        await self.replicas.close()


def _raise_refusal(adapter_id: str, answer: list) -> None:
    """Turn a script's refusal into its typed error (no-op for 'ok'-like answers)."""
    kind = answer[0]
    if kind == "not_found":
        raise errors.AdapterNotFound(adapter_id)
    if kind == "deleting":
        raise errors.FailedPrecondition(f"adapter {adapter_id!r} is being unregistered")
    if kind == "pinned":
        raise errors.AdapterPinned(f"adapter {adapter_id!r} is pinned; unpin it or pass force")
    if kind == "active":
        raise errors.AdapterInUse(
            f"adapter {adapter_id!r} is in a slot on {', '.join(answer[1:])}; evict it or pass force"
        )
    if kind == "referenced":
        raise errors.AdapterInUse(
            f"adapter {adapter_id!r} is routed to by {', '.join(answer[1:])}; change them or pass force"
        )
