"""The adapter manager's configuration: parsed once from flags and environment, then immutable.

Every field is a flag (`--heartbeat-interval-s`) and an environment variable
(`LORASERVE_MANAGER_HEARTBEAT_INTERVAL_S`); the flag wins (see `adapter_svc.cli`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from loraserve.engine_limits import ALL_TARGET_MODULES, MAX_LORA_RANK_LIMIT, TARGET_MODULE_NAMES
from loraserve.env_config import require
from loraserve.redis_connect import parse_redis_url

CLUSTER_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")


@dataclass(frozen=True)
class ManagerConfig:
    """Where the manager listens, where its state and bytes live, and its membership timing."""

    # Redis holding the registry and cluster state: redis://[:password@]host:port/db (one server),
    # redis+sentinel://host:port[,host:port...]/SERVICE[/db] (Sentinel) or
    # redis+cluster://host:port[,host:port...] (Cluster); rediss / redis+sentinels / redis+clusters: TLS.
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Cluster name: every key is `loraserve:v2:{cluster...}...`, so one Redis can hold several.
    cluster: str = "default"
    # Address the gRPC and metrics servers bind; beyond loopback needs --auth-tokens or --insecure.
    host: str = "127.0.0.1"
    # Port the gRPC server binds; 0 picks a free one (tests).
    port: int = 50052
    # Port of the Prometheus endpoint (http://host:port/metrics, same host as gRPC); 0 = off.
    metrics_port: int = 0
    # Directories RegisterAdapter may read adapters from (symlinks resolved; none = disabled).
    adapter_roots: tuple[str, ...] = ()
    # Where canonical adapter copies are kept, content-addressed by sha256.
    store_dir: str = "adapter-store"
    # Base model config.json (file or model directory) to validate adapters against while no
    # replica has joined; replicas' own model and engine configuration take over once they join.
    model_config: str | None = None
    # With `model_config`: the max_lora_rank adapters are validated against.
    max_lora_rank: int = 16
    # With `model_config`: the target modules adapters may use.
    lora_target_modules: tuple[str, ...] = ALL_TARGET_MODULES
    # How often replicas heartbeat (sent to them when they join).
    heartbeat_interval_s: float = 2.0
    # A replica with no heartbeat for this long is marked down; None = 1.5 x heartbeat_interval_s.
    # It is noticed within replica_ttl_s + heartbeat_interval_s / 4 of its last heartbeat.
    replica_ttl_s: float | None = None
    # A replica down for longer than this is forgotten: its record and keys are deleted, so it
    # leaves `loraserve status` and the picker's reads (it joins anew if it comes back). Checked
    # every min(this / 10, 60 s); 0 = never forget.
    forget_down_after_s: float = 3600.0
    # Largest UploadAdapter weights file accepted.
    max_upload_bytes: int = 4 * 1024**3
    # Size of each FetchAdapterWeights data message.
    fetch_chunk_bytes: int = 1024**2
    # How often each manager collects stored copies no adapter uses any more; 0 = never.
    blob_gc_interval_s: float = 60.0
    # A stored copy is collected once unused for this long (registering the same files again
    # meanwhile keeps it).
    blob_gc_grace_s: float = 300.0
    # Events kept in the event stream (older ones are trimmed, approximately).
    events_maxlen: int = 100_000
    # Concurrent WatchEvents streams; one more is refused with RESOURCE_EXHAUSTED. Watchers read
    # Redis through a pool of this many connections of their own, apart from the RPCs' pool.
    max_watchers: int = 64
    # Connections in the Redis pool serving every other RPC and the background tasks.
    redis_max_connections: int = 100
    # Registry writes (register, unregister, pin, aliases, rules) are acknowledged only once this
    # many Redis replicas have them (WAIT, on the primary that took the write: on a Cluster, the
    # shard's): with Sentinel or a Cluster, 1 keeps every acknowledged registration through a
    # primary's failover; 0 = acknowledged when the primary has it (fsync per `appendfsync`).
    redis_wait_replicas: int = 0
    # How long one WAIT waits; fewer acknowledgements by then answer UNAVAILABLE (retry).
    redis_wait_timeout_ms: int = 1000
    # Largest ListAdapters page.
    max_page_size: int = 1000
    # How long a replica may take to fetch and load an adapter before its reservation lapses.
    load_timeout_s: float = 120.0
    # Deadline of each command the manager sends a replica (LoadAdapter, EvictAdapter).
    replica_rpc_timeout_s: float = 120.0
    # Redis commands are retried this many times on connection loss, with exponential backoff.
    redis_retries: int = 6
    # First backoff between Redis retries; doubles up to redis_backoff_cap_s.
    redis_backoff_base_s: float = 0.05
    # Longest backoff between Redis retries.
    redis_backoff_cap_s: float = 2.0
    # On SIGTERM: seconds in-flight calls get to finish before they are cancelled.
    shutdown_grace_s: float = 5.0
    # Python logging level name.
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        require(
            bool(CLUSTER_RE.match(self.cluster)), "cluster", self.cluster, f"must match {CLUSTER_RE.pattern}"
        )
        try:
            parse_redis_url(self.redis_url)
        except ValueError as e:
            raise ValueError(f"redis_url: {e}") from None
        require(0 <= self.port <= 65535, "port", self.port, "must be in 0..65535")
        require(
            self.redis_wait_replicas >= 0, "redis_wait_replicas", self.redis_wait_replicas, "must be >= 0"
        )
        require(
            self.redis_wait_timeout_ms >= 1,
            "redis_wait_timeout_ms",
            self.redis_wait_timeout_ms,
            "must be >= 1",
        )
        require(self.blob_gc_interval_s >= 0, "blob_gc_interval_s", self.blob_gc_interval_s, "must be >= 0")
        require(self.blob_gc_grace_s >= 0, "blob_gc_grace_s", self.blob_gc_grace_s, "must be >= 0")
        require(0 <= self.metrics_port <= 65535, "metrics_port", self.metrics_port, "must be in 0..65535")
        roots = tuple(str(Path(r).resolve()) for r in self.adapter_roots)
        object.__setattr__(self, "adapter_roots", roots)
        for root in roots:
            require(Path(root).is_dir(), "adapter_roots", root, "must be an existing directory")
        require(bool(self.store_dir), "store_dir", self.store_dir, "must be set")
        require(
            1 <= self.max_lora_rank <= MAX_LORA_RANK_LIMIT,
            "max_lora_rank",
            self.max_lora_rank,
            f"must be in 1..{MAX_LORA_RANK_LIMIT}",
        )
        targets = tuple(self.lora_target_modules)
        object.__setattr__(self, "lora_target_modules", targets)
        require(
            bool(targets) and set(targets) <= set(TARGET_MODULE_NAMES),
            "lora_target_modules",
            list(targets),
            f"must be a non-empty subset of {list(TARGET_MODULE_NAMES)}",
        )
        require(
            self.heartbeat_interval_s > 0, "heartbeat_interval_s", self.heartbeat_interval_s, "must be > 0"
        )
        if self.replica_ttl_s is None:
            object.__setattr__(self, "replica_ttl_s", 1.5 * self.heartbeat_interval_s)
        require(
            self.replica_ttl_s > self.heartbeat_interval_s,
            "replica_ttl_s",
            self.replica_ttl_s,
            f"must be > heartbeat_interval_s ({self.heartbeat_interval_s}), or live replicas flap",
        )
        require(
            self.forget_down_after_s >= 0,
            "forget_down_after_s",
            self.forget_down_after_s,
            "must be >= 0 (0 = never forget)",
        )
        require(self.max_upload_bytes > 0, "max_upload_bytes", self.max_upload_bytes, "must be > 0")
        require(
            4096 <= self.fetch_chunk_bytes <= 4 * 1024**2,
            "fetch_chunk_bytes",
            self.fetch_chunk_bytes,
            "must be in 4096..4194304 (gRPC messages stay under 4 MiB)",
        )
        require(self.events_maxlen >= 100, "events_maxlen", self.events_maxlen, "must be >= 100")
        require(self.max_watchers >= 1, "max_watchers", self.max_watchers, "must be >= 1")
        require(
            self.redis_max_connections >= 8,
            "redis_max_connections",
            self.redis_max_connections,
            "must be >= 8",
        )
        require(self.max_page_size >= 1, "max_page_size", self.max_page_size, "must be >= 1")
        require(self.load_timeout_s > 0, "load_timeout_s", self.load_timeout_s, "must be > 0")
        require(
            self.replica_rpc_timeout_s > 0, "replica_rpc_timeout_s", self.replica_rpc_timeout_s, "must be > 0"
        )
        require(self.redis_retries >= 0, "redis_retries", self.redis_retries, "must be >= 0")
        require(
            0 < self.redis_backoff_base_s <= self.redis_backoff_cap_s,
            "redis_backoff_base_s",
            self.redis_backoff_base_s,
            f"must be > 0 and <= redis_backoff_cap_s ({self.redis_backoff_cap_s})",
        )
        require(self.shutdown_grace_s >= 0, "shutdown_grace_s", self.shutdown_grace_s, "must be >= 0")

    @property
    def sweep_interval_s(self) -> float:
        """How often lapsed replicas are looked for."""
        return self.heartbeat_interval_s / 4
