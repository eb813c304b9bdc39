"""`loraserve`: the command-line client of a loraserve cluster.

    loraserve [--manager HOST:PORT] [--replica HOST:PORT] [--token T] [--tls-ca PEM] [--timeout S]
              [--request-id ID] COMMAND ...

Commands: plan, register, unregister, list, pin, unpin, load, evict, generate, status, events.
Registry and placement commands go to the adapter manager (`--manager`, env
LORASERVE_ADAPTER_MANAGER, default 127.0.0.1:50052); `generate` goes to the front door, which
picks the replica (`--replica`, env LORASERVE_REPLICA, default 127.0.0.1:50051: the door of
`make run` and docker compose; a replica's own address works too). Every call carries an
`x-request-id` (given, or generated), which both services log.

A failure prints one line, `error: CODE: message`, and exits 1 (2 for bad arguments); never a
traceback.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from tqdm import tqdm

from loraserve.auth import token_metadata
from loraserve.grpc_errors import stream_was_cut
from loraserve.names import CONFIG_FILE, REQUEST_ID_HEADER, WEIGHTS_FILE, new_request_id

DEFAULT_MANAGER = "127.0.0.1:50052"
DEFAULT_REPLICA = "127.0.0.1:50051"
UPLOAD_CHUNK_BYTES = 1024 * 1024


class CliError(Exception):
    """A failure reported as `error: <message>` (exit code `code`)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# --- connections --------------------------------------------------------------------------------


