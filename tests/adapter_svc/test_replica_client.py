"""The manager's channels to replicas: one per address, closed when unused for `idle_close_s`
(replica addresses come and go, one per pod) and opened again on demand. The replicas here are
loopback ports nothing listens on, so each command fails UNAVAILABLE, which is all a channel needs
to be made and used; the clock is the client's injected one."""

from __future__ import annotations

import pytest

from adapter_svc import errors
from adapter_svc.records import ReplicaRecord
from adapter_svc.replica_client import ReplicaClient

from harness import free_port


def _replica(replica_id: str) -> ReplicaRecord:
    return ReplicaRecord(replica_id, f"127.0.0.1:{free_port()}", "UP", 1, 0, 0, {}, "", "", (), ())


def test_a_channel_unused_for_idle_close_s_is_closed_and_opened_again_on_demand(loop):
    now = [0.0]
    client = ReplicaClient(timeout_s=1.0, idle_close_s=60.0, clock=lambda: now[0])
    gone, kept = _replica("r-gone"), _replica("r-kept")

    async def command(replica: ReplicaRecord, at: float) -> None:
        now[0] = at
        with pytest.raises(errors.ReplicaCommandFailed):
            await client.evict(replica, "ad-1", unpin=False)

    async def scenario():
        await command(gone, 0.0)
        await command(kept, 0.0)
        assert client.addresses() == sorted([gone.address, kept.address])
        await command(kept, 50.0)  # `kept` used again; `gone` not
        assert client.addresses() == sorted([gone.address, kept.address])
        await command(kept, 61.0)  # `gone` idle for 61 s > 60 s: closed
        assert client.addresses() == [kept.address]
        await command(gone, 62.0)  # and opened again when a command needs it
        assert client.addresses() == sorted([gone.address, kept.address])
        await client.close()
        assert client.addresses() == []

    loop.run(scenario())


def test_a_channel_is_never_closed_sooner_than_a_call_can_last():
    assert ReplicaClient(timeout_s=30.0, idle_close_s=5.0).idle_close_s == 30.0
