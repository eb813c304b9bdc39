"""The endpoint picker's configuration: parsed once from flags and environment, then immutable.

Every field is a flag (`--queue-threshold`) and an environment variable
(`LORASERVE_PICKER_QUEUE_THRESHOLD`); the flag wins (see `endpoint_picker.cli`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from loraserve.auth import TokenTable
from loraserve.env_config import require
from loraserve.front_door import split_address


@dataclass(frozen=True)
class PickerConfig:
    """Where the picker listens, the cluster state it reads, and its picking thresholds."""

    # Address the ext_proc gRPC server binds.
    host: str = "0.0.0.0"
    # Port the ext_proc gRPC server binds; 0 picks a free one (tests).
    port: int = 9002
    # Port of the Prometheus endpoint (http://host:port/metrics); 0 = off.
    metrics_port: int = 0
    # Redis holding the cluster state (the manager's): redis://[:password@]host:port/db.
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Cluster name (the manager's `cluster`).
    cluster: str = "default"
    # How often the cluster state is re-read, in the background: picks use the last read and never
    # wait for Redis.
    cache_ttl_s: float = 0.1
    # How often a read covers every replica; the reads in between cover only the replicas the
    # manager marked changed (`<G>replicas:changed`). The full read repairs a mark that was lost.
    full_refresh_s: float = 5.0
    # A replica with this many requests in flight or queued is skipped while another is under it.
    queue_threshold: int = 32
    # A replica with less than this fraction of its KV cache free at its last heartbeat is skipped
    # while another has more (a new request would wait there for blocks); 0 = never.
    kv_free_threshold: float = 0.05
    # Requests for one adapter in flight on each of its holders from which its next request goes
    # to a replica that does not hold it yet (a hot adapter gains a copy).
    spread_threshold: int = 4
    # Most replicas one adapter is spread to by load (its copies shrink back as demand falls).
    max_copies: int = 2
    # `grpc_host:port=http_host:port` per replica: where its HTTP API listens (for /v1/ requests).
    http_endpoints: tuple[str, ...] = ()
    # Otherwise: the port every replica's HTTP API listens on, on its gRPC host (compose,
    # Kubernetes: one port for all); 0 = only `http_endpoints`.
    replica_http_port: int = 0
    # The stack's token file (the replicas' LORASERVE_AUTH_TOKENS; hashes only): a request's tenant
    # for routing rules is then its token's, as at the replica. Unset: the x-tenant header as sent
    # (right only when the replicas run without authentication).
    auth_tokens: str | None = None
    # Seconds in-flight calls get to finish at shutdown.
    shutdown_grace_s: float = 1.0
    # Logging level.
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        require(0 <= self.port <= 65535, "port", self.port, "must be a port number")
        require(0 <= self.metrics_port <= 65535, "metrics_port", self.metrics_port, "must be a port number")
        require(
            0 <= self.replica_http_port <= 65535,
            "replica_http_port",
            self.replica_http_port,
            "must be a port number",
        )
        require(self.cache_ttl_s > 0, "cache_ttl_s", self.cache_ttl_s, "must be > 0 (the refresh period)")
        require(self.full_refresh_s >= 0, "full_refresh_s", self.full_refresh_s, "must be >= 0")
        require(self.queue_threshold >= 1, "queue_threshold", self.queue_threshold, "must be >= 1")
        require(
            0 <= self.kv_free_threshold <= 1, "kv_free_threshold", self.kv_free_threshold, "must be in [0, 1]"
        )
        require(self.spread_threshold >= 1, "spread_threshold", self.spread_threshold, "must be >= 1")
        require(self.max_copies >= 1, "max_copies", self.max_copies, "must be >= 1")
        _ = self.tokens  # read now: an unreadable token file is a start-up error
        for pair in self.http_endpoints:
            grpc_address, sep, http_address = pair.partition("=")
            require(bool(sep), "http_endpoints", pair, "entries must be grpc_host:port=http_host:port")
            split_address(grpc_address)
            split_address(http_address)

    @cached_property
    def tokens(self) -> TokenTable | None:
        """The parsed `auth_tokens` file, read once."""
        return TokenTable.load(self.auth_tokens) if self.auth_tokens is not None else None

    @property
    def http_by_grpc(self) -> dict[str, str]:
        return dict(pair.split("=", 1) for pair in self.http_endpoints)
