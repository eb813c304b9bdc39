"""Who uses each stored copy (blob) of `adapter_svc.blobs.BlobStore`: references (the adapters
registered with it) and leases, on the blob's own tag, and the global blob index and orphaned set
the collector works from.
"""

from __future__ import annotations

from adapter_svc.blobs import blob_name
from adapter_svc.registry.base import RegistryBase


class BlobRefs(RegistryBase):
    """References and leases of stored copies; claiming a garbage copy for deletion."""

    async def blob_hold(self, blob: str, token: str, lease_ms: int) -> bool:
        """Lease `blob` (kept from collection until released or `lease_ms`); False while a manager
        is deleting it."""
        answer, _, _ = await self._run(
            self.scripts.blob_hold, self.keys.blob_refs(blob), blob, token, lease_ms
        )
        return answer == 1

    async def blob_release(self, blob: str, token: str) -> None:
        await self._blob_release(blob, token, "")

    async def _blob_release(self, blob: str, token: str, adapter_id: str, only_unleased: bool = False) -> int:
        """Drop a lease and/or a reference; a blob left with neither becomes garbage (the global
        orphaned set, after the blob's own slot: a crash in between is repaired by reconciliation).
        -> the references left."""
        answer, _, _ = await self._run(
            self.scripts.blob_release, self.keys.blob_refs(blob), blob, token, adapter_id, int(only_unleased)
        )
        orphan, now, refs = answer
        if orphan:
            await self.client.zadd(self.keys.orphaned_blobs, {blob: now}, nx=True)
        return refs

    async def orphaned_blobs(self, before_ms: int, limit: int) -> list[str]:
        """Blobs with no reference since before `before_ms`, oldest first."""
        return await self.client.zrangebyscore(
            self.keys.orphaned_blobs, "-inf", before_ms, start=0, num=limit
        )

    async def blob_claim(self, blob: str, owner: str, claim_ms: int) -> str:
        """'claimed' (delete it, then `blob_deleted`), 'referenced', 'leased' or 'busy'."""
        answer, _, _ = await self._run(
            self.scripts.blob_claim, self.keys.blob_refs(blob), blob, owner, claim_ms
        )
        if answer == "referenced":
            await self.client.zrem(self.keys.orphaned_blobs, blob)
        return answer

    async def blob_deleted(self, blob: str, owner: str) -> bool:
        answer, events, _ = await self._run(self.scripts.blob_deleted, self.keys.blob_refs(blob), blob, owner)
        if answer == 1:

            def forget(pipe):
                pipe.zrem(self.keys.orphaned_blobs, blob)
                pipe.zrem(self.keys.blobs, blob)

            await self._publish(events, forget)
        return answer == 1

    async def count_blob_refs(self) -> bool:
        """Once per Redis: add every record's reference to its blob (records made before blobs
        were counted). A reference counted twice is harmless; one missing would let a blob go.
        -> True if this call did the counting."""
        if await self.client.exists(self.keys.blob_refs_version):
            return False
        cursor = "-"
        while True:
            ids = await self.client.zrangebylex(self.keys.adapters, cursor, "+", start=0, num=1000)
            if not ids:
                break
            await self._reference_blobs(ids)
            cursor = "(" + ids[-1]
        return bool(await self.client.set(self.keys.blob_refs_version, "1", nx=True))

    async def _reference_blobs(self, adapter_ids: list[str]) -> None:
        """Add each record's reference to its blob (idempotent)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for adapter_id in adapter_ids:
                pipe.hmget(self.keys.adapter(adapter_id), "sha256", "config_sha256")
            digests = await pipe.execute()

        def refs(pipe):
            for adapter_id, (sha256, config_sha256) in zip(adapter_ids, digests):
                if sha256 and config_sha256:
                    self._queue_blob_ref(pipe, blob_name(sha256, config_sha256), adapter_id)

        await self._many([], refs)

    def _queue_blob_ref(self, pipe, blob: str, adapter_id: str) -> None:
        pipe.zadd(self.keys.blobs, {blob: 0})
        pipe.sadd(self.keys.blob_refs(blob), adapter_id)
        pipe.zrem(self.keys.orphaned_blobs, blob)
