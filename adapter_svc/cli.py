"""`python -m adapter_svc {serve,events}`: flags and environment variables -> ManagerConfig, once.

Every ManagerConfig field is a flag (`--heartbeat-interval-s`) and an environment variable
(`LORASERVE_MANAGER_HEARTBEAT_INTERVAL_S`); a flag wins over the variable, the variable over the
default. `--adapter-root` may be repeated (the variable takes a comma-separated list).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from adapter_svc.config import ManagerConfig
from loraserve.env_config import add_config_flags, config_from
from loraserve.errors import LoraServeError
from loraserve.security import add_security_flags

ENV_PREFIX = "LORASERVE_MANAGER_"
# Flags whose name differs from their field: repeated, one value each.
REPEATED = {"adapter_roots": "--adapter-root"}


def add_manager_flags(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser, ManagerConfig, ENV_PREFIX, "manager configuration", REPEATED)


def manager_config_from(args: argparse.Namespace, environ=os.environ) -> ManagerConfig:
    """flag > environment variable > ManagerConfig default; raises ValueError naming the field."""
    return config_from(ManagerConfig, args, ENV_PREFIX, environ)


def cmd_serve(args: argparse.Namespace) -> int:
    from adapter_svc.server import serve
    from loraserve.security import security_config_from
    from loraserve.telemetry import setup_logging

    config = manager_config_from(args)
    security = security_config_from(args)
    setup_logging("manager", config.log_level)
    asyncio.run(serve(config, security))
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    """Print events as they happen (one line each) until interrupted."""
    import grpc

    from loraserve.v1 import adapter_pb2, adapter_pb2_grpc

    async def tail() -> None:
        async with grpc.aio.insecure_channel(args.target) as channel:
            stub = adapter_pb2_grpc.AdapterServiceStub(channel)
            request = adapter_pb2.WatchEventsRequest(
                after_id=args.after, adapter_id=args.adapter or "", replica_id=args.replica or ""
            )
            async for e in stub.WatchEvents(request):
                print(
                    f"{e.id} {e.type:<15} adapter={e.adapter_id or '-'} replica={e.replica_id or '-'} {e.detail}"
                )

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        pass
    return 0


def build_parser() -> argparse.ArgumentParser:
    """`python -m adapter_svc`'s flags (also what tests check deployment manifests against)."""
    parser = argparse.ArgumentParser(prog="python -m adapter_svc")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the adapter manager (gRPC AdapterService)")
    add_manager_flags(serve)
    add_security_flags(serve)
    events = sub.add_parser("events", help="tail the manager's event stream")
    events.add_argument("--target", default="127.0.0.1:50052", help="manager host:port")
    events.add_argument("--after", default="", help="stream id to start after ('0' = oldest kept)")
    events.add_argument("--adapter", help="only events about this adapter")
    events.add_argument("--replica", help="only events about this replica")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"serve": cmd_serve, "events": cmd_events}[args.command](args)
    except (ValueError, LoraServeError) as e:  # a bad setting, or an unusable --model-config
        print(f"error: {e}", file=sys.stderr)
        return 2
