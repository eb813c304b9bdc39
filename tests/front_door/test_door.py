"""Three replicas behind the front door (real Envoy, the picker as its own process, real Redis).

The tests of this module share one cluster and run in order: affinity, spreading under load,
aliases, a spoofed destination header, the picker killed and restarted, and last a replica
killed under load.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import openai
import pytest

from loraserve.front_door import GRPC_CLUSTER, FrontDoorConfig
from loraserve.grpc_errors import stream_was_cut
from loraserve.names import DESTINATION_HEADER, REQUEST_KEY_HEADER
from loraserve.v1 import adapter_pb2 as pb
from loraserve.v1 import inference_pb2, inference_pb2_grpc

from harness import (
    TIMEOUT_S,
    EnvoyProcess,
    ManagerHandle,
    PickerProcess,
    RedisProcess,
    ReplicaProcess,
    free_port,
    long_request,
    manager_config,
    register,
    request,
    scrape,
    total,
    wait_for,
)

pytestmark = pytest.mark.slow


def grpcurl_binary() -> str:
    beside = Path(sys.executable).parent / "grpcurl"
    return str(beside) if beside.exists() else (shutil.which("grpcurl") or "grpcurl")


HEALTH_INTERVAL_S = 0.5


class Door:
    """The cluster: Redis, a manager, three replica processes, the picker and Envoy."""

    def __init__(self, loop, root, model_dir, adapters):
        self.root = root
        self.redis = RedisProcess(root / "redis").start()
        config = manager_config(
            self.redis.url,
            root,
            next(iter(adapters.values())).parent,
            model_dir,
            heartbeat_interval_s=0.5,
            # Envoy's health checks take a dead replica out; a replica starved of CPU by the other
            # processes on this machine must not lapse meanwhile (1.5 x the interval by default).
            replica_ttl_s=2.0,
        )
        self.manager = ManagerHandle(loop, config)
        self.replicas = [
            ReplicaProcess(
                model_dir,
                self.manager.address,
                f"r-{i}",
                free_port(),
                root / f"r-{i}.log",
                free_port(),
                http_port=free_port(),
            )
            for i in range(3)
        ]
        self.http_ports = {r.address: r.http_url.split(":")[-1].split("/")[0] for r in self.replicas}
        for adapter_id, path in adapters.items():
            register(self.manager.stub, adapter_id, path)
        self.picker_port = free_port()
        self.picker = self.start_picker()
        door = FrontDoorConfig(
            host="127.0.0.1",
            port=free_port(),
            http_port=free_port(),
            admin_port=free_port(),
            replicas=tuple(r.address for r in self.replicas),
            replica_http=tuple(f"127.0.0.1:{self.http_ports[r.address]}" for r in self.replicas),
            picker=f"127.0.0.1:{self.picker_port}",
            health_interval_s=HEALTH_INTERVAL_S,
        )
        self.envoy = EnvoyProcess(door, root / "envoy")
        wait_for(lambda: self.envoy.healthy_hosts(GRPC_CLUSTER) == 3, "envoy to see three healthy replicas")
        self.http_url = f"http://127.0.0.1:{door.http_port}/v1"  # the OpenAI-compatible API
        self.channel = grpc.insecure_channel(self.envoy.address)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)

    def start_picker(self) -> PickerProcess:
        mapping = [f"--http-endpoint={g}=127.0.0.1:{h}" for g, h in self.http_ports.items()]
        return PickerProcess(
            self.redis.url,
            self.picker_port,
            free_port(),
            self.root / "picker.log",
            "--cache-ttl-s",
            "0.05",
            *mapping,
        )

    def generate(self, adapter_id: str, metadata=(), max_tokens: int = 2) -> list:
        req = request("hello", adapter_id, max_tokens=max_tokens, temperature=0, ignore_eos=True)
        return list(self.stub.Generate(req, timeout=TIMEOUT_S, metadata=metadata))

    def holders(self, adapter_id: str) -> list[str]:
        """Replicas holding `adapter_id`, per each replica's ListResidentAdapters."""
        out = []
        for r in self.replicas:
            if r.proc.poll() is not None:
                continue
            listed = r.stub.ListResidentAdapters(
                inference_pb2.ListResidentAdaptersRequest(), timeout=TIMEOUT_S
            )
            if any(a.adapter_id == adapter_id for a in listed.adapters):
                out.append(r.replica_id)
        return out

    def served(self, adapter_id: str) -> dict[str, float]:
        """{replica id: requests for `adapter_id` it finished}, from each replica's metrics."""
        return {
            r.replica_id: total(scrape(r.metrics_url), "loraserve:requests_total", adapter=adapter_id)
            for r in self.replicas
            if r.proc.poll() is None
        }

    def close(self) -> None:
        self.channel.close()
        self.envoy.stop()
        self.picker.kill()
        for r in self.replicas:
            r.kill()
        self.manager.close()
        self.redis.stop()


