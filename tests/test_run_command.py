"""The README's run command (`python -m entrypoints.run`, what `make run` runs), as a user meets it:
started as a subprocess on a tiny model and private ports, waited for, driven with the grpcurl
lines, curl lines, openai snippet and CLI commands it prints, then stopped with Ctrl-C (SIGINT), after which no process
and no port may be left behind. The tests run in file order; the last one sends the SIGINT."""

import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from inference_svc.demo_model import TINY_SHAPE, write_demo_model
from loraserve.errors import unknown_adapter_message

from harness import free_port, scrape, total, wait_for

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
START_TIMEOUT_S = 240
READY_LINE = "Serving until Ctrl-C."
ADAPTERS = [f"demo-{i}" for i in range(4)]
MAX_CPU_LORAS = 3  # the demo mixes this many adapters at once


@dataclass
class RunCommand:
    proc: subprocess.Popen
    run_dir: Path
    lines: list[str] = field(default_factory=list)
    arrived: queue.Queue = field(default_factory=queue.Queue)

    def read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self.arrived.put(line)

    def wait_for_line(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if self.proc.poll() is not None and self.arrived.empty():
                raise AssertionError(f"the run command exited with {self.proc.returncode}:\n{self.output}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} after {timeout} s:\n{self.output}")
            try:
                self.arrived.get(timeout=0.2)
            except queue.Empty:
                pass

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def field(self, name: str) -> list[str]:
        """The words after `name` on its line of the endpoint summary."""
        (line,) = [line for line in self.lines if line.split()[:1] == [name]]
        return line.split()[1:]

    @property
    def env(self) -> dict:
        (line,) = [line.strip() for line in self.lines if line.strip().startswith("export ")]
        exported = dict(item.split("=", 1) for item in line.split()[1:])
        return {**os.environ, "PYTHONPATH": str(REPO), **exported}

    def pids(self) -> tuple[list[int], int]:
        words = " ".join(self.field("processes"))
        return [int(p) for p in re.findall(r"\w+ (\d+)", words.split("(")[0])], int(
            re.search(r"process group (\d+)", words)[1]
        )

    def ports(self) -> list[int]:
        return [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", "\n".join(self.field_lines()))]

    def field_lines(self) -> list[str]:
        names = ("door", "openai", "inference", "manager", "redis", "metrics", "picker", "envoy")
        return [line for line in self.lines if line.split()[:1] and line.split()[0] in names]

    def cli(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "entrypoints", *argv],
            capture_output=True,
            text=True,
            timeout=120,
            env=self.env,
            cwd=REPO,
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_command")
    model_dir = write_demo_model(root / "model", **TINY_SHAPE)
    argv = [
        sys.executable,
        "-m",
        "entrypoints.run",
        "--model",
        str(model_dir),
        "--run-dir",
        str(root / "run"),
    ]
    argv += ["--port-base", str(free_port())]
    argv += [
        "--max-loras",
        "2",
        "--max-cpu-loras",
        str(MAX_CPU_LORAS),
        "--max-lora-rank",
        "8",
        "--kv-cache-bytes",
        str(2 << 20),
    ]
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    run = RunCommand(proc, root / "run")
    threading.Thread(target=run.read, daemon=True).start()
    try:
        run.wait_for_line(READY_LINE, START_TIMEOUT_S)
        yield run
    finally:
        if proc.poll() is None:  # a test failed before the Ctrl-C test: still clean up
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        pgid = next((int(m[1]) for line in run.lines if (m := re.search(r"process group (\d+)", line))), None)
        if pgid is not None:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_the_demo_mixed_every_adapter_and_the_base_model(stack):
    served = [line.split() for line in stack.lines if line.strip().startswith("asked ")]
    mixed = ["base", *ADAPTERS[:MAX_CPU_LORAS]]
    assert len(served) == 2 * len(mixed), stack.output
    assert {(words[1], words[4]) for words in served} == {(a, a) for a in mixed}, stack.output
    assert any(line.startswith("demo done in ") for line in stack.lines)


def test_the_demo_and_the_printed_lines_use_the_front_door(stack):
    door = stack.field("door")[0]
    generate = next(line for line in stack.lines if "InferenceService/Generate" in line)
    assert door in generate and f"LORASERVE_REPLICA={door}" in " ".join(stack.field_lines() + stack.lines)
    picks = scrape(stack.field("picker")[-1])
    assert total(picks, "loraserve:picker_picks_total") >= 2 * (MAX_CPU_LORAS + 1)


def test_the_printed_grpcurl_lines_work(stack):
    lines = [line.strip() for line in stack.lines if "grpcurl -plaintext" in line]
    assert len(lines) >= 4
    outputs = {}
    for line in lines:
        done = subprocess.run(shlex.split(line), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{line}\n{done.stderr}"
        outputs[line.rsplit("/", 1)[-1]] = done.stdout
    generated = [json.loads(m) for m in re.findall(r"^\{.*?^\}", outputs["Generate"], re.S | re.M)]
    assert {m["adapterId"] if "adapterId" in m else m["adapter_id"] for m in generated} == {"demo-1"}
    listed = json.loads(outputs["ListAdapters"])
    assert {a.get("adapter_id", a.get("adapterId")) for a in listed["adapters"]} >= set(ADAPTERS)
    assert '"local-0"' in outputs["GetClusterState"] and "REPLICA_STATUS_UP" in outputs["GetClusterState"]


def test_the_printed_curl_lines_and_openai_snippet_work(stack, capsys):
    lines = [line.strip() for line in stack.lines if line.strip().startswith("curl ")]
    assert len(lines) == 3
    models, completion, chat = (
        subprocess.run(shlex.split(line), capture_output=True, text=True, timeout=60) for line in lines
    )
    listed = [m["id"] for m in json.loads(models.stdout)["data"]]
    assert listed[0] == "model" and set(ADAPTERS) <= set(listed[1:])  # base model: its directory's name
    answer = json.loads(completion.stdout)
    assert answer["model"] == "demo-1" and answer["usage"]["completion_tokens"] == 8
    events = [line.removeprefix("data: ") for line in chat.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    start = stack.lines.index("From Python, with the openai client (pip install openai):") + 1
    snippet = "\n".join(line[2:] for line in stack.lines[start : stack.lines.index("", start)])
    exec(compile(snippet, "entrypoints.run", "exec"), {})  # a completion, then a streamed chat reply
    assert capsys.readouterr().out.strip()


def test_a_second_stack_on_the_same_run_dir_refuses_in_one_line(stack):
    """Two `make run`s at once never share Redis data, the store or the logs: the second refuses
    before starting anything (and names the first's pid), the first keeps serving."""
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "entrypoints.run",
            "--run-dir",
            str(stack.run_dir),
            "--port-base",
            str(free_port()),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 1 and "Traceback" not in second.stderr
    (line,) = second.stderr.strip().splitlines()
    assert line.startswith(f"error: another loraserve stack (pid {stack.proc.pid}) is using {stack.run_dir}")
    assert "--run-dir" in line and "stopped:" not in second.stdout
    assert stack.proc.poll() is None


def test_the_cli_drives_the_stack(stack):
    adapter_root = next((stack.run_dir / "demo" / "adapters").iterdir())
    done = stack.cli("register", "extra-0", str(adapter_root / "demo-0"))
    assert done.returncode == 0 and done.stdout.startswith("registered extra-0:"), done.stderr
    done = stack.cli(
        "generate", "--adapter", "extra-0", "--request-id", "run-test-1", "--max-tokens", "5", "Hi"
    )
    assert done.returncode == 0, done.stderr
    assert re.match(
        r"\[extra-0: 2 prompt \+ 5 tokens, finish length, .* request id run-test-1\]", done.stderr
    )
    done = stack.cli("load", "demo-1", "--to-slot")
    assert done.returncode == 0 and re.match(r"loaded demo-1 on local-0 \(slot \d\)", done.stdout), (
        done.stderr
    )
    for argv, expected in (
        (["pin", "demo-2"], "pinned demo-2 on local-0"),
        (["unpin", "demo-2"], "unpinned demo-2"),
        (["evict", "extra-0"], "evicted extra-0 from local-0"),
    ):
        done = stack.cli(*argv)
        assert (done.returncode, done.stdout.strip()) == (0, expected), done.stderr
    done = stack.cli("status")
    assert done.returncode == 0, done.stderr
    replica_row = done.stdout.splitlines()[1].split()
    assert replica_row[:3] == ["local-0", stack.field("inference")[0], "UP"]
    assert "demo-1" in done.stdout and "HOST HITS" in done.stdout
    done = stack.cli("events", "--after", "0", "--adapter", "extra-0", "--limit", "2")
    assert done.returncode == 0, done.stderr
    assert [line.split()[3] for line in done.stdout.splitlines()] == ["registered", "loading"]
    done = stack.cli("pin", "no-such-adapter")
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: NOT_FOUND: {unknown_adapter_message('no-such-adapter')}"


def test_a_request_id_is_logged_by_both_services(stack):
    def records(service: str) -> list[dict]:
        lines = (stack.run_dir / "logs" / f"{service}.log").read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    ours = [r for r in records("inference") if r.get("request_id") == "run-test-1"]
    assert [(r["method"], r["code"]) for r in ours if "method" in r] == [("Generate", "OK")]
    methods = {r.get("method") for r in records("manager") if r.get("request_id") == "run-test-1"}
    assert {"AcquireAdapter", "FetchAdapterWeights"} <= methods


def test_the_readme_python_client_works_against_the_stack(stack, capsys):
    text = README.read_text()
    section = text[text.index("## Control plane over gRPC") :]
    (code,) = re.findall(r"```python\n(.*?)```", section[: section.index("\n## ", 1)], re.S)
    code = code.replace("localhost:50052", stack.field("manager")[0])
    code = code.replace("localhost:50051", stack.field("inference")[0])
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("registered: ['demo-0'")
    assert out[1].startswith("served: ")


def test_the_metrics_endpoints_count_what_ran(stack):
    replica_url, manager_url = stack.field("metrics")[0], stack.field("metrics")[2]
    replica = scrape(replica_url)
    assert total(replica, "loraserve:requests_total", finish_reason="length") >= 2 * (MAX_CPU_LORAS + 1) + 2
    assert total(replica, "loraserve:generation_tokens_total", adapter="extra-0") == 5

    def refreshed():
        samples = scrape(manager_url)
        return (
            samples if total(samples, "loraserve:manager_registered_adapters") == len(ADAPTERS) + 1 else None
        )

    manager = wait_for(refreshed, "the manager's gauges")
    assert total(manager, "loraserve:manager_replicas", status="up") == 1


def test_ctrl_c_leaves_no_process_and_no_port_behind(stack):
    pids, pgid = stack.pids()
    ports = stack.ports()
    # redis, manager, one replica, the picker and Envoy; their ports, metrics, Envoy's admin and both HTTP APIs
    assert len(pids) == 5 and len(set(ports)) == 11
    assert all(_listening(port) for port in ports)
    stack.proc.send_signal(signal.SIGINT)
    assert stack.proc.wait(60) == 0, stack.output
    stack.wait_for_line("stopped: ", 5)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    in_group = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(p) == pgid]
    assert in_group == []
    assert [port for port in ports if _listening(port)] == []


def _pgid(proc_dir: Path) -> int | None:
    try:
        stat = (proc_dir / "stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[2])


def _listening(port: int) -> bool:
    """Whether any socket listens on `port` (TIME_WAIT leftovers of closed connections do not count)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                return True
    return False