class Connection:
    """A channel to one server; `call` turns RPC failures into CliError lines naming the server."""

    def __init__(self, role: str, target: str, args: argparse.Namespace):
        self.role, self.target = role, target
        self.timeout = args.timeout
        self.metadata = (
            (REQUEST_ID_HEADER, args.request_id),
            *(token_metadata(args.token) if args.token else ()),
        )
        if args.tls_ca:
            credentials = grpc.ssl_channel_credentials(Path(args.tls_ca).read_bytes())
            self.channel = grpc.secure_channel(target, credentials)
        else:
            self.channel = grpc.insecure_channel(target)

    def call(self, method, request, timeout: float | None = None):
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise self.error(e) from None

    def stream(self, method, request, timeout: float | None = None) -> Iterator:
        try:
            yield from method(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise self.error(e) from None

    def error(self, e: grpc.RpcError) -> CliError:
        details = " ".join((e.details() or "").split())
        if e.code() == grpc.StatusCode.UNAVAILABLE and "connect" in details:
            details = f"cannot reach the {self.role} at {self.target} ({details})"
        elif stream_was_cut(e.code(), details):
            details = "the stream was cut before it finished (the replica serving it went away); run it again"
        return CliError(f"{e.code().name}: {details}")

    def close(self) -> None:
        self.channel.close()


def manager(args: argparse.Namespace):
    from loraserve.v1 import adapter_pb2_grpc

    conn = Connection("adapter manager", args.manager, args)
    return conn, adapter_pb2_grpc.AdapterServiceStub(conn.channel)


def call_for_adapter(args: argparse.Namespace, method: str, request_type: str, **fields):
    """The manager's answer to `method` with an `adapter_pb2.<request_type>` for `args.adapter_id`
    and `fields`."""
    from loraserve.v1 import adapter_pb2

    conn, stub = manager(args)
    request = getattr(adapter_pb2, request_type)(adapter_id=args.adapter_id, **fields)
    return conn.call(getattr(stub, method), request)


def replica(args: argparse.Namespace, target: str | None = None):
    from loraserve.v1 import inference_pb2_grpc

    conn = Connection("inference replica", target or args.replica, args)
    return conn, inference_pb2_grpc.InferenceServiceStub(conn.channel)


# --- output helpers -------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list]) -> str:
    cells = [headers, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def ago(ms: int) -> str:
    if not ms:
        return "-"
    seconds = max(0.0, time.time() - ms / 1000)
    if seconds < 120:
        return f"{seconds:.1f} s ago"
    return f"{seconds / 60:.0f} min ago"


def state_name(value: int) -> str:
    from loraserve.v1 import adapter_pb2

    return adapter_pb2.AdapterState.Name(value).removeprefix("ADAPTER_STATE_")


# --- commands -------------------------------------------------------------------------------------


def cmd_plan(args: argparse.Namespace) -> int:
    try:
        from inference_svc.cli import main as inference_main
    except ImportError as e:  # the client-only install (`pip install loraserve`) has no torch
        raise CliError(
            f"`loraserve plan` runs the engine's planner, which needs the server install "
            f"(pip install 'loraserve[server]'; {e.name} is missing)"
        ) from None
    return inference_main(["plan", *args.rest])


def cmd_register(args: argparse.Namespace) -> int:
    from loraserve.v1 import adapter_pb2

    path = Path(args.path).resolve()
    metadata = dict(_key_value(kv) for kv in args.metadata or ())
    conn, stub = manager(args)
    if args.upload:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (path / name).is_file():
                raise CliError(f"{path}: {name} is missing", code=2)
        record = conn.call(stub.UploadAdapter, _upload_messages(args.adapter_id, path, args.tenant, metadata))
    else:
        request = adapter_pb2.RegisterAdapterRequest(
            adapter_id=args.adapter_id, path=str(path), tenant=args.tenant, metadata=metadata
        )
        record = conn.call(stub.RegisterAdapter, request)
    print(
        f"registered {record.adapter_id}: rank {record.rank}, {len(record.target_modules)} modules, "
        f"{size(record.size_bytes)}, sha256 {record.sha256[:12]}, {state_name(record.state)}"
    )
    return 0


def _key_value(spec: str) -> tuple[str, str]:
    key, sep, value = spec.partition("=")
    if not sep or not key:
        raise CliError(f"--metadata entry ({spec!r}) must be KEY=VALUE", code=2)
    return key, value


def _upload_messages(adapter_id: str, path: Path, tenant: str, metadata: dict) -> Iterator:
    from loraserve.v1 import adapter_pb2

    config, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    header = adapter_pb2.UploadHeader(
        adapter_id=adapter_id, adapter_config_json=config.read_bytes(), tenant=tenant, metadata=metadata
    )
    yield adapter_pb2.UploadAdapterRequest(header=header)
    total = weights.stat().st_size
    with (
        weights.open("rb") as f,
        tqdm(total=total, unit="B", unit_scale=True, desc="uploading", disable=None) as bar,
    ):
        while chunk := f.read(UPLOAD_CHUNK_BYTES):
            yield adapter_pb2.UploadAdapterRequest(chunk=chunk)
            bar.update(len(chunk))


def cmd_unregister(args: argparse.Namespace) -> int:
    response = call_for_adapter(args, "UnregisterAdapter", "UnregisterAdapterRequest", force=args.force)
    evicted = f" (evicted from {', '.join(response.evicted_from)})" if response.evicted_from else ""
    print(f"unregistered {args.adapter_id}{evicted}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from loraserve.v1 import adapter_pb2

    conn, stub = manager(args)
    state = adapter_pb2.AdapterState.Value(f"ADAPTER_STATE_{args.state.upper()}") if args.state else 0
    rows, token = [], ""
    while True:
        request = adapter_pb2.ListAdaptersRequest(
            page_size=args.page_size, page_token=token, tenant=args.tenant, state=state, replica_id=args.on
        )
        page = conn.call(stub.ListAdapters, request)
        for a in page.adapters:
            rows.append(
                [
                    a.adapter_id,
                    state_name(a.state),
                    a.rank,
                    size(a.size_bytes),
                    "yes" if a.pinned else "no",
                    a.tenant or "-",
                ]
            )
        token = page.next_page_token
        if not token:
            break
    print(table(["ADAPTER", "STATE", "RANK", "SIZE", "PINNED", "TENANT"], rows))
    print(f"{len(rows)} adapters")
    return 0


def cmd_pin(args: argparse.Namespace) -> int:
    response = call_for_adapter(args, "PinAdapter", "PinAdapterRequest")
    print(f"pinned {args.adapter_id} on {', '.join(response.replica_ids) or 'no replica yet'}")
    return 0


def cmd_unpin(args: argparse.Namespace) -> int:
    call_for_adapter(args, "UnpinAdapter", "UnpinAdapterRequest")
    print(f"unpinned {args.adapter_id}")
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    response = call_for_adapter(
        args, "LoadAdapter", "ClusterLoadAdapterRequest", replica_id=args.on, to_slot=args.to_slot
    )
    where = f"slot {response.adapter.slot}" if response.adapter.HasField("slot") else "host cache"
    print(f"loaded {args.adapter_id} on {response.replica_id} ({where})")
    return 0


def cmd_evict(args: argparse.Namespace) -> int:
    response = call_for_adapter(
        args, "EvictAdapter", "ClusterEvictAdapterRequest", replica_id=args.on, force=args.force
    )
    if response.evicted_from:
        print(f"evicted {args.adapter_id} from {', '.join(response.evicted_from)}")
    else:
        print(f"{args.adapter_id} was not resident anywhere")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from loraserve.v1 import inference_pb2

    text = sys.stdin.read() if args.text == "-" else args.text
    params = inference_pb2.SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty,
        stop=args.stop or (),
        ignore_eos=args.ignore_eos,
    )
    for name in ("top_p", "top_k", "min_p", "repetition_penalty", "seed"):  # unset: the server's default
        if getattr(args, name) is not None:
            setattr(params, name, getattr(args, name))
    request = inference_pb2.GenerateRequest(adapter_id=args.adapter, params=params)
    if args.chat:
        turns = [("system", args.system)] if args.system is not None else []
        turns.append(("user", text))
        request.messages.messages.extend(inference_pb2.ChatMessage(role=r, content=c) for r, c in turns)
    else:
        request.text = text
    conn, stub = replica(args)
    start, first, tokens, served, reason, usage = time.perf_counter(), None, 0, "", 0, None
    for response in conn.stream(stub.Generate, request, timeout=args.timeout):
        first = first or time.perf_counter()
        served = response.adapter_id or served
        tokens += len(response.token_ids)
        sys.stdout.write(response.text)
        sys.stdout.flush()
        if response.finish_reason:
            reason, usage = response.finish_reason, response.usage
    sys.stdout.write("\n")
    elapsed = time.perf_counter() - start
    ttft = f", first token {first - start:.2f} s" if first else ""
    finish = inference_pb2.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower() if reason else "-"
    prompt = f"{usage.prompt_tokens} prompt + " if usage else ""
    print(
        f"[{served or 'base model'}: {prompt}{tokens} tokens, finish {finish}, {elapsed:.2f} s{ttft}, "
        f"request id {args.request_id}]",
        file=sys.stderr,
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from loraserve.v1 import adapter_pb2

    if args.no_manager:
        replicas = [(args.replica, args.replica, "UP", 0, 0, [], [])]
    else:
        conn, stub = manager(args)
        state = conn.call(stub.GetClusterState, adapter_pb2.GetClusterStateRequest())
        replicas = [
            (
                r.replica_id,
                r.address,
                adapter_pb2.ReplicaStatus.Name(r.status).removeprefix("REPLICA_STATUS_"),
                r.epoch,
                r.last_heartbeat_ms,
                list(r.adapters),
                list(r.loading),
            )
            for r in state.replicas
        ]
    rows, adapter_rows, cache_rows, notes = [], [], [], []
    for replica_id, address, status, epoch, heartbeat_ms, mirrored, loading in replicas:
        info = residents = None
        if status == "UP":
            try:
                info, residents = _replica_view(args, address)
            except CliError as e:
                if args.no_manager:
                    raise
                notes.append(f"{replica_id}: {e} (showing the manager's mirror)")
        occupancy = info.occupancy if info else None
        rows.append(
            [
                replica_id,
                address,
                status,
                epoch or "-",
                f"{occupancy.slots_used}/{occupancy.slots_total}" if occupancy else "-",
                f"{occupancy.host_cache_used}/{occupancy.host_cache_total}" if occupancy else "-",
                occupancy.running if occupancy else "-",
                occupancy.waiting if occupancy else "-",
                _kv_used(occupancy) if occupancy else "-",
                ", ".join(loading) or "-",
                ago(heartbeat_ms),
            ]
        )
        for a in residents if residents is not None else mirrored:
            adapter_rows.append(
                [
                    replica_id,
                    a.adapter_id,
                    "slot" if a.HasField("slot") else "host",
                    a.slot if a.HasField("slot") else "-",
                    "yes" if a.pinned else "no",
                    a.in_flight if residents is not None else "-",
                    ago(a.last_used.ToMilliseconds()),
                ]
            )
        if info:
            c = info.cache_stats
            cache_rows.append(
                [replica_id, c.host_hits, c.host_misses, c.slot_hits, c.slot_misses]
                + [c.host_evictions, c.slot_evictions]
            )
    headers = [
        "REPLICA",
        "ADDRESS",
        "STATUS",
        "EPOCH",
        "SLOTS",
        "HOST CACHE",
        "RUNNING",
        "WAITING",
        "KV USED",
    ]
    print(table(headers + ["LOADING", "HEARTBEAT"], rows) if rows else "no replicas have joined")
    if adapter_rows:
        print()
        print(table(["REPLICA", "ADAPTER", "TIER", "SLOT", "PINNED", "IN FLIGHT", "LAST USED"], adapter_rows))
    if cache_rows:
        print()
        headers = ["REPLICA", "HOST HITS", "HOST MISSES", "SLOT HITS", "SLOT MISSES"]
        print(table(headers + ["HOST EVICTIONS", "SLOT EVICTIONS"], cache_rows))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _replica_view(args: argparse.Namespace, address: str):
    from loraserve.v1 import inference_pb2

    conn, stub = replica(args, address)
    try:
        info = conn.call(stub.GetEngineInfo, inference_pb2.GetEngineInfoRequest())
        residents = conn.call(stub.ListResidentAdapters, inference_pb2.ListResidentAdaptersRequest())
    finally:
        conn.close()
    return info, list(residents.adapters)


def _kv_used(occupancy) -> str:
    total = occupancy.kv_blocks_total
    return f"{100 * (total - occupancy.kv_blocks_free) / total:.0f}%" if total else "-"


def cmd_events(args: argparse.Namespace) -> int:
    from loraserve.v1 import adapter_pb2

    conn, stub = manager(args)
    request = adapter_pb2.WatchEventsRequest(after_id=args.after, adapter_id=args.adapter, replica_id=args.on)
    for n, e in enumerate(conn.stream(stub.WatchEvents, request), start=1):
        at = datetime.datetime.fromtimestamp(e.at_ms / 1000).isoformat(sep=" ", timespec="milliseconds")
        detail = f"  {e.detail}" if e.detail else ""
        print(
            f"{at}  {e.id:<16} {e.type:<15} adapter={e.adapter_id or '-'} replica={e.replica_id or '-'}{detail}",
            flush=True,
        )
        if args.limit and n >= args.limit:
            break
    return 0


# --- parser ----------------------------------------------------------------------------------------


def connection_flags(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The connection flags, accepted before and after the command (`defaults`: on the top level)."""
    env = os.environ

    def default(value):
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--manager",
        default=default(env.get("LORASERVE_ADAPTER_MANAGER", DEFAULT_MANAGER)),
        metavar="HOST:PORT",
        help=f"adapter manager (env LORASERVE_ADAPTER_MANAGER; default {DEFAULT_MANAGER})",
    )
    parser.add_argument(
        "--replica",
        default=default(env.get("LORASERVE_REPLICA", DEFAULT_REPLICA)),
        metavar="HOST:PORT",
        help="the front door (or one inference replica) for generate "
        f"(env LORASERVE_REPLICA; default {DEFAULT_REPLICA}, the door of `make run`)",
    )
    parser.add_argument(
        "--token",
        default=default(env.get("LORASERVE_TOKEN", "")),
        help="bearer token sent with every call when the servers require one (env LORASERVE_TOKEN)",
    )
    parser.add_argument(
        "--tls-ca",
        default=default(env.get("LORASERVE_TLS_CA", "")),
        metavar="PEM",
        help="CA certificate to verify TLS servers with; unset = plaintext (env LORASERVE_TLS_CA)",
    )
    parser.add_argument("--timeout", type=float, default=default(60.0), help="seconds per call (default 60)")
    parser.add_argument(
        "--request-id", default=default(""), help="x-request-id sent with every call (default: generated)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraserve", description="Command-line client of a loraserve cluster."
    )
    connection_flags(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    connection_flags(common, defaults=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    plan = sub.add_parser(
        "plan", add_help=False, help="memory plan for a model (python -m inference_svc plan)"
    )
    plan.set_defaults(func=cmd_plan)

    p = sub.add_parser("register", parents=[common], help="register an adapter directory with the manager")
    p.add_argument("adapter_id")
    p.add_argument("path", help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--upload", action="store_true", help="send the files over gRPC instead of a path")
    p.add_argument("--tenant", default="")
    p.add_argument("--metadata", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("unregister", parents=[common], help="forget an adapter")
    p.add_argument("adapter_id")
    p.add_argument("--force", action="store_true", help="also unpin, evict everywhere and unroute it")
    p.set_defaults(func=cmd_unregister)

    p = sub.add_parser("list", parents=[common], help="registered adapters")
    p.add_argument("--tenant", default="")
    p.add_argument("--state", default="", choices=["", "registered", "loading", "cached", "active", "failed"])
    p.add_argument("--on", default="", metavar="REPLICA_ID", help="only adapters this replica holds")
    p.add_argument("--page-size", type=int, default=500)
    p.set_defaults(func=cmd_list)

    for name, func, text in (
        ("pin", cmd_pin, "keep an adapter resident (cluster-wide)"),
        ("unpin", cmd_unpin, "make a pinned adapter evictable again"),
    ):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("adapter_id")
        p.set_defaults(func=func)

    p = sub.add_parser("load", parents=[common], help="make an adapter resident on a replica")
    p.add_argument("adapter_id")
    p.add_argument("--on", default="", metavar="REPLICA_ID", help="the replica (default: the manager picks)")
    p.add_argument("--to-slot", action="store_true", help="also copy it into an accelerator slot")
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("evict", parents=[common], help="drop an adapter from one replica or all")
    p.add_argument("adapter_id")
    p.add_argument("--on", default="", metavar="REPLICA_ID", help="the replica (default: every holder)")
    p.add_argument("--force", action="store_true", help="evict even if pinned (clears the pin)")
    p.set_defaults(func=cmd_evict)

    p = sub.add_parser("generate", parents=[common], help="generate text, streamed to the terminal")
    p.add_argument("text", help="the prompt ('-' reads stdin)")
    p.add_argument("--adapter", default="", help="adapter id or alias (default: the base model)")
    p.add_argument(
        "--chat",
        action="store_true",
        help="send the text as a user message, through the model's chat template",
    )
    p.add_argument("--system", metavar="TEXT", help="with --chat: a system message before it")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("status", parents=[common], help="replicas, slots, host caches and queues")
    p.add_argument("--no-manager", action="store_true", help="ask only the replica at --replica")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("events", parents=[common], help="tail the manager's event stream")
    p.add_argument(
        "--after", default="", help="stream id to start after ('0' = oldest kept; default: new only)"
    )
    p.add_argument("--adapter", default="", help="only events about this adapter")
    p.add_argument("--on", default="", metavar="REPLICA_ID", help="only events about this replica")
    p.add_argument("--limit", type=int, default=0, help="stop after this many events (0 = follow forever)")
    p.set_defaults(func=cmd_events)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (0 ok, 1 failed, 2 bad arguments, 130 interrupted)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "plan":
        args.rest = extra  # every flag of `python -m inference_svc plan`
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "generate" and args.system is not None and not args.chat:
        parser.error("--system needs --chat")
    args.request_id = args.request_id or new_request_id()
    try:
        return args.func(args)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `loraserve events | head`
        sys.stderr.close()
        return 0
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug in this client: still one line
        print(f"error: internal: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
