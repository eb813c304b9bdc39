"""Registry operations: register (a directory or an upload), get, list, unregister, serve the stored
bytes to replicas, and watch the change feed.

Validation runs the engine's own format checks against every live replica's profile
(`validation.py`); the canonical copy goes to the content-addressed store (`BlobStore`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

from adapter_svc import errors
from adapter_svc.blobs import BlobStore, StagedAdapter, UploadWriter, mismatch, read_hashed
from adapter_svc.config import ManagerConfig
from adapter_svc.placement import Placement
from adapter_svc.records import STATES, AdapterRecord, Event, Refusal, Refused, Registered, record_fields
from adapter_svc.registry import Registry
from adapter_svc.validation import (
    Profile,
    check_id,
    check_labels,
    profile_from_flags,
    profile_from_replica,
    validate,
)
from loraserve.adapter_paths import resolve_adapter_dir
from loraserve.peft_format import CONFIG_FILE, WEIGHTS_FILE

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
UNREGISTER_ATTEMPTS = 3
# A Redis stream entry id, as WatchEvents' after_id: "<ms>" or "<ms>-<seq>".
EVENT_ID_RE = re.compile(r"[0-9]{1,20}(?:-[0-9]{1,20})?")


@dataclass(frozen=True)
class UploadHeader:
    adapter_id: str
    adapter_config_json: bytes
    tenant: str
    metadata: dict
    sha256: str  # expected; "" = not checked


@dataclass(frozen=True)
class WeightsInfo:
    adapter_id: str
    sha256: str
    size_bytes: int
    adapter_config_json: bytes


class Catalog:
    """RegisterAdapter, UploadAdapter, GetAdapter, ListAdapters, UnregisterAdapter,
    FetchAdapterWeights and WatchEvents. Unregistering evicts through `placement`."""

    def __init__(self, config: ManagerConfig, registry: Registry, blobs: BlobStore, placement: Placement):
        self.config = config
        self.registry = registry
        self.blobs = blobs
        self.placement = placement
        self.flags_profile = profile_from_flags(config)
        self.fetches = 0  # FetchAdapterWeights streams served (observability)
        self.watchers = 0  # WatchEvents streams open now (at most config.max_watchers)
        self._profiles: dict[tuple[str, str], Profile] = {}

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
        status, owner = await self.registry.register(adapter_id, fields)
        if status == Registered.TENANT:
            raise errors.AlreadyExists(
                f"adapter {adapter_id!r} is already registered for tenant {owner or '(none)'!r}, not "
                f"{tenant or '(none)'!r}; unregister it first or register these files under another id"
            )
        if status == Registered.ALIAS:
            raise errors.AlreadyExists(
                f"{adapter_id!r} is an alias; adapters and aliases share one namespace"
            )
        if status == Registered.EXISTS:
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
        return await self.registry.require(adapter_id)

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
            holders = await self.registry.unregister_begin(adapter_id, force)
            if isinstance(holders, Refused):
                raise holders.error(adapter_id)
            try:
                evicted = await self.placement.evict_on(adapter_id, list(holders))
            except BaseException:
                await self.registry.unregister_abort(adapter_id)
                raise
            refused = await self.registry.unregister_finish(adapter_id, force)
            if refused is None:
                return evicted
            if refused.reason != Refusal.HELD:
                raise refused.error(adapter_id)
        raise errors.FailedPrecondition(
            f"adapter {adapter_id!r} kept being loaded while unregistering; retry"
        )

    async def fetch(self, adapter_id: str) -> AsyncIterator[WeightsInfo | bytes]:
        """FetchAdapterWeights: a WeightsInfo, then the weights file in chunks.

        The stored copy is hashed as it streams (one read): a copy that no longer matches its
        registered sha256 ends the stream with StoredCopyCorrupt instead of its last message, so
        the replica (which checks the sha256 too) discards what it received.
        """
        record = await self.registry.require(adapter_id, live=True)
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

    async def events(
        self,
        after_id: str,
        adapter_id: str = "",
        replica_id: str = "",
        ended: Callable[[], bool] = lambda: False,
    ) -> AsyncIterator[Event]:
        """WatchEvents: events after `after_id` ('' = from now), until the caller stops or
        `ended()` (the call is over: a cancellation lost inside a Redis command cannot keep a
        watcher, and its place among `max_watchers`, alive).

        InvalidArgument for an `after_id` that is not an event id; ResourceExhausted while
        `max_watchers` streams are already open.
        """
        if after_id and not EVENT_ID_RE.fullmatch(after_id):
            raise errors.InvalidArgument(
                f"after_id {after_id[:64]!r} is not an event id: use the `id` of an event "
                "(e.g. 1700000000000-0), 0 for the whole stream, or leave it empty for new events"
            )
        if self.watchers >= self.config.max_watchers:
            raise errors.ResourceExhausted(
                f"{self.watchers} WatchEvents streams are open (max_watchers={self.config.max_watchers}); "
                "close one or retry later"
            )
        self.watchers += 1
        try:
            position = after_id or await self.registry.last_event_id()
            while not ended():
                for event in await self.registry.read_events(position):
                    position = event.event_id
                    if (not adapter_id or event.adapter_id == adapter_id) and (
                        not replica_id or event.replica_id == replica_id
                    ):
                        yield event
        finally:
            self.watchers -= 1
