"""The reconciliation passes: bounded, idempotent repairs of the drift a manager that dies in the
middle of a sequence leaves (adapter_svc/README.md lists each invariant and its repair).
"""

from __future__ import annotations

from adapter_svc.blobs import blob_name
from adapter_svc.records import STATES
from adapter_svc.registry.base import _lua_list
from adapter_svc.registry.blob_refs import BlobRefs


class Reconcile(BlobRefs):
    """Each pass examines at most `limit` entities after `cursor` and answers the next cursor ('' =
    it wrapped around). Every repair is an idempotent step of the sequences of the other parts, so
    a pass may run concurrently with the changes it repairs, and on several managers at once."""

    async def reconcile_adapters(self, cursor: str, limit: int) -> str:
        """Per listed adapter: the global indexes (all, tenant, state, pinned) and its blob
        reference follow its record; an index entry without a record goes; each `on` field
        follows the mirror of the replica it names (none for a down or unknown replica); the
        `on-version` fields of forgotten replicas go."""
        ids = await self.client.zrangebylex(
            self.keys.adapters, ("(" + cursor) if cursor else "-", "+", start=0, num=limit
        )
        await self.repair_adapters(ids)
        return ids[-1] if len(ids) == limit else ""

    async def repair_adapters(self, ids: list[str]) -> None:
        """`reconcile_adapters` for these ids (migration indexes copied records with it): reads
        first, and writes only where something drifted."""
        async with self.client.pipeline(transaction=False) as pipe:
            for adapter_id in ids:
                pipe.hmget(
                    self.keys.adapter(adapter_id),
                    "tenant",
                    "state",
                    "state_seq",
                    "pinned",
                    "sha256",
                    "config_sha256",
                )
                pipe.hkeys(self.keys.adapter_on(adapter_id))
                pipe.hkeys(self.keys.adapter_on_version(adapter_id))
            found = await pipe.execute()
        records = {a: f for a, f in zip(ids, found[0::3]) if f[1] is not None}
        checks = 9  # commands queued per record below
        async with self.client.pipeline(transaction=False) as pipe:
            for adapter_id, (tenant, _, _, _, sha256, config_sha256) in records.items():
                pipe.zscore(self.keys.adapters, adapter_id)
                pipe.zscore(self.keys.by_tenant(tenant or "-"), adapter_id)
                for state in STATES:
                    pipe.zscore(self.keys.by_state(state), adapter_id)
                pipe.sismember(self.keys.pinned, adapter_id)
                pipe.sismember(self.keys.blob_refs(blob_name(sha256, config_sha256)), adapter_id)
            seen = await pipe.execute()
        fixes, unreferenced = [], []
        for n, (adapter_id, (tenant, state, seq, pinned, _, _)) in enumerate(records.items()):
            listed, in_tenant, *in_states, is_pinned, referenced = seen[checks * n : checks * n + checks]
            indexed = [s for s, score in zip(STATES, in_states) if score is not None]
            if (
                listed is None
                or (tenant and in_tenant is None)
                or indexed != [state]
                or bool(is_pinned) != (pinned == "1")
            ):
                fixes.append(
                    (
                        self.scripts.index,
                        self.keys.adapters,
                        [adapter_id, tenant or "", state, seq or "0", pinned or "0"],
                    )
                )
            if not referenced:
                unreferenced.append(adapter_id)
        gone = [(self.scripts.unindex, self.keys.adapters, [a, ""]) for a in ids if a not in records]
        await self._many(fixes + gone)
        if unreferenced:
            await self._reference_blobs(unreferenced)
        on: dict[str, list[str]] = {}
        for adapter_id, holders in zip(ids, found[1::3]):
            for replica_id in holders:
                on.setdefault(replica_id, []).append(adapter_id)
        for replica_id, adapter_ids in on.items():
            await self._reconcile_on(replica_id, adapter_ids)
        await self._drop_versions(ids, found[1::3], found[2::3])

    async def _drop_versions(self, ids: list[str], holders: list, versioned: list) -> None:
        """DROP_VERSIONS of each adapter's `on-version` fields that name a replica with no record
        (forgotten) and no `on` field: the versions a forgotten replica left behind."""
        extra = {a: set(v) - set(h) for a, h, v in zip(ids, holders, versioned)}
        named = sorted(set().union(*extra.values()))
        if not named:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for replica_id in named:
                pipe.exists(self.keys.replica(replica_id))
            gone = {r for r, exists in zip(named, await pipe.execute()) if not exists}
        await self._many(
            [
                (self.scripts.drop_versions, self.keys.adapter(a), [a, _lua_list(sorted(rs & gone))])
                for a, rs in extra.items()
                if rs & gone
            ]
        )

    async def reconcile_replicas(self, cursor: int, limit: int) -> int:
        """Per replica (by position in the membership index): every adapter its mirror holds or
        loads has the mirror's state in its `on` hash. Where the pass wraps, change marks of ids
        no longer in the membership index go. -> the next position (0 = wrapped)."""
        replica_ids = await self.client.zrange(self.keys.replicas, cursor, cursor + limit - 1)
        for replica_id in replica_ids:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.execute_command("ZRANGE", self.keys.replica_host(replica_id), 0, -1)
                pipe.execute_command("HKEYS", self.keys.replica_loading(replica_id))
                host, loading = await pipe.execute()
            await self._reconcile_on(replica_id, sorted(set(host) | set(loading)))
        if len(replica_ids) == limit:
            return cursor + limit
        if gone := await self.client.zdiff([self.keys.replicas_changed, self.keys.replicas]):
            await self.client.zrem(self.keys.replicas_changed, *gone)
        return 0

    async def _reconcile_on(self, replica_id: str, adapter_ids: list[str]) -> None:
        """RESIDE, at the mirror's current version, each adapter whose `on` field for the replica
        differs from what the replica's mirror says."""
        if not adapter_ids:
            return
        (states, _, _), *fields = await self._many(
            [
                (
                    self.scripts.mirror_states,
                    self.keys.replica(replica_id),
                    [replica_id, _lua_list(adapter_ids)],
                )
            ],
            lambda pipe: [pipe.hget(self.keys.adapter_on(a), replica_id) for a in adapter_ids],
        )
        version, *mirror = states
        fixes = [
            (self.scripts.reside, self.keys.adapter(a), [a, replica_id, state, version, "", ""])
            for (a, state), held in zip(mirror, fields)
            if (held or "") != state
        ]
        replies = await self._many(fixes)
        await self._move_states([(fix[2][0], out[0]) for fix, out in zip(fixes, replies)])

    async def reconcile_blobs(self, cursor: str, limit: int) -> str:
        """Per known blob: a reference whose adapter no longer uses the blob goes (unless a lease
        is live: a registration in progress); a blob with no reference and no lease is garbage
        (orphaned), one with references is not. A referencing record missing from the global
        index (its registration died after the record) is indexed: a registration references
        its blob before it writes the record, so every record is found from some blob."""
        blobs = await self.client.zrangebylex(
            self.keys.blobs, ("(" + cursor) if cursor else "-", "+", start=0, num=limit
        )
        async with self.client.pipeline(transaction=False) as pipe:
            for blob in blobs:
                pipe.smembers(self.keys.blob_refs(blob))
            refs = await pipe.execute()
        for blob, ids in zip(blobs, refs):
            async with self.client.pipeline(transaction=False) as pipe:
                for adapter_id in ids:
                    pipe.hmget(self.keys.adapter(adapter_id), "sha256", "config_sha256")
                digests = await pipe.execute()
            live = []
            for adapter_id, (sha256, config_sha256) in zip(ids, digests):
                if not sha256 or blob_name(sha256, config_sha256) != blob:
                    await self._blob_release(blob, "", adapter_id, only_unleased=True)
                else:
                    live.append(adapter_id)
            if live:
                async with self.client.pipeline(transaction=False) as pipe:
                    for adapter_id in live:
                        pipe.zscore(self.keys.adapters, adapter_id)
                    listed = await pipe.execute()
                await self.repair_adapters([a for a, score in zip(live, listed) if score is None])
            if await self._blob_release(blob, "", ""):
                await self.client.zrem(self.keys.orphaned_blobs, blob)
        return blobs[-1] if len(blobs) == limit else ""
