"""ListAdapters pages through 10,000+ registered adapters, with filters, from sorted-set indexes."""

from __future__ import annotations

import json

import redis

from adapter_svc import scripts
from adapter_svc.records import record_fields
from loraserve.v1 import adapter_pb2 as pb

from harness import TIMEOUT_S, register

COUNT = 10_500
TENANTS = 7


def bulk_register(redis_proc, template: pb.RegisteredAdapter, count: int) -> list[str]:
    """Register `count` records through the REGISTER script in pipelines (what 10k RPCs would do)."""
    r = redis_proc.client()
    if isinstance(r, redis.RedisCluster):  # no scripts in Cluster pipelines: pipeline to the slot's primary
        r = redis.Redis(host="127.0.0.1", port=redis_proc.primary_port(), decode_responses=True)
    script = r.register_script(scripts.REGISTER)
    ids = [f"bulk-{i:05d}" for i in range(count)]
    for start in range(0, count, 1000):
        pipe = r.pipeline(transaction=False)
        for i, adapter_id in enumerate(ids[start : start + 1000], start):
            fields = record_fields(
                adapter_id,
                template.source,
                template.sha256,
                "c" * 64,
                template.rank,
                template.lora_alpha,
                False,
                tuple(template.target_modules),
                template.size_bytes,
                f"tenant-{i % TENANTS}",
                {"i": str(i)},
            )
            script(
                keys=[redis_proc.keys.events],
                args=[redis_proc.keys.prefix, 1000, adapter_id, json.dumps(fields)],
                client=pipe,
            )
        assert all(out == ["ok"] for out in pipe.execute())
    return ids


def page_through(stub, page_size: int, **filters) -> list[str]:
    seen, token, pages = [], "", 0
    while True:
        page = stub.ListAdapters(
            pb.ListAdaptersRequest(page_size=page_size, page_token=token, **filters), timeout=TIMEOUT_S
        )
        seen += [a.adapter_id for a in page.adapters]
        pages += 1
        token = page.next_page_token
        if not token:
            return seen
        assert pages < 10 * COUNT // page_size, "paging does not terminate"


def test_paging_through_ten_thousand_adapters(manager, redis_proc, adapters):
    template = register(manager.stub, "ad-0", adapters["ad-0"], tenant="tenant-0")
    ids = sorted(["ad-0", *bulk_register(redis_proc, template, COUNT)])

    assert page_through(manager.stub, 1000) == ids
    assert page_through(manager.stub, 97) == ids  # a size that does not divide the count
    tenant3 = page_through(manager.stub, 500, tenant="tenant-3")
    assert tenant3 == [a for a in ids if a.startswith("bulk-") and int(a[5:]) % TENANTS == 3]
    registered = page_through(manager.stub, 1000, state=pb.ADAPTER_STATE_REGISTERED)
    assert registered == ids
    assert page_through(manager.stub, 100, state=pb.ADAPTER_STATE_ACTIVE) == []
    both = page_through(manager.stub, 250, tenant="tenant-0", state=pb.ADAPTER_STATE_REGISTERED)
    assert both == [a for a in ids if a == "ad-0" or (a.startswith("bulk-") and int(a[5:]) % TENANTS == 0)]

    one = manager.stub.ListAdapters(
        pb.ListAdaptersRequest(page_size=3, page_token="bulk-00041"), timeout=TIMEOUT_S
    )
    assert [a.adapter_id for a in one.adapters] == ["bulk-00042", "bulk-00043", "bulk-00044"]
    assert dict(one.adapters[0].metadata) == {"i": "42"} and one.adapters[0].tenant == "tenant-0"
