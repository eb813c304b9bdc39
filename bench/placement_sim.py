"""A placement run at internet scale, simulated: thousands of replicas, a hundred thousand adapters.

    config = SimConfig(adapters=100_000, replicas=1_000, requests=10_000)
    sim = PlacementSim(config, "redis://127.0.0.1:6379/0", RedisCounters([6379]), count_trips=True)
    figures = asyncio.run(sim.run())          # plain data: see `PlacementSim.run`

Real: Redis (one server or a Cluster), the registry (`adapter_svc.registry.Registry`: REGISTER,
JOIN, HEARTBEAT, REPORT, ACQUIRE and the reads around them), the manager's membership
(`adapter_svc.membership.Membership`) and host-cache policy (`adapter_svc.placement.Placement.acquire`),
its affinity choice for an explicit load (`placement.choose_replica`), routing resolution
(`loraserve.routing.resolve`), the endpoint picker's view of the cluster
(`endpoint_picker.view.ClusterState`) and its pick (`endpoint_picker.policy.pick`).

Simulated: the replicas (no model, no gRPC server: each keeps its slots and host cache in Python
and sends the manager what a real replica's agent sends: JOIN with its snapshot, HEARTBEAT with its
load and snapshot, ACQUIRE before a load and again when a load lands in a full cache (as
`Fetcher.room_for` does), REPORT of every residency change, in order), the picker's in-flight bookkeeping (as `endpoint_picker.extproc` keeps it), and time: one event heap in
simulated seconds (arrivals, loads landing, requests ending, heartbeats, picker view refreshes)
that nothing sleeps on. The calls run one at a time, so INFO commandstats taken around a call is
exactly that call's Redis work.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import json
import random
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace

import redis
import redis.asyncio.connection

from adapter_svc import errors
from adapter_svc.config import ManagerConfig
from adapter_svc.membership import Membership
from adapter_svc.placement import Placement, choose_replica
from adapter_svc.records import Change, Load, Resident, record_fields
from adapter_svc.registry import Registry, connect
from adapter_svc.replica_client import ReplicaClient
from bench.workload import WorkloadSpec, generate
from endpoint_picker.config import PickerConfig
from endpoint_picker.extproc import RECENT_S
from endpoint_picker.policy import Thresholds, pick
from endpoint_picker.view import ClusterState
from loraserve import redis_connect
from loraserve.engine_limits import ALL_TARGET_MODULES
from loraserve.routing import resolve

CLUSTER = "sim"
# A Llama-shaped config.json the replicas report (JOIN validates it; nothing is built from it).
MODEL_JSON = json.dumps(
    {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
    }
)
# Simulated wall-clock origin of residency timestamps (ms).
EPOCH_MS = 1_700_000_000_000
# Requests registered at once (the registry's pool holds redis_max_connections connections).
REGISTER_CONCURRENCY = 64
# Event kinds, in the order they are handled when due at the same simulated instant.
LANDED, DONE, ARRIVE, HEARTBEAT, REFRESH = range(5)
# Rows of the per-operation table: what the simulation did, and the real code each one ran.
OPS = {
    "slot hit": "picker pick; adapter already in a slot of the chosen replica",
    "host hit": "picker pick; in its host cache: REPORT activated (and deactivated)",
    "joins a load": "picker pick; its load is in flight there: waits for it",
    "cold load": "picker pick; Placement.acquire (ACQUIRE) then REPORT of the evictions",
    "load landed": "REPORT loaded (+ activated)",
    "request done": "REPORT of slot hand-overs to waiting requests, if any",
    "heartbeat": "Membership.heartbeat (HEARTBEAT with load and snapshot)",
    "view refresh": "ClusterState.view(): the picker reads the replicas marked changed",
    "view full read": "ClusterState.view() every full_refresh_s: the picker reads every replica",
}
REQUEST_OPS = ("slot hit", "host hit", "joins a load", "cold load", "load landed", "request done")


@dataclass(frozen=True)
class SimConfig:
    """One simulated cluster and its request stream."""

    adapters: int  # registered (synthetic records sharing `blobs` stored copies)
    replicas: int
    requests: int
    max_loras: int = 4  # slots per replica
    max_cpu_loras: int = 16  # host-cache entries per replica
    alpha: float = 0.3  # S-LoRA popularity exponent (1 = uniform, smaller = more skewed)
    rate_per_replica: float = 1.0  # Poisson arrivals, requests/s per replica (simulated)
    output_len: tuple[int, int] = (8, 512)  # tokens per request, uniform in [lo, hi)
    tpot_s: float = 0.01  # simulated seconds per output token: a request's duration
    load_s: float = 0.2  # simulated seconds from ACQUIRE to the load landing (fetch + read)
    heartbeat_s: float = ManagerConfig.heartbeat_interval_s  # every replica, staggered
    picker_ttl_s: float = PickerConfig.cache_ttl_s  # the picker re-reads Redis this often
    picker_full_s: float = PickerConfig.full_refresh_s  # ... and reads every replica this often
    blobs: int = 8  # distinct stored copies the records point at
    tenants: int = 100
    sample_every: int = 10  # INFO commandstats around every n-th event of each kind
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("adapters", "replicas", "requests", "max_loras", "sample_every", "blobs", "tenants"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 1")
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")


class CountingConnection(redis.asyncio.connection.Connection):
    """Counts messages sent to Redis on one server: one per command, pipeline or script call."""

    sent = 0

    async def send_packed_command(self, command, check_health: bool = True) -> None:
        CountingConnection.sent += 1
        await super().send_packed_command(command, check_health)


class RedisCounters:
    """INFO commandstats and memory summed over the primaries (commands run inside Lua scripts
    count too; INFO itself does not)."""

    def __init__(self, ports: list[int]):
        self.nodes = [redis.Redis(port=p, socket_timeout=30) for p in ports]

    def commands(self) -> tuple[int, int, list[int]]:
        """(commands, script calls, commands per primary) so far."""
        per_node, scripts = [], 0
        for node in self.nodes:
            stats = node.info("commandstats")
            per_node.append(sum(v["calls"] for k, v in stats.items() if k != "cmdstat_info"))
            scripts += sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("evalsha", "eval"))
        return sum(per_node), scripts, per_node

    def used_memory(self) -> int:
        return sum(node.info("memory")["used_memory"] for node in self.nodes)

    def dataset_memory(self) -> int:
        """used_memory less the clients' buffers (which come and go with the connections)."""
        total = 0
        for node in self.nodes:
            memory = node.info("memory")
            total += memory["used_memory"] - memory["mem_clients_normal"]
        return total

    def close(self) -> None:
        for node in self.nodes:
            node.close()


