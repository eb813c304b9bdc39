"""`python -m inference_svc {plan,demo,serve}`: flags and environment variables -> config, once.

Every EngineConfig field is a flag (`--max-loras`) and an environment variable
(`LORASERVE_MAX_LORAS`); a flag wins over the variable, the variable over the default.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from inference_svc.config import EngineConfig
from loraserve.env_config import add_config_flags, config_from
from loraserve.errors import LoraServeError
from loraserve.security import add_security_flags

ENV_PREFIX = "LORASERVE_"


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field, with its env var and default in the help."""
    add_config_flags(parser, EngineConfig, ENV_PREFIX, "engine configuration")


def engine_config_from(args: argparse.Namespace, environ=os.environ) -> EngineConfig:
    """Build the config: flag > environment variable > EngineConfig default."""
    return config_from(EngineConfig, args, ENV_PREFIX, environ)


def cmd_plan(args: argparse.Namespace) -> int:
    from inference_svc.memory_plan import compute_plan
    from loraserve.model_summary import ModelConfig
    from loraserve.peft_format import read_adapter_config

    config = engine_config_from(args)
    model = ModelConfig.from_dir(args.model)
    ranks = []
    for path in args.adapter or []:
        cfg = read_adapter_config(Path(path))
        ranks.append(max([cfg.get("r", 0), *(cfg.get("rank_pattern") or {}).values()]))
    plan = compute_plan(model, config, ranks)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(
            f"model: {args.model} ({model.architecture}, {model.num_layers} layers, "
            f"hidden {model.hidden_size})"
        )
        print(
            f"max_loras={config.max_loras} max_lora_rank={config.max_lora_rank} "
            f"max_cpu_loras={config.max_cpu_loras} lora_dtype={config.lora_dtype}"
        )
        print(plan.render())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Offline demo: a generated model (unless --model), demo adapters, one mixed batch."""
    from inference_svc.demo_model import write_demo_adapter, write_demo_model
    from inference_svc.engine import LLMEngine
    from inference_svc.sampling import SamplingParams
    from loraserve.model_summary import ModelConfig

    work = Path(args.workdir or tempfile.mkdtemp(prefix="loraserve-demo-"))
    model_dir = Path(args.model) if args.model else write_demo_model(work / "model")
    model = ModelConfig.from_dir(model_dir)
    config = engine_config_from(args)
    engine = LLMEngine(model_dir, config)
    print(f"model: {model_dir} ({model.architecture}, {model.num_parameters():,} parameters)")
    print(engine.plan.render())
    names = [f"demo-{i}" for i in range(args.num_adapters)]
    for i, name in enumerate(names):
        rank = min(config.max_lora_rank, 8 * (1 + i % 2))
        engine.register_adapter(name, write_demo_adapter(work / "adapters" / name, model, rank=rank, seed=i))
    prompts = ["The quick brown fox", "Multi-LoRA serving", "Hello", "Adapters everywhere"]
    rows = [(prompts[i % len(prompts)], ([None, *names])[i % (len(names) + 1)]) for i in range(8)]
    start = time.perf_counter()
    done = engine.generate(
        [p for p, _ in rows], SamplingParams(max_tokens=args.max_tokens, temperature=0), [a for _, a in rows]
    )
    elapsed = time.perf_counter() - start
    for (prompt, adapter), c in zip(rows, done):
        print(f"[{adapter or 'base':>7}] {prompt!r} -> {c.token_ids}")
    tokens = sum(len(c.token_ids) for c in done)
    distinct = max(len(r.slots) for r in engine.step_history)
    print(f"{len(done)} requests, {tokens} tokens in {elapsed:.2f}s; up to {distinct} adapters per step")
    return 0


def parse_lora_modules(specs: list[str]) -> tuple[tuple[str, str], ...]:
    """`name=path` pairs (vLLM's --lora-modules syntax); ValueError naming a malformed one."""
    pairs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules entry ({spec!r}) must be NAME=PATH")
        pairs.append((name, path))
    return tuple(pairs)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the gRPC inference server until SIGTERM/SIGINT."""
    import asyncio

    from inference_svc.server import ServerConfig, serve
    from loraserve.security import security_config_from
    from loraserve.telemetry import setup_logging

    setup_logging("inference", args.log_level)
    config = ServerConfig(
        model=args.model,
        engine=engine_config_from(args),
        host=args.host,
        port=args.port,
        lora_modules=parse_lora_modules(args.lora_modules),
        adapter_roots=tuple(args.adapter_root),
        grace_s=args.grace_s,
        adapter_manager=args.adapter_manager,
        replica_id=args.replica_id,
        advertise_address=args.advertise_address,
        adapter_cache_dir=args.adapter_cache_dir,
        metrics_port=args.metrics_port,
        max_concurrent_per_tenant=args.max_concurrent_per_tenant,
        http_port=args.http_port,
        served_model_name=args.served_model_name,
    )
    config.engine.check_runtime()  # a device or compiler this machine lacks: refused before anything starts
    asyncio.run(serve(config, security_config_from(args)))
    return 0


def _add_env_flag(parser: argparse.ArgumentParser, flag: str, default, parse=str, **kwargs) -> None:
    """`flag`, defaulting to env LORASERVE_<FLAG> (read by `parse`) when that is set, else to `default`."""
    value = os.environ.get(ENV_PREFIX + flag.removeprefix("--").replace("-", "_").upper())
    parser.add_argument(flag, type=parse, default=default if value is None else parse(value), **kwargs)


def add_serve_parser(sub) -> None:
    serve = sub.add_parser(
        "serve", help="run the gRPC inference server (InferenceService, health, reflection)"
    )
    serve.add_argument("--model", required=True, help="model directory (config.json, weights, tokenizer)")
    _add_env_flag(serve, "--host", "127.0.0.1", help="listen address (env LORASERVE_HOST)")
    _add_env_flag(
        serve,
        "--port",
        50051,
        int,
        help="listen port, 0 = any free port (env LORASERVE_PORT; default 50051)",
    )
    serve.add_argument(
        "--lora-modules",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help="adapters registered and loaded into the host cache at start-up",
    )
    serve.add_argument(
        "--adapter-root",
        action="append",
        default=[],
        metavar="DIR",
        help="directory LoadAdapter(path=...) may load adapters from (repeatable; none = disabled)",
    )
    serve.add_argument(
        "--grace-s",
        type=float,
        default=10.0,
        help="seconds from SIGTERM to exit; in-flight streams may finish",
    )
    _add_env_flag(
        serve,
        "--adapter-manager",
        None,
        metavar="HOST:PORT",
        help="join this adapter manager and fetch adapters from it (env LORASERVE_ADAPTER_MANAGER)",
    )
    _add_env_flag(
        serve,
        "--replica-id",
        "",
        help="this replica's id with the manager, stable across restarts (default: advertise address)",
    )
    _add_env_flag(
        serve,
        "--advertise-address",
        "",
        metavar="HOST:PORT",
        help="where the manager reaches this replica (default: --host:bound port)",
    )
    _add_env_flag(
        serve,
        "--adapter-cache-dir",
        None,
        help="where adapters fetched from the manager are written (default: a temp dir)",
    )
    _add_env_flag(
        serve,
        "--metrics-port",
        0,
        int,
        help="serve Prometheus metrics at http://HOST:PORT/metrics; 0 = off (env LORASERVE_METRICS_PORT)",
    )
    http_port = os.environ.get(ENV_PREFIX + "HTTP_PORT")
    serve.add_argument(
        "--http-port",
        type=int,
        default=int(http_port) if http_port else None,  # set but empty: off, like unset
        help="serve the OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions) "
        "on this port, same host, TLS and tokens as gRPC; unset = off, 0 = any free port "
        "(env LORASERVE_HTTP_PORT)",
    )
    _add_env_flag(
        serve,
        "--served-model-name",
        "",
        metavar="NAME",
        help="the base model's `model` name in the HTTP API (default: the model directory's name; "
        "env LORASERVE_SERVED_MODEL_NAME)",
    )
    serve.add_argument(
        "--log-level", default="info", help="debug, info, warning, error (JSON lines on stderr)"
    )
    _add_env_flag(
        serve,
        "--max-concurrent-per-tenant",
        0,
        int,
        help="Generate streams and HTTP completions one tenant may have in flight; 0 = no limit "
        "(env LORASERVE_MAX_CONCURRENT_PER_TENANT)",
    )
    add_security_flags(serve)
    add_engine_flags(serve)


def build_parser() -> argparse.ArgumentParser:
    """`python -m inference_svc`'s flags (also what tests check deployment manifests against)."""
    parser = argparse.ArgumentParser(prog="python -m inference_svc")
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="print the memory plan for a model directory (reads config.json only)")
    plan.add_argument("--model", required=True, help="model directory (config.json)")
    plan.add_argument("--adapter", action="append", help="adapter directory whose rank to plan for")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    add_engine_flags(plan)
    demo = sub.add_parser("demo", help="offline mixed-adapter generation on a demo model")
    demo.add_argument("--model", help="model directory (default: generate a demo model)")
    demo.add_argument("--workdir", help="where demo files go (default: a temp dir)")
    demo.add_argument("--num-adapters", type=int, default=4)
    demo.add_argument("--max-tokens", type=int, default=12)
    add_engine_flags(demo)
    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"plan": cmd_plan, "demo": cmd_demo, "serve": cmd_serve}[args.command](args)
    except (ValueError, LoraServeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
