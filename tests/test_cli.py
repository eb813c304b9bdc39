"""The `loraserve` command-line client: commands against a real manager (in-process, private
redis-server), and failures reported as one line with a non-zero exit code, never a traceback.
(The full set of commands against a running stack is in test_run_command.py.)"""

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from entrypoints.cli import main
from loraserve.errors import unknown_adapter_message
from loraserve.v1 import adapter_pb2 as pb
from loraserve.v1 import adapter_pb2_grpc

from harness import (
    LoopThread,
    ManagerHandle,
    RedisProcess,
    free_port,
    manager_config,
    write_adapters,
    write_model,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    """(manager address, model dir, adapter root) of an in-process manager with no replica."""
    root = tmp_path_factory.mktemp("cli")
    model_dir, adapter_root = write_model(root), root / "adapters"
    write_adapters(model_dir, adapter_root, 2)
    redis_proc = RedisProcess(root / "redis").start()
    loop = LoopThread()
    try:
        manager = ManagerHandle(loop, manager_config(redis_proc.url, root, adapter_root, model_dir))
        yield manager.address, model_dir, adapter_root
        manager.close()
    finally:
        loop.close()
        redis_proc.stop()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_register_list_upload_and_events(manager, capsys):
    address, _, adapter_root = manager
    code, out, _ = run(capsys, "--manager", address, "register", "ad-0", str(adapter_root / "ad-0"))
    assert code == 0 and out.startswith("registered ad-0: rank 4, 2 modules")
    code, out, _ = run(
        capsys, "register", "ad-1", str(adapter_root / "ad-1"), "--upload", "--manager", address
    )
    assert code == 0 and out.startswith("registered ad-1:")
    code, out, _ = run(capsys, "--manager", address, "list")
    assert code == 0
    rows = [line.split() for line in out.splitlines()]
    assert rows[0][:2] == ["ADAPTER", "STATE"]
    assert [r[:2] for r in rows[1:3]] == [["ad-0", "REGISTERED"], ["ad-1", "REGISTERED"]]
    assert rows[-1] == ["2", "adapters"]
    code, out, _ = run(capsys, "--manager", address, "events", "--after", "0", "--limit", "2")
    assert code == 0
    assert [line.split()[3] for line in out.splitlines()] == ["registered", "registered"]
    code, out, _ = run(capsys, "--manager", address, "unregister", "ad-1")
    assert code == 0 and out.strip() == "unregistered ad-1"


def test_unknown_adapter_is_one_line(manager, capsys):
    address = manager[0]
    code, _, err = run(capsys, "--manager", address, "pin", "nope")
    assert code == 1
    assert one_error_line(err) == f"error: NOT_FOUND: {unknown_adapter_message('nope')}"


def test_a_refusal_names_the_flag_that_overrides_it(manager, capsys):
    address, _, adapter_root = manager
    run(capsys, "--manager", address, "register", "routed", str(adapter_root / "ad-0"))
    alias = pb.Alias(name="latest", variants=[pb.AliasVariant(adapter_id="routed", weight=1)])
    with grpc.insecure_channel(address) as channel:
        adapter_pb2_grpc.AdapterServiceStub(channel).SetAlias(pb.SetAliasRequest(alias=alias), timeout=10)
    code, _, err = run(capsys, "--manager", address, "unregister", "routed")
    assert code == 1
    assert one_error_line(err) == (
        "error: FAILED_PRECONDITION: adapter 'routed' is routed to by alias latest; change them or use --force"
    )
    assert run(capsys, "--manager", address, "unregister", "routed", "--force")[0] == 0


def test_bad_adapter_is_one_line(manager, capsys, tmp_path):
    address, _, adapter_root = manager
    code, _, err = run(capsys, "--manager", address, "register", "x", str(tmp_path))
    assert code == 1
    assert one_error_line(err).startswith("error: INVALID_ARGUMENT: ")
    code, _, err = run(capsys, "--manager", address, "register", "x", str(tmp_path), "--upload")
    assert code == 2
    assert one_error_line(err) == f"error: {tmp_path}: adapter_config.json is missing"


def test_unreachable_servers_are_one_line(capsys):
    port = free_port()
    code, _, err = run(capsys, "--manager", f"127.0.0.1:{port}", "list")
    assert code == 1
    assert one_error_line(err).startswith(
        f"error: UNAVAILABLE: cannot reach the adapter manager at 127.0.0.1:{port}"
    )
    code, _, err = run(capsys, "generate", "hi", "--replica", f"127.0.0.1:{port}", "--timeout", "5")
    assert code == 1
    assert one_error_line(err).startswith(
        f"error: UNAVAILABLE: cannot reach the inference replica at 127.0.0.1:{port}"
    )


def test_plan_delegates_to_the_offline_planner(manager, capsys):
    model_dir = manager[1]
    code, out, _ = run(capsys, "plan", "--model", str(model_dir), "--max-loras", "2", "--max-lora-rank", "8")
    assert code == 0
    assert "max_loras=2 max_lora_rank=8" in out
    code, _, err = run(capsys, "plan", "--model", str(model_dir), "--max-loras", "4", "--max-cpu-loras", "2")
    assert code == 2
    assert one_error_line(err) == "error: max_cpu_loras (2) must be >= max_loras (4)"


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["--manager", "127.0.0.1:{port}", "status"], 1),
        (["list", "--bogus"], 2),
        (["plan", "--model", "/nonexistent"], 2),
    ],
)
def test_the_installed_command_never_prints_a_traceback(argv, code):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [str(Path(sys.executable).with_name("loraserve")), *(a.format(port=port) for a in argv)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO,
    )
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(("error: ", "loraserve: error: ")), done.stderr