@dataclass
class Request:
    index: int
    adapter_id: str
    arrival_s: float
    duration_s: float
    replica_id: str = ""
    outcome: str = ""


class SimReplica:
    """A replica's residency, kept in Python as its engine would keep it, and reported as its agent
    reports it: numbered changes, in order."""

    def __init__(self, replica_id: str, address: str, max_loras: int, max_cpu_loras: int):
        self.replica_id = replica_id
        self.address = address
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.epoch = 0
        self.seq = 0  # residency changes so far
        self.host: dict[str, int] = {}  # adapter -> last use (ms): loaded
        self.slots: dict[str, int] = {}  # adapter -> slot index
        self.loading: dict[str, list[Request]] = {}  # adapter -> requests waiting for its load
        self.running: Counter[str] = Counter()  # adapter -> requests running
        self.users: Counter[str] = Counter()  # adapter -> requests running or waiting for a slot
        self.waiting: list[Request] = []  # loaded, waiting for a slot
        self.blocked: list[Request] = []  # waiting for room in the host cache
        self.changes: list[Change] = []  # not reported yet

    @property
    def engine(self) -> dict:
        return {
            "max_loras": self.max_loras,
            "max_lora_rank": 16,
            "max_cpu_loras": self.max_cpu_loras,
            "lora_target_modules": list(ALL_TARGET_MODULES),
            "lora_dtype": "auto",
        }

    def change(self, kind: str, adapter_id: str, slot: int, now_ms: int) -> None:
        self.seq += 1
        self.changes.append(Change(self.seq, kind, adapter_id, slot, now_ms))

    def snapshot(self, sha_of) -> list[Resident]:
        return [Resident(a, self.slots.get(a, -1), False, ms, sha_of(a)) for a, ms in self.host.items()]

    def load(self) -> Load:
        queued = len(self.waiting) + len(self.blocked) + sum(len(w) for w in self.loading.values())
        running = sum(self.running.values())
        return Load(waiting=queued, running=running, kv_free=max(0.0, 1 - running / 64))

    def host_full(self) -> bool:
        return len(self.host) + len(self.loading) >= self.max_cpu_loras

    def try_start(self, request: Request, now_ms: int) -> bool:
        """Run `request` if its adapter is in a slot or can take one (an idle slot's adapter is
        deactivated, least recently used first)."""
        a = request.adapter_id
        if a not in self.slots:
            slot = self._free_slot(now_ms)
            if slot is None:
                return False
            self.slots[a] = slot
            self.change("activated", a, slot, now_ms)
        self.running[a] += 1
        self.host[a] = now_ms
        return True

    def _free_slot(self, now_ms: int) -> int | None:
        used = set(self.slots.values())
        free = [s for s in range(self.max_loras) if s not in used]
        if free:
            return free[0]
        idle = [a for a in self.slots if not self.running[a]]
        if not idle:
            return None
        victim = min(idle, key=lambda a: self.host[a])
        slot = self.slots.pop(victim)
        self.change("deactivated", victim, slot, now_ms)
        return slot

    def evict(self, adapter_id: str, now_ms: int) -> bool:
        """Evict a victim the manager named; one that requests use is kept (as the engine does)."""
        if adapter_id not in self.host or self.users[adapter_id]:
            return False
        if adapter_id in self.slots:
            self.change("deactivated", adapter_id, self.slots.pop(adapter_id), now_ms)
        del self.host[adapter_id]
        self.change("evicted", adapter_id, -1, now_ms)
        return True


