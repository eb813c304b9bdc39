"""`python -m loraserve.healthcheck HOST:PORT [SERVICE] [--tls-ca FILE]`: exit 0 iff the gRPC
health service says SERVING. Used by the compose healthchecks, so it needs nothing but
grpcio-health-checking. Health needs no token; `--tls-ca` checks a server that serves TLS."""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, service: str = "", timeout_s: float = 3.0, tls_ca: str | None = None) -> str:
    """The serving status name of `service` at `target` ("SERVING", "NOT_SERVING", ...), over TLS
    verified by `tls_ca` if given."""
    if tls_ca is None:
        channel = grpc.insecure_channel(target)
    else:
        with open(tls_ca, "rb") as f:
            channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(f.read()))
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
    parser.add_argument("--tls-ca", metavar="FILE", help="CA of a server that serves TLS")
    args = parser.parse_args(argv)
    try:
        status = check(args.target, args.service, args.timeout_s, args.tls_ca)
    except OSError as e:
        print(f"{args.target}: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        print(f"{args.target}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print(f"{args.target}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
