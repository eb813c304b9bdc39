"""Adapters, each on its own tag: registration, reads and paging, unregistration, pins and the
placement claim; with the global indexes (all, by tenant, by state, pinned) derived from records.
"""

from __future__ import annotations

import json

from adapter_svc import errors
from adapter_svc.blobs import blob_name
from adapter_svc.records import AdapterRecord, Refusal, Refused, Registered
from adapter_svc.registry.base import _hash, _refused
from adapter_svc.registry.blob_refs import BlobRefs
from adapter_svc.registry.cluster_wide import ClusterWide

# Index entries one ListAdapters call examines at most (filters may skip many of them).
LIST_SCAN_BUDGET = 5000
# Records one ListAdapters round trip reads.
LIST_CHUNK = 200


class Adapters(BlobRefs, ClusterWide):
    """The adapter registry: a registration references its blob (`BlobRefs`); unregistering checks
    the routes to it (`ClusterWide.routing`)."""

    async def register(self, adapter_id: str, fields: dict[str, str]) -> tuple[Registered, str]:
        """(REGISTER's answer, the registered tenant when it is TENANT, else ""). Three round
        trips: see `register_bulk`."""
        [(status, *owner)], _ = await self.register_bulk([(adapter_id, fields)], durable=True)
        return status, owner[0] if owner else ""

    async def register_bulk(
        self, items: list[tuple[str, dict[str, str]]], durable: bool = False
    ) -> tuple[list, int]:
        """Register adapters in three pipelined round trips -> ([(Registered, owner...) per
        item], how many were new). `durable`: one item, its record written through `_durable`.

        Sequence per adapter: alias check (read) with the blob reference (before the record, so a
        crash leaves at worst a reference too many, never a record whose copy may be collected)
        -> the record -> indexes and event, with the alias re-check (write, then re-check:
        SET_ALIAS re-checks records after its write, so of two racing changes one sees the
        other; a registration that finds the alias after undoes itself). Retrying repairs every
        step after the record."""
        blobs = [blob_name(f["sha256"], f["config_sha256"]) for _, f in items]

        def refs(pipe):
            for (adapter_id, _), blob in zip(items, blobs):
                pipe.hexists(self.keys.aliases, adapter_id)
                self._queue_blob_ref(pipe, blob, adapter_id)

        found = await self._many([], refs)
        aliased = {a for (a, _), alias in zip(items, found[0::4]) if alias}
        for (adapter_id, _), blob in zip(items, blobs):
            if adapter_id in aliased:  # the reference just added is not needed
                await self._blob_release(blob, "", adapter_id)
        todo = [(a, f) for a, f in items if a not in aliased]
        if durable and len(todo) == 1:
            adapter_id, fields = todo[0]
            replies = [
                await self._durable(
                    self.scripts.register, self.keys.adapter(adapter_id), adapter_id, json.dumps(fields)
                )
            ]
        else:
            replies = await self._many(
                [(self.scripts.register, self.keys.adapter(a), [a, json.dumps(f)]) for a, f in todo]
            )
        index, events, answers = [], [], {a: (Registered.ALIAS,) for a in aliased}
        for (adapter_id, _), (answer, emitted, _) in zip(todo, replies):
            status = Registered(answer[0])
            answers[adapter_id] = (
                (status,) if status in (Registered.OK, Registered.SAME) else (status, *answer[1:])
            )
            if status in (Registered.OK, Registered.SAME):
                index.append((self.scripts.index, self.keys.adapters, [adapter_id, *answer[1:5]]))
                events += emitted
        new = [a for a, _ in todo if answers[a][0] == Registered.OK]

        def events_and_aliases(pipe):
            self._queue_events(pipe, events)
            for adapter_id in new:
                pipe.hexists(self.keys.aliases, adapter_id)

        replies = await self._many(index, events_and_aliases)
        for adapter_id, alias in zip(new, replies[len(replies) - len(new) :]):
            if alias:
                await self._delete(adapter_id)
                answers[adapter_id] = (Registered.ALIAS,)
        out = [answers[a] for a, _ in items]
        return out, sum(1 for s, *_ in out if s == Registered.OK)

    async def get(self, adapter_id: str) -> AdapterRecord | None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.execute_command("HGETALL", self.keys.adapter(adapter_id))
            pipe.execute_command("HGETALL", self.keys.adapter_on(adapter_id))
            fields, on = map(_hash, await pipe.execute())
        return AdapterRecord.from_fields(fields, on) if fields else None

    async def require(self, adapter_id: str, live: bool = False) -> AdapterRecord:
        """The adapter's record. Raises AdapterNotFound; with `live`, FailedPrecondition while it is
        being unregistered."""
        record = await self.get(adapter_id)
        if record is None:
            raise errors.AdapterNotFound(adapter_id)
        if live and record.deleting:
            raise errors.FailedPrecondition(f"adapter {adapter_id!r} is being unregistered")
        return record

    async def list_page(
        self, cursor: str, page_size: int, tenant: str, state: str
    ) -> tuple[list[AdapterRecord], str]:
        """One page in id order after `cursor`, and the next cursor ('' when done): ids from the
        global index, records from their own slots (an index entry whose record is gone or no
        longer matches the filters is skipped)."""
        index = self.keys.adapters
        if tenant:
            index = self.keys.by_tenant(tenant)
        elif state:
            index = self.keys.by_state(state)
        start, examined, last, records = ("(" + cursor) if cursor else "-", 0, None, []
        while examined < LIST_SCAN_BUDGET and len(records) < page_size:
            ids = await self.client.zrangebylex(
                index, start, "+", start=0, num=min(LIST_CHUNK, LIST_SCAN_BUDGET - examined)
            )
            if not ids:
                break
            async with self.client.pipeline(transaction=False) as pipe:
                for adapter_id in ids:
                    pipe.hgetall(self.keys.adapter(adapter_id))
                found = await pipe.execute()
            for adapter_id, fields in zip(ids, found):
                examined, last = examined + 1, adapter_id
                if (
                    fields
                    and (not tenant or fields.get("tenant") == tenant)
                    and (not state or fields.get("state") == state)
                ):
                    records.append(AdapterRecord.from_fields(fields))
                    if len(records) >= page_size:
                        break
            start = "(" + last
        more = last is not None and bool(
            await self.client.zrangebylex(index, "(" + last, "+", start=0, num=1)
        )
        return records, last if more else ""

    async def get_many(self, adapter_ids: list[str]) -> list[AdapterRecord]:
        async with self.client.pipeline(transaction=False) as pipe:
            for adapter_id in adapter_ids:
                pipe.hgetall(self.keys.adapter(adapter_id))
            found = await pipe.execute()
        return [AdapterRecord.from_fields(f) for f in found if f]

    async def _references(self, adapter_id: str) -> tuple[str, ...]:
        """Alias names and rule names that route to `adapter_id`."""
        _, aliases, rules = await self.routing()
        refs = [
            f"alias {name}" for name, variants in aliases.items() if any(v[0] == adapter_id for v in variants)
        ]
        return tuple(refs + [f"rule {r['name']}" for r in rules if r.get("target") == adapter_id])

    async def unregister_begin(self, adapter_id: str, force: bool) -> tuple[str, ...] | Refused:
        """Mark the adapter `deleting` (no new loads); -> the replicas that hold it, or the refusal
        (NOT_FOUND, PINNED, ACTIVE or REFERENCED). References are checked after the mark (write,
        then re-check: SET_ALIAS / SET_RULES re-check `deleting` after their write)."""
        key = self.keys.adapter(adapter_id)
        answer, _, _ = await self._run(self.scripts.unregister_begin, key, adapter_id, "1" if force else "0")
        if answer[0] != "ok":
            return _refused(answer)
        if force:
            await self.client.srem(self.keys.pinned, adapter_id)  # the record is unpinned already
        elif refs := await self._references(adapter_id):
            await self.unregister_abort(adapter_id)
            return Refused(Refusal.REFERENCED, refs)
        return tuple(answer[1:])

    async def unregister_abort(self, adapter_id: str) -> None:
        await self._run(self.scripts.unregister_abort, self.keys.adapter(adapter_id), adapter_id)

    async def unregister_finish(self, adapter_id: str, force: bool) -> Refused | None:
        """Delete the adapter; None when done, else the refusal (NOT_FOUND, HELD or REFERENCED).
        Forced: routes to it go first (UNROUTE, idempotent), then the record, then its blob
        reference and index entries (a crash in between leaves index entries without a record,
        or a reference too many: both repaired by reconciliation)."""
        if not await self.client.exists(self.keys.adapter(adapter_id)):
            await self._run(self.scripts.unindex, self.keys.adapters, adapter_id, "")
            return Refused(Refusal.NOT_FOUND)
        if force:
            await self._run(self.scripts.unroute, self.keys.aliases, adapter_id)
        elif refs := await self._references(adapter_id):
            await self.unregister_abort(adapter_id)
            return Refused(Refusal.REFERENCED, refs)
        return await self._delete(adapter_id, durable=True)

    async def _delete(self, adapter_id: str, durable: bool = False) -> Refused | None:
        run = self._durable if durable else self._run
        key = self.keys.adapter(adapter_id)
        answer, _, _ = await run(self.scripts.unregister_finish, key, adapter_id)
        if answer[0] != "ok":
            return _refused(answer)
        _, tenant, _, sha256, config_sha256 = answer
        await self._blob_release(blob_name(sha256, config_sha256), "", adapter_id)
        await self._run(self.scripts.unindex, self.keys.adapters, adapter_id, tenant)
        return None

    # --- pins ---------------------------------------------------------------------------------

    async def set_pinned(self, adapter_id: str, pinned: bool) -> dict[str, str] | Refused:
        """Pin or unpin cluster-wide; -> its live holders {replica id: state}, or the refusal
        (NOT_FOUND or DELETING). The record's `pinned` is the truth; the global `pinned` set
        follows it (reconciliation repairs it after a crash in between)."""
        answer, events, _ = await self._durable(
            self.scripts.pin, self.keys.adapter(adapter_id), adapter_id, "1" if pinned else "0"
        )
        if answer[0] != "ok":
            return _refused(answer)

        def pin(pipe):
            (pipe.sadd if pinned else pipe.srem)(self.keys.pinned, adapter_id)

        await self._publish(events, pin)
        return dict(zip(answer[1::2], answer[2::2]))

    async def pinned_ids(self) -> list[str]:
        return sorted(await self.client.smembers(self.keys.pinned))

    # --- placement ----------------------------------------------------------------------------

    async def claim_placement(self, adapter_id: str, replica_id: str, ttl_ms: int) -> tuple[str, bool]:
        """(the replica placing `adapter_id`, whether this call claimed it): ours unless another
        placement of the same adapter is in progress, then theirs."""
        previous = await self.client.set(
            self.keys.placement(adapter_id), replica_id, nx=True, px=ttl_ms, get=True
        )
        return previous or replica_id, previous is None

    async def release_placement(self, adapter_id: str) -> None:
        await self.client.delete(self.keys.placement(adapter_id))