def percentiles_ms(samples: list[float]) -> dict:
    if not samples:
        return {"n": 0, "p50_ms": None, "p99_ms": None}
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "p50_ms": round(1000 * statistics.median(ordered), 3),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3),
    }


@dataclass
class OpStats:
    count: int = 0
    commands: list[int] = field(default_factory=list)  # sampled
    scripts: list[int] = field(default_factory=list)
    trips: list[int] = field(default_factory=list)  # every event (one Redis server only)

    def summary(self) -> dict:
        mean = statistics.fmean(self.commands) if self.commands else None
        return {
            "count": self.count,
            "sampled": len(self.commands),
            "commands_mean": round(mean, 2) if mean is not None else None,
            "commands_max": max(self.commands, default=None),
            "script_calls_mean": round(statistics.fmean(self.scripts), 2) if self.scripts else None,
            "round_trips_mean": round(statistics.fmean(self.trips), 2) if self.trips else None,
        }


class PlacementSim:
    """Registers, joins, drives the request stream and returns every figure as plain data.

    `redis_url`: the deployment (redis:// or redis+cluster://); `counters`: its primaries;
    `count_trips`: count messages sent (one Redis server only).
    """

    def __init__(self, config: SimConfig, redis_url: str, counters: RedisCounters, count_trips: bool):
        self.cfg = config
        self.counters = counters
        self.count_trips = count_trips
        self.manager_config = ManagerConfig(
            redis_url=redis_url,
            cluster=CLUSTER,
            store_dir="unused",  # no bytes are stored or fetched
            heartbeat_interval_s=config.heartbeat_s,
            # Redis's TTLs run on wall-clock time, slower or faster than the simulated clock: an
            # hour keeps every replica up (no sweeper runs; heartbeats are still sent on time).
            replica_ttl_s=3600.0,
        )
        self.redis_url = redis_url
        self.spec = WorkloadSpec(
            num_adapters=config.adapters,
            alpha=config.alpha,
            rate=config.rate_per_replica * config.replicas,
            cv=1.0,
            num_requests=config.requests,
            input_len=(1, 2),
            output_len=config.output_len,
            vocab_size=1,
            seed=config.seed,
        )
        self.ids = self.spec.adapter_ids()
        self.shas = [hashlib.sha256(f"sim-blob-{b}".encode()).hexdigest() for b in range(config.blobs)]
        self.config_shas = [
            hashlib.sha256(f"sim-config-{b}".encode()).hexdigest() for b in range(config.blobs)
        ]
        self.ops: dict[str, OpStats] = defaultdict(OpStats)
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.anomalies: Counter[str] = Counter()  # what should not happen, counted
        self.now = 0.0  # simulated seconds

    def sha_of(self, adapter_id: str) -> str:
        return self.shas[int(adapter_id.rpartition("-")[2]) % self.cfg.blobs]

    @property
    def now_ms(self) -> int:
        return EPOCH_MS + int(self.now * 1000)

    # --- set-up -----------------------------------------------------------------------------------

    async def _connect(self) -> None:
        self.redis = connect(self.manager_config)
        self.registry = Registry(self.redis, CLUSTER, self.manager_config.events_maxlen)
        self.placement = Placement(
            self.manager_config, self.registry, ReplicaClient(self.manager_config.replica_rpc_timeout_s)
        )
        self.membership = Membership(self.manager_config, self.registry, self.placement)
        self.picker_redis = redis_connect.connect(self.redis_url)
        # refreshed on the sim clock, which also times its full reads
        self.view_state = ClusterState(
            self.picker_redis,
            CLUSTER,
            ttl_s=0.0,
            full_refresh_s=self.cfg.picker_full_s,
            clock=lambda: self.now,
        )
        picker = PickerConfig()
        self.limits = Thresholds(
            picker.queue_threshold, picker.spread_threshold, picker.max_copies, picker.kv_free_threshold
        )
        if self.count_trips:
            for client in (self.redis, self.picker_redis):
                client.connection_pool.connection_class = CountingConnection
        # one call before many at once: a Cluster client reads the slot map on its first command
        await self.registry.ping()
        await self.picker_redis.ping()

    async def _register(self) -> dict:
        """Every adapter through `Registry.register`, REGISTER_CONCURRENCY at a time. Memory per
        adapter is measured from after the first tenth (at most 1,000: connections, script cache and
        the first allocations are in place by then) to the end, client buffers left out."""
        cfg = self.cfg
        warm_up = min(1000, cfg.adapters // 10)
        commands_before = self.counters.commands()[0]
        started = time.perf_counter()
        semaphore = asyncio.Semaphore(REGISTER_CONCURRENCY)
        outcomes: Counter[str] = Counter()

        async def one(i: int) -> None:
            b = i % cfg.blobs
            fields = record_fields(
                self.ids[i], f"sim://blob-{b}", self.shas[b], self.config_shas[b], 8, 16.0, False,
                ("q_proj", "v_proj"), 13_631_488, f"tenant-{i % cfg.tenants}", {},
            )  # fmt: skip
            async with semaphore:
                answer, _ = await self.registry.register(self.ids[i], fields)
            outcomes[answer.value] += 1

        async def register(first: int, end: int) -> None:
            for start in range(first, end, 5000):
                await asyncio.gather(*(one(i) for i in range(start, min(start + 5000, end))))

        await register(0, warm_up)
        memory_warm = self.counters.dataset_memory()
        await register(warm_up, cfg.adapters)
        seconds = time.perf_counter() - started
        memory = self.counters.dataset_memory() - memory_warm
        commands = self.counters.commands()[0] - commands_before
        events = await self.redis.memory_usage(self.registry.keys.events) or 0
        return {
            "seconds": round(seconds, 2),
            "outcomes": dict(outcomes),
            "commands_per_adapter": round(commands / cfg.adapters, 2),
            "memory_bytes_per_adapter": round(memory / (cfg.adapters - warm_up), 1),
            "events_stream_bytes": events,
        }

    async def _join(self) -> dict:
        cfg = self.cfg
        self.replicas = {}
        commands_before = self.counters.commands()[0]
        started = time.perf_counter()
        for i in range(cfg.replicas):
            r = SimReplica(f"sim-{i:05d}", f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:50051", cfg.max_loras,
                           cfg.max_cpu_loras)  # fmt: skip
            t0 = time.perf_counter()
            joined = await self.membership.join(r.replica_id, r.address, r.engine, MODEL_JSON, [], 0, "sim")
            self.latency["join"].append(time.perf_counter() - t0)
            r.epoch = joined.epoch
            self.replicas[r.replica_id] = r
        await asyncio.sleep(0.2)  # the pin reconciliation each join schedules (nothing is pinned)
        self.membership.close()
        commands = self.counters.commands()[0] - commands_before
        return {
            "seconds": round(time.perf_counter() - started, 2),
            "commands_per_join": round(commands / cfg.replicas, 1),
        }

    # --- the simulated clock ----------------------------------------------------------------------

    def _push(self, at: float, kind: int, item) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, kind, self._seq, item))

    async def _drive(self) -> dict:
        cfg = self.cfg
        rng = random.Random(cfg.seed)
        self._heap, self._seq = [], 0
        trace = generate(self.spec)
        for t in trace:
            duration = t.output_len * cfg.tpot_s
            self._push(t.arrival_s, ARRIVE, Request(t.index, t.adapter_id, t.arrival_s, duration))
        offsets = list(range(cfg.replicas))
        rng.shuffle(offsets)
        for r, offset in zip(self.replicas.values(), offsets):
            self._push(cfg.heartbeat_s * (offset + 0.5) / cfg.replicas, HEARTBEAT, r)
        self._push(-1e-6, REFRESH, None)  # the picker's first read comes before the first request
        self.last_arrival = trace[-1].arrival_s
        self.open_requests = len(trace)
        self.in_flight: Counter[str] = Counter()  # the picker's: requests per replica
        self.adapter_in_flight: Counter[tuple[str, str]] = Counter()
        self.recent: dict[str, tuple[str, float]] = {}
        self.outcomes: Counter[str] = Counter()
        self.asked: set[str] = set()
        self.decided = 0
        seen: Counter[int] = Counter()
        commands_before, _, per_node_before = self.counters.commands()
        started = time.perf_counter()
        handlers = {
            ARRIVE: self._arrive,
            LANDED: self._landed,
            DONE: self._done,
            HEARTBEAT: self._heartbeat,
            REFRESH: self._refresh,
        }
        while self._heap:
            at, kind, _, item = heapq.heappop(self._heap)
            self.now = at
            if kind in (HEARTBEAT, REFRESH) and not self.open_requests:
                continue  # the stream is over: let the clock stop
            sampled = seen[kind] % cfg.sample_every == 0
            seen[kind] += 1
            before = self.counters.commands() if sampled else None
            trips = CountingConnection.sent
            op = await handlers[kind](item)
            stats = self.ops[op]
            stats.count += 1
            if sampled:
                after = self.counters.commands()
                stats.commands.append(after[0] - before[0])
                stats.scripts.append(after[1] - before[1])
            if self.count_trips:
                stats.trips.append(CountingConnection.sent - trips)
        wall = time.perf_counter() - started
        commands_total, _, per_node = self.counters.commands()
        per_node = [after - before for after, before in zip(per_node, per_node_before)]
        return {
            "wall_s": round(wall, 1),
            "simulated_s": round(self.now, 1),
            "commands_total": commands_total - commands_before,
            "commands_per_primary": per_node,
            "busiest_primary_share": round(max(per_node) / max(sum(per_node), 1), 3),
        }

    # --- the picker -------------------------------------------------------------------------------

    async def _refresh(self, _) -> str:
        full_reads = self.view_state.full_reads
        t0 = time.perf_counter()
        self.view = await self.view_state.view()
        op = "view full read" if self.view_state.full_reads > full_reads else "view refresh"
        self.latency[op].append(time.perf_counter() - t0)
        self._push(self.now + self.cfg.picker_ttl_s, REFRESH, None)
        return op

    def _pick(self, request: Request) -> str:
        """The picker's decision for one request, as `ExternalProcessor._decide` makes it: the
        routing table resolves the name, the replica just sent the adapter counts as holding it
        for RECENT_S, then `pick` over the cached view. -> the replica id ('' = none)."""
        resolution = resolve(self.view.routing, request.adapter_id, "", "", {})
        adapter = resolution.adapter_id
        replicas = self.view.replicas
        holder, at = self.recent.get(adapter, ("", 0.0))
        if holder and self.now - at <= RECENT_S:
            replicas = [
                replace(r, cached=r.cached | {adapter}) if r.replica_id == holder else r for r in replicas
            ]
        queued = {r.replica_id: self.adapter_in_flight.get((r.replica_id, adapter), 0) for r in replicas}
        chosen = pick(replicas, adapter, self.in_flight, self.limits, queued)
        if chosen is None:
            return ""
        replica_id = chosen.replicas[0].replica_id
        self.in_flight[replica_id] += 1
        self.adapter_in_flight[replica_id, adapter] += 1
        self.recent[adapter] = (replica_id, self.now)
        return replica_id

    # --- the replicas -----------------------------------------------------------------------------

    async def _arrive(self, request: Request) -> str:
        self.asked.add(request.adapter_id)
        t0 = time.perf_counter()
        replica_id = self._pick(request)
        self.latency["picker pick"].append(time.perf_counter() - t0)
        if not replica_id:
            self.anomalies["no replica picked"] += 1
            self.open_requests -= 1
            return "undecided"
        self.decided += 1
        request.replica_id = replica_id
        r = self.replicas[replica_id]
        a = request.adapter_id
        if a in r.slots:
            request.outcome = "slot hit"
        elif a in r.host:
            request.outcome = "host hit"
        elif a in r.loading:
            request.outcome = "joins a load"
            r.loading[a].append(request)
        else:
            request.outcome = "cold load"
            await self._fetch(r, request)
        self.outcomes[request.outcome] += 1
        if request.outcome in ("slot hit", "host hit"):
            self._start_or_wait(r, request)
        await self._report(r)
        return request.outcome

    async def _fetch(self, r: SimReplica, request: Request) -> None:
        """What `inference_svc.fetcher` does for a request whose adapter the replica lacks:
        AcquireAdapter with its host cache, evict the victims named (only while full), load; one
        load per adapter, which later requests wait for."""
        a = request.adapter_id
        if a in r.host:
            self._start_or_wait(r, request)
            return
        if a in r.loading:
            r.loading[a].append(request)
            return
        usage = [Resident(x, r.slots.get(x, -1), False, ms) for x, ms in r.host.items()]
        t0 = time.perf_counter()
        try:
            acquired = await self.placement.acquire(r.replica_id, r.epoch, a, usage, wait_s=0.0)
        except errors.NoEvictableAdapter:
            self.latency["manager acquire"].append(time.perf_counter() - t0)
            self.anomalies["ACQUIRE exhausted (request waits for a load to land)"] += 1
            r.blocked.append(request)
            return
        self.latency["manager acquire"].append(time.perf_counter() - t0)
        if acquired.resident:
            self.anomalies["ACQUIRE said resident"] += 1
        for victim in acquired.evict:
            if not r.host_full():
                break
            if not r.evict(victim, self.now_ms):
                self.anomalies["victim in use, kept (room asked again when the load lands)"] += 1
        r.loading[a] = [request]
        self._push(self.now + self.cfg.load_s, LANDED, (r, a))

    async def _make_room(self, r: SimReplica, adapter_id: str) -> None:
        """A load landed in a full host cache (a victim named at ACQUIRE was in use): ask the
        manager for victims again, as `Fetcher.room_for` does."""
        usage = [Resident(x, r.slots.get(x, -1), False, ms) for x, ms in r.host.items()]
        t0 = time.perf_counter()
        try:
            acquired = await self.placement.acquire(r.replica_id, r.epoch, adapter_id, usage, wait_s=0.0)
        except errors.NoEvictableAdapter:
            acquired = None
        self.latency["manager acquire"].append(time.perf_counter() - t0)
        for victim in acquired.evict if acquired else ():
            if len(r.host) < r.max_cpu_loras:
                break
            r.evict(victim, self.now_ms)
        if len(r.host) >= r.max_cpu_loras:
            self.anomalies["loaded over max_cpu_loras"] += 1

    def _start_or_wait(self, r: SimReplica, request: Request, waited: bool = False) -> None:
        if not waited:
            r.users[request.adapter_id] += 1
        if r.try_start(request, self.now_ms):
            self._push(self.now + request.duration_s, DONE, (r, request))
        else:
            r.waiting.append(request)

    async def _landed(self, item) -> str:
        r, a = item
        if len(r.host) >= r.max_cpu_loras:
            await self._make_room(r, a)
        r.host[a] = self.now_ms
        r.change("loaded", a, -1, self.now_ms)
        for request in r.loading.pop(a):
            self._start_or_wait(r, request)
        blocked, r.blocked = r.blocked, []
        for request in blocked:  # room may be there now
            await self._fetch(r, request)
        await self._report(r)
        return "load landed"

    async def _done(self, item) -> str:
        r, request = item
        a = request.adapter_id
        r.running[a] -= 1
        r.users[a] -= 1
        r.host[a] = self.now_ms
        self.in_flight[r.replica_id] -= 1
        self.adapter_in_flight[r.replica_id, a] -= 1
        if not self.adapter_in_flight[r.replica_id, a]:
            del self.adapter_in_flight[r.replica_id, a]
        self.open_requests -= 1
        waiting, r.waiting = r.waiting, []
        for w in waiting:
            self._start_or_wait(r, w, waited=True)
        await self._report(r)
        return "request done"

    async def _report(self, r: SimReplica) -> None:
        if not r.changes:
            return
        t0 = time.perf_counter()
        ok = await self.membership.report(r.replica_id, r.epoch, r.changes)
        self.latency["report"].append(time.perf_counter() - t0)
        if not ok:
            self.anomalies["REPORT asked to rejoin"] += 1
        r.changes = []

    async def _heartbeat(self, r: SimReplica) -> str:
        t0 = time.perf_counter()
        answer = await self.membership.heartbeat(
            r.replica_id, r.epoch, r.snapshot(self.sha_of), r.seq, r.load()
        )
        self.latency["heartbeat"].append(time.perf_counter() - t0)
        if answer.rejoin or answer.drop:
            self.anomalies["HEARTBEAT asked to rejoin or drop"] += 1
        self._push(self.now + self.cfg.heartbeat_s, HEARTBEAT, r)
        return "heartbeat"

    # --- an explicit LoadAdapter's choice -------------------------------------------------------

    async def _load_decisions(self, samples: int) -> dict:
        """The manager's affinity choice for LoadAdapter without a replica (registry.require,
        registry.replicas, choose_replica), timed without the command it would then send."""
        rng = random.Random(self.cfg.seed + 1)
        times, commands = [], []
        for _ in range(samples):
            adapter_id = self.ids[rng.randrange(len(self.ids))]
            before = self.counters.commands()[0]
            t0 = time.perf_counter()
            record = await self.registry.require(adapter_id, live=True)
            chosen = choose_replica(record, await self.registry.replicas())
            times.append(time.perf_counter() - t0)
            commands.append(self.counters.commands()[0] - before)
            if chosen is None:
                self.anomalies["LoadAdapter found no replica"] += 1
        return {**percentiles_ms(times), "commands_mean": round(statistics.fmean(commands), 1)}

    # --- the whole run ----------------------------------------------------------------------------

    async def run(self, load_samples: int = 10) -> dict:
        cfg = self.cfg
        await self._connect()
        try:
            register = await self._register()
            join = await self._join()
            drive = await self._drive()
            load_decision = await self._load_decisions(load_samples)
            memory_end = self.counters.used_memory()
        finally:
            await self.redis.aclose()
            await self.picker_redis.aclose()
        ops = {name: self.ops[name].summary() for name in OPS if name in self.ops}
        requests = cfg.requests
        per_request = _weighted(ops, REQUEST_OPS, requests)
        refresh = _weighted(ops, ("view refresh", "view full read"), requests)
        served = self.outcomes["slot hit"] + self.outcomes["host hit"]
        estimated = sum(
            (o["commands_mean"] or 0) * o["count"] for o in ops.values() if o["commands_mean"] is not None
        )
        return {
            "config": asdict(cfg),
            "register": register,
            "join": join,
            "drive": {**drive, "commands_estimated_from_samples": round(estimated)},
            "ops": ops,
            "per_request": per_request,
            "per_request_view_refresh": refresh,
            "per_heartbeat": {
                "commands": ops.get("heartbeat", {}).get("commands_mean"),
                "round_trips": ops.get("heartbeat", {}).get("round_trips_mean"),
            },
            "latency": {name: percentiles_ms(v) for name, v in self.latency.items()},
            "load_decision": load_decision,
            "outcomes": dict(self.outcomes),
            "decided": self.decided,
            "hit_rate": {
                "slot": round(self.outcomes["slot hit"] / requests, 4),
                "host": round(self.outcomes["host hit"] / requests, 4),
                "slot_or_host": round(served / requests, 4),
                "cold": round((self.outcomes["cold load"]) / requests, 4),
            },
            "capacity": {
                "slots": cfg.replicas * cfg.max_loras,
                "host_entries": cfg.replicas * cfg.max_cpu_loras,
                "distinct_adapters_asked": len(self.asked),
            },
            "memory_bytes_end": memory_end,
            "anomalies": dict(self.anomalies),
        }


def _weighted(ops: dict, names: tuple[str, ...], requests: int) -> dict:
    """Mean commands and round trips of the named operations, weighted by their counts, per request."""
    commands = trips = 0.0
    for name in names:
        o = ops.get(name)
        if o is None:
            continue
        commands += (o["commands_mean"] or 0) * o["count"]
        trips += (o["round_trips_mean"] or 0) * o["count"]
    return {"commands": round(commands / requests, 2), "round_trips": round(trips / requests, 2)}
