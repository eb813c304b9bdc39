"""ListAdapters pages through 10,000+ registered adapters, with filters, from sorted-set indexes."""

from __future__ import annotations

import pytest

from adapter_svc.records import record_fields
from loraserve.v1 import adapter_pb2 as pb

from harness import TIMEOUT_S, bulk_register, register

COUNT = 10_500
TENANTS = 7


def bulk_records(template: pb.RegisteredAdapter, count: int) -> list[tuple[str, dict]]:
    """`count` records of the template's content, spread over TENANTS tenants."""
    return [
        (
            f"bulk-{i:05d}",
            record_fields(
                f"bulk-{i:05d}",
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
            ),
        )
        for i in range(count)
    ]


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


# Sentinel serves one primary, as "single" does, so paging reads the same keys there; the Cluster
# spreads them over its primaries. (10,500 registrations through Sentinel's replication cost a
# minute of the suite for no other path.)
@pytest.mark.parametrize("redis_proc", ["single", "cluster"], indirect=True)
def test_paging_through_ten_thousand_adapters(loop, manager, redis_proc, adapters):
    template = register(manager.stub, "ad-0", adapters["ad-0"], tenant="tenant-0")
    records = bulk_records(template, COUNT)
    assert bulk_register(loop, redis_proc.url, records) == COUNT
    ids = sorted(["ad-0", *(a for a, _ in records)])

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
