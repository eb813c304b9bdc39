"""SIGTERM on `python -m inference_svc serve`: NOT_SERVING, in-flight stream ends cleanly, exit 0."""

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraserve.v1 import inference_pb2, inference_pb2_grpc

from harness import TIMEOUT_S, long_request, request, wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
GRACE_S = 3.0


class ServeProcess:
    """`python -m inference_svc serve --port 0 ...` with its log lines read on a thread."""

    def __init__(self, *args: str):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "inference_svc", "serve", "--port", "0", *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            self.lines.put(line)

    def wait_for_line(self, pattern: str) -> re.Match:
        while True:
            try:
                line = self.lines.get(timeout=TIMEOUT_S)
            except queue.Empty:
                raise AssertionError(f"no log line matching {pattern!r}:\n{''.join(self.log)}") from None
            match = re.search(pattern, line)
            if match:
                return match

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT_S)


@pytest.fixture
def serve_process(grpc_model):
    model_dir, adapters = grpc_model
    process = ServeProcess(
        "--model",
        str(model_dir),
        "--lora-modules",
        f"demo-0={adapters['demo-0']}",
        "--grace-s",
        str(GRACE_S),
        "--device",
        "cpu",
        "--max-loras",
        "2",
        "--kv-cache-bytes",
        str(2 << 20),
    )
    yield process
    process.kill()


def test_sigterm_drains_then_exits_zero(serve_process):
    port = int(serve_process.wait_for_line(r"serving loraserve\.v1\.InferenceService on [\d.]+:(\d+)")[1])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        def status():
            return health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S).status

        assert status() == health_pb2.HealthCheckResponse.SERVING
        in_flight = stub.Generate(long_request("demo-0"), timeout=TIMEOUT_S)
        first = next(in_flight)
        assert first.adapter_id == "demo-0"

        serve_process.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, "NOT_SERVING")
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(request("Hello"), timeout=TIMEOUT_S))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE

        # the in-flight stream either finishes or is aborted with UNAVAILABLE when the grace ends
        try:
            rest = list(in_flight)
            assert rest[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error

    assert serve_process.proc.wait(TIMEOUT_S) == 0, "".join(serve_process.log)
    serve_process.wait_for_line(r"\"logger\": \"inference_svc\.server\", \"msg\": \"stopped\"")
