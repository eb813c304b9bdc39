"""Registry operations: register (a directory or an upload), get, list, unregister, serve the stored
bytes to replicas, and watch the change feed.

Validation runs the engine's own format checks against every live replica's profile
(`validation.py`); the canonical copy goes to the content-addressed store (`BlobStore`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from adapter_svc import errors
from adapter_svc.blobs import BlobStore, StagedAdapter, UploadWriter, blob_name, mismatch, read_hashed
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
from loraserve.adapter_paths import open_adapter_dir
from loraserve.peft_format import CONFIG_FILE, WEIGHTS_FILE

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
UNREGISTER_ATTEMPTS = 3
# A lease on a stored copy outlives the longest registration commit or fetch it covers (a fetch
# that outlives it still completes: its file is open, and deleting it only unlinks it).
BLOB_LEASE_MS = 15 * 60 * 1000
# How long a registration waits for another manager to finish deleting the same content.
BLOB_BUSY_WAIT_S = 30.0
# A collecting manager's claim on a blob; a manager that dies mid-delete frees it after this.
BLOB_CLAIM_MS = 60 * 1000
# Blobs examined per collection pass.
BLOB_GC_BATCH = 100
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

        def stage() -> tuple[Path, StagedAdapter]:
            with open_adapter_dir(path, self.config.adapter_roots) as source:  # open, then verify
                return source.path, self.blobs.stage_directory(source)

        source, staged = await asyncio.to_thread(stage)
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
            async with self.blob_lease(blob_name(staged.sha256, staged.config_sha256)):
                await asyncio.to_thread(self.blobs.commit, staged)
                return await self._add_record(adapter_id, staged, manifest, source, tenant, metadata)
        finally:
            self.blobs.discard(staged)  # a no-op once committed (the directory moved)

    async def _add_record(
        self,
        adapter_id: str,
        staged: StagedAdapter,
        manifest,
        source: str,
        tenant: str,
        metadata: Mapping[str, str],
    ) -> AdapterRecord:
        """The registry record of committed files (the caller's lease keeps them meanwhile)."""
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
        async with self.blob_lease(blob_name(record.sha256, record.config_sha256)):
            async for part in self._read_stored(record):
                yield part

    async def _read_stored(self, record: AdapterRecord) -> AsyncIterator[WeightsInfo | bytes]:
        adapter_id = record.adapter_id
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

    # --- stored copies: leases and garbage collection -------------------------------------------

    @contextlib.asynccontextmanager
    async def blob_lease(self, blob: str):
        """Hold `blob` against collection (while a registration commits it or a fetch reads it);
        waits while another manager is deleting it, then the caller writes it anew."""
        token, delay = uuid.uuid4().hex, 0.02
        deadline = asyncio.get_running_loop().time() + BLOB_BUSY_WAIT_S
        while not await self.registry.blob_hold(blob, token, BLOB_LEASE_MS):
            if asyncio.get_running_loop().time() + delay > deadline:
                raise errors.Unavailable(f"the adapter store is still deleting {blob}; retry")
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.5)
        try:
            yield
        finally:
            await asyncio.shield(self.registry.blob_release(blob, token))

    async def collect_garbage(self) -> list[str]:
        """One pass: delete stored copies no adapter has used for `blob_gc_grace_s`; -> their names.
        Safe with several managers: each deletion holds a claim in Redis that no lease overlaps."""
        cutoff = await self.registry.now_ms() - int(self.config.blob_gc_grace_s * 1000)
        owner, deleted = uuid.uuid4().hex, []
        for blob in await self.registry.orphaned_blobs(cutoff, BLOB_GC_BATCH):
            if await self.registry.blob_claim(blob, owner, BLOB_CLAIM_MS) != "claimed":
                continue
            await asyncio.to_thread(self.blobs.delete, blob)
            if await self.registry.blob_deleted(blob, owner):
                deleted.append(blob)
                log.info("deleted stored copy %s: no adapter uses it", blob)
        return deleted

    async def run_garbage_collector(self) -> None:
        """Collect every `blob_gc_interval_s`, after counting the references of records older than
        the collector (once per Redis)."""
        if await self.registry.count_blob_refs():
            log.info("counted the stored-copy references of existing adapters")
        while True:
            await asyncio.sleep(self.config.blob_gc_interval_s)
            try:
                await self.collect_garbage()
            except errors.Unavailable as e:  # Redis away: the next pass tries again
                log.warning("stored-copy collection skipped: %s", e)

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
                    position = event.id
                    if (not adapter_id or event.adapter_id == adapter_id) and (
                        not replica_id or event.replica_id == replica_id
                    ):
                        yield event
        finally:
            self.watchers -= 1