@pytest.fixture(scope="module")
def door(loop, tmp_path_factory, model_dir, adapters):
    cluster = Door(loop, tmp_path_factory.mktemp("door"), model_dir, adapters)
    yield cluster
    cluster.close()


def test_every_request_for_one_adapter_lands_on_its_holder(door):
    for _ in range(6):
        assert door.generate("ad-0")
    holders = door.holders("ad-0")
    assert len(holders) == 1, f"a0 was loaded on {holders}: requests did not stick to one replica"
    served = wait_for(
        lambda: (s := door.served("ad-0")) and sum(s.values()) == 6 and s, "six a0 requests counted"
    )
    assert served[holders[0]] == 6, served
    picks = scrape(door.picker.metrics_url)
    assert (
        total(picks, "loraserve:picker_picks_total", reason="slot")
        + total(picks, "loraserve:picker_picks_total", reason="host")
        >= 5
    )


def test_a_second_adapter_goes_elsewhere_while_the_first_is_busy(door):
    holder = door.holders("ad-0")[0]
    stream = door.stub.Generate(long_request("ad-0"), timeout=TIMEOUT_S)
    next(stream)  # running now, on its holder
    try:
        in_flight = scrape(door.picker.metrics_url)
        assert total(in_flight, "loraserve:picker_in_flight", replica=holder) == 1
        assert door.generate("ad-1")
        assert door.holders("ad-1") and holder not in door.holders("ad-1")
    finally:
        stream.cancel()
    # The picker counts a request in flight until its stream ends, cancelled or not.
    wait_for(
        lambda: total(scrape(door.picker.metrics_url), "loraserve:picker_in_flight") == 0,
        "the picker to see every stream end",
    )


def test_aliases_resolve_at_the_door_as_at_a_replica(door):
    door.manager.stub.SetAlias(
        pb.SetAliasRequest(
            alias=pb.Alias(
                name="mix", variants=[pb.AliasVariant(adapter_id=a, weight=1) for a in ("ad-2", "ad-3")]
            )
        ),
        timeout=TIMEOUT_S,
    )
    for key in ("k1", "k2", "k3", "k4"):
        expected = door.manager.stub.ResolveAdapter(
            pb.ResolveAdapterRequest(adapter_id="mix", request_key=key), timeout=TIMEOUT_S
        ).adapter_id
        before = door.served(expected)
        assert door.generate("mix", metadata=((REQUEST_KEY_HEADER, key),))
        (holder,) = door.holders(expected)
        wait_for(
            lambda e=expected, h=holder, n=before[holder] + 1: door.served(e)[h] == n,
            f"{expected} on {holder}",
        )
    # Without a key the door draws the variant and the replica serves that same one.
    for _ in range(4):
        assert door.generate("mix")
    for variant in ("ad-2", "ad-3"):
        assert len(door.holders(variant)) <= 1, f"{variant} on {door.holders(variant)}"


