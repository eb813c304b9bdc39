"""`python -m loraserve.healthcheck HOST:PORT [SERVICE]`: exit 0 iff the gRPC health service says
SERVING. Used by the compose healthchecks and the Kubernetes probes, so it needs nothing but
grpcio-health-checking. `--tls-ca PEM` (env LORASERVE_TLS_CA) checks a server that serves TLS;
`--tls-server-name` (env LORASERVE_TLS_SERVER_NAME) is the name its certificate carries when HOST
is not it (127.0.0.1 in a probe)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(
    target: str, service: str = "", timeout_s: float = 3.0, tls_ca: str | None = None, server_name: str = ""
) -> str:
    """The serving status name of `service` at `target` ("SERVING", "NOT_SERVING", ...)."""
    if tls_ca:
        credentials = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes())
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        channel = grpc.secure_channel(target, credentials, options)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loraserve.healthcheck", description=__doc__.split("\n")[0]
    )
    parser.add_argument("target", help="HOST:PORT of a loraserve gRPC server")
    parser.add_argument("service", nargs="?", default="", help="service name ('' = the whole server)")
    parser.add_argument("--timeout-s", type=float, default=3.0)
    parser.add_argument("--tls-ca", default=os.environ.get("LORASERVE_TLS_CA"), help="CA of a TLS server")
    parser.add_argument(
        "--tls-server-name",
        default=os.environ.get("LORASERVE_TLS_SERVER_NAME", ""),
        help="name in the server's certificate (env LORASERVE_TLS_SERVER_NAME)",
    )
    args = parser.parse_args(argv)
    try:
        status = check(args.target, args.service, args.timeout_s, args.tls_ca, args.tls_server_name)
    except OSError as e:
        print(f"{args.target}: cannot read --tls-ca: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        print(f"{args.target}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print(f"{args.target}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
