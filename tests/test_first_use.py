"""What a first-time user hit (issue 17, items 14-15): one-line errors instead of tracebacks, and a
client that installs and runs without the server's packages."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from inference_svc.tokenizer import ByteTokenizer, load_tokenizer
from kernels import check_backend_ready

from harness import ReplicaHandle

ROOT = Path(__file__).resolve().parents[1]
# What only the services need: the client must neither install nor import any of it.
SERVER_ONLY = {
    "torch",
    "triton",
    "safetensors",
    "numpy",
    "redis",
    "tokenizers",
    "jinja2",
    "prometheus_client",
    "grpc_tools",
    "grpc_health",
    "grpc_reflection",
}
# Runs the CLI in a child whose imports of SERVER_ONLY fail, as on a client-only install.
CLIENT_ONLY = f"""
import sys
class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {sorted(SERVER_ONLY)!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, NotInstalled())
from entrypoints.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_the_client_install_has_no_server_packages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = {
        dep.split("=")[0].split(">")[0].split("<")[0].split(";")[0].strip() for dep in project["dependencies"]
    }
    assert not {name.replace("_", "-") for name in SERVER_ONLY} & {name.replace("_", "-") for name in client}
    assert any(dep.startswith("torch==") for dep in project["optional-dependencies"]["server"])


def test_the_cli_generates_without_the_server_packages(loop, model_dir):
    replica = ReplicaHandle(loop, model_dir)
    try:
        proc = run("-c", CLIENT_ONLY, "--replica", replica.address, "generate", "hello", "--max-tokens", "3")
        assert proc.returncode == 0, proc.stderr
        assert "request id" in proc.stderr or proc.stdout  # it streamed an answer
        listed = run("-c", CLIENT_ONLY, "--replica", replica.address, "--manager", "127.0.0.1:1", "list")
        assert one_line_error(listed).startswith("error: UNAVAILABLE: cannot reach the adapter manager")
    finally:
        replica.close()
    plan = run("-c", CLIENT_ONLY, "plan", "--model", str(model_dir))
    assert "pip install 'loraserve[server]'" in one_line_error(plan)


@pytest.mark.parametrize("service", ["inference_svc", "adapter_svc"])
def test_a_port_in_use_is_one_line_saying_what_to_do(service, model_dir, adapter_root, tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = str(held.getsockname()[1])
        if service == "inference_svc":
            args = ["-m", "inference_svc", "serve", "--model", str(model_dir), "--port", port]
        else:
            redis = f"redis://127.0.0.1:{port}"  # never reached: the bind fails first
            args = ["-m", "adapter_svc", "serve", "--host", "127.0.0.1", "--port", port, "--redis-url", redis]
            args += ["--adapter-root", str(adapter_root), "--store-dir", str(tmp_path / "store")]
        error = one_line_error(run(*args))
    assert error == (
        f"error: cannot listen on 127.0.0.1:{port}: the port is in use or the address is not this "
        "machine's; stop what holds it or choose another with --port (0 = any free port)"
    )


def test_a_cuda_device_this_machine_lacks_is_refused_before_anything_listens(model_dir):
    proc = run(
        "-m", "inference_svc", "serve", "--model", str(model_dir), "--port", "0", "--device", "cuda:99"
    )
    error = one_line_error(proc)
    assert error.startswith("error: device ('cuda:99') ")
    assert "use --device" in error
    assert "listening on" not in proc.stderr


def test_triton_on_cuda_without_a_c_compiler_is_refused_at_start_up(monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", "")
    cuda = torch.device("cuda")  # only named: nothing runs on it
    with pytest.raises(ValueError, match="needs a C compiler"):
        check_backend_ready("auto", cuda)
    check_backend_ready("torch", cuda)  # the torch backends need no compiler
    check_backend_ready("auto", torch.device("cpu"))
    monkeypatch.setenv("CC", "/usr/bin/gcc")
    check_backend_ready("triton", cuda)


def test_a_model_without_tokenizer_json_warns_that_it_tokenizes_bytes(model_dir, tmp_path, caplog):
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    (bare / "tokenizer.json").unlink()
    with caplog.at_level(logging.WARNING, logger="inference_svc.tokenizer"):
        tokenizer = load_tokenizer(bare)
    assert isinstance(tokenizer, ByteTokenizer)
    assert any("no tokenizer.json" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="inference_svc.tokenizer"):
        load_tokenizer(model_dir)
    assert not caplog.records


def test_generate_help_states_its_defaults():
    proc = run("-m", "entrypoints", "generate", "--help")
    assert "(default: 64)" in proc.stdout and "(default: 0)" in proc.stdout


def test_engine_flags_are_checked_before_anything_starts(tmp_path):
    """`make run --max-loras 0` (or a flag nobody knows) says so in one line before Redis or the
    manager start, and does not claim to have stopped what never started."""
    run_dir = tmp_path / "run"
    for flags, reason in (
        (["--max-loras", "0"], "error: max_loras (0) must be >= 1"),
        (["--max-lorass", "3"], "error: unknown flags --max-lorass 3"),
        (["--device", "cuda:9"], "error: device ('cuda:9') "),
    ):
        proc = run("-m", "entrypoints.run", "--run-dir", str(run_dir), *flags)
        assert proc.returncode == 2 and one_line_error(proc).startswith(reason), proc.stderr
        assert "stopped:" not in proc.stdout
        assert not run_dir.exists()  # nothing started, nothing written


def test_each_run_writes_fresh_logs(tmp_path):
    """A child's log holds this run's lines only (a failure's tail is never the previous run's)."""
    from entrypoints.run import Stack

    stack = Stack(tmp_path)
    (stack.logs / "child.log").write_text("a line from the previous run\n")
    child = stack.spawn("child", [sys.executable, "-c", "print('this run')"])
    child.proc.wait(60)
    assert (stack.logs / "child.log").read_text() == "this run\n"


def test_a_held_run_dir_is_refused_with_the_holders_pid(tmp_path):
    from entrypoints.run import RunDirBusy, lock_run_dir

    held = lock_run_dir(tmp_path)
    try:
        with pytest.raises(RunDirBusy, match=f"pid {os.getpid()}"):
            lock_run_dir(tmp_path)
        proc = run("-m", "entrypoints.run", "--run-dir", str(tmp_path), "--no-serve")
        assert proc.returncode == 1 and "is using" in one_line_error(proc)
    finally:
        os.close(held)
    os.close(lock_run_dir(tmp_path))  # free again once its holder is gone