def test_calls_without_an_adapter_pass_the_door_too(door):
    listed = door.stub.ListResidentAdapters(inference_pb2.ListResidentAdaptersRequest(), timeout=TIMEOUT_S)
    assert listed is not None
    # Reflection is a bidirectional stream: the door must not wait for its request body to end.
    done = subprocess.run(
        [grpcurl_binary(), "-plaintext", "-max-time", "20", door.envoy.address, "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "loraserve.v1.InferenceService" in done.stdout, done.stderr


def test_a_client_sent_destination_is_ignored(door):
    (holder,) = door.holders("ad-0")
    other = next(r for r in door.replicas if r.replica_id != holder and "ad-0" not in door.holders("ad-0"))
    before = door.served("ad-0")
    for _ in range(3):
        assert door.generate("ad-0", metadata=((DESTINATION_HEADER, other.address),))
    assert door.holders("ad-0") == [holder]
    wait_for(lambda: door.served("ad-0")[holder] == before[holder] + 3, "a0 served by its holder")


def test_traffic_continues_without_the_picker_and_picks_resume_with_it(door):
    door.picker.kill()
    for adapter_id in ("ad-0", "ad-1", "ad-4", "ad-0"):
        assert door.generate(adapter_id)
    assert door.envoy.stats()["http.door_grpc.ext_proc.picker.failure_mode_allowed"] >= 4
    door.picker = door.start_picker()
    for _ in range(3):
        assert door.generate("ad-0")
    picks = scrape(door.picker.metrics_url)
    assert total(picks, "loraserve:picker_picks_total") >= 3


def test_a_replica_killed_under_load_fails_no_request_that_had_not_started(door):
    (victim_id,) = door.holders("ad-0")[:1] or ["r-0"]
    victim = next(r for r in door.replicas if r.replica_id == victim_id)
    failures, done = [], []
    stop = threading.Event()

    def client(adapter_id: str):
        while not stop.is_set():
            started = False
            try:
                req = request("hello", adapter_id, max_tokens=8, temperature=0, ignore_eos=True)
                for _ in door.stub.Generate(req, timeout=TIMEOUT_S):
                    started = True
                done.append(adapter_id)
            except grpc.RpcError as e:
                failures.append((adapter_id, started, e.code(), e.details()))

    threads = [threading.Thread(target=client, args=(a,)) for a in ("ad-0", "ad-0", "ad-1", "ad-5")]
    for t in threads:
        t.start()
    wait_for(lambda: len(done) >= 8, "load to run")
    victim.kill()
    killed_at = time.monotonic()
    wait_for(lambda: door.envoy.healthy_hosts(GRPC_CLUSTER) == 2, "envoy to drop the killed replica")
    print(f"envoy took the killed replica out after {time.monotonic() - killed_at:.2f} s")
    count = len(done)
    wait_for(lambda: len(done) >= count + 8, "load to go on")
    stop.set()
    for t in threads:
        t.join(TIMEOUT_S)
    not_started = [f for f in failures if not f[1]]
    assert not not_started, f"requests that had not started failed: {not_started}"
    # A started stream is cut: Envoy resets it (HTTP/2 RST_STREAM, which gRPC reports as INTERNAL),
    # which clients (the CLI's message) tell from a server bug with `stream_was_cut`.
    assert all(f[2] is grpc.StatusCode.UNAVAILABLE or stream_was_cut(f[2], f[3]) for f in failures), failures
    assert door.generate("ad-0")
    assert door.holders("ad-0"), "a0 is served by a surviving replica"


def test_openai_clients_use_the_door_with_the_same_affinity_and_tokens(door):
    """The official `openai` client on the door's HTTP listener: /v1/models, completions streamed
    and not, land on the replica holding the adapter (the picker reads `model` from the JSON
    body) and answer the tokens the same replica answers directly."""
    through = openai.OpenAI(base_url=door.http_url, api_key="unused", max_retries=0, timeout=60)
    listed = {m.id for m in through.models.list().data}
    assert {"ad-0", "ad-1"} <= listed
    door.generate("ad-1")  # ad-1 is now resident (earlier tests may have left copies on several)
    holders = door.holders("ad-1")
    before = door.served("ad-1")
    fell_back = "http.door_http.ext_proc.picker.failure_mode_allowed"
    fallbacks = door.envoy.stats().get(fell_back, 0)
    ask = dict(model="ad-1", prompt="hello", max_tokens=4, temperature=0, logprobs=1)
    whole = through.completions.create(**ask)
    streamed = "".join(c.choices[0].text for c in through.completions.create(**ask, stream=True) if c.choices)
    direct_replica = next(r for r in door.replicas if r.replica_id == holders[0])
    direct = openai.OpenAI(base_url=direct_replica.http_url, api_key="unused", max_retries=0, timeout=60)
    assert whole.choices[0].text == streamed == direct.completions.create(**ask).choices[0].text
    after = door.served("ad-1")
    if door.envoy.stats().get(fell_back, 0) == fallbacks:  # the picker answered in time (no fail-open)
        # both door requests (and the direct one) went to holders: no replica loaded it anew
        assert sum(after[h] - before.get(h, 0) for h in holders) == 3
        assert door.holders("ad-1") == holders
