"""The compose file validates against the Compose specification, and every healthcheck command
exists in the image it runs in."""

import importlib.util
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def compose_config(*profiles, overrides: tuple[Path, ...] = ()):
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose (Debian's 1.29) is missing: `make setup` installs it")
    args = ["docker-compose", "-f", str(COMPOSE)]
    for extra in overrides:
        args += ["-f", str(extra)]
    for p in profiles:
        args += ["--profile", p]
    proc = subprocess.run([*args, "config"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


@pytest.mark.parametrize("profiles", [(), ("cpu",), ("gpu",), ("cpu", "gpu")])
def test_compose_file_validates(profiles):
    config = compose_config(*profiles)
    services = config["services"]
    assert {"redis", "adapter-svc", "demo-assets", "picker", "door"} <= set(services)
    if "cpu" in profiles:
        assert "inference-cpu" in services
    if "gpu" in profiles:
        devices = services["inference-gpu"]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


@pytest.mark.parametrize("service", ["inference-cpu", "inference-gpu"])
def test_replicas_publish_grpc_http_and_metrics_ports(service):
    replica = compose_config(service.split("-")[1])["services"][service]
    targets = {
        int(p["target"]) if isinstance(p, dict) else int(str(p).rsplit(":", 1)[1].split("/")[0])
        for p in replica["ports"]
    }
    assert targets == {50051, 8000, 9091}
    assert all(str(p).startswith("127.0.0.1:") for p in replica["ports"] if not isinstance(p, dict))
    assert "--http-port 8000" in " ".join(replica["command"])  # the OpenAI-compatible API listens there


def test_redis_keeps_an_append_only_file_on_a_named_volume():
    redis = compose_config()["services"]["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert "redis-data:/data:rw" in redis["volumes"] or "redis-data:/data" in redis["volumes"]


def test_services_wait_for_healthy_dependencies():
    services = compose_config("cpu")["services"]
    assert services["adapter-svc"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["inference-cpu"]["depends_on"]["adapter-svc"]["condition"] == "service_healthy"


def copied_packages() -> set[str]:
    return set(re.findall(r"^COPY (\w+) \./\1$", DOCKERFILE.read_text(), flags=re.M))


def test_every_healthcheck_command_exists_in_its_image():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "RUN pip install '.[server]'" in DOCKERFILE.read_text()  # the image installs the server extra
    deps = project["dependencies"] + project["optional-dependencies"]["server"]
    services = compose_config("cpu", "gpu")["services"]
    checked = 0
    for name, service in services.items():
        test = service.get("healthcheck", {}).get("test")
        if not test:
            continue
        command = test[1:] if test[0] in ("CMD", "CMD-SHELL") else test
        if service["image"].startswith("redis:"):
            assert command[0] == "redis-cli", name  # ships in the official redis image
        else:
            assert service["image"].startswith("loraserve:"), name
            assert command[:2] == ["python", "-m"], name
            module = command[2]
            assert module.split(".")[0] in copied_packages(), f"{name}: {module} is not copied into the image"
            assert importlib.util.find_spec(module) is not None, module
            assert any(d.startswith("grpcio-health-checking") for d in deps)
        checked += 1
    assert checked == 6  # redis, adapter-svc, inference-cpu, inference-gpu, picker, door


def test_healthcheck_module_reports_a_real_server():
    import asyncio

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from loraserve.healthcheck import main

    async def scenario():
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            down = await asyncio.to_thread(main, [f"127.0.0.1:{port}"])
            await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            up = await asyncio.to_thread(main, [f"127.0.0.1:{port}"])
        finally:
            await server.stop(0)
        return down, up

    assert asyncio.run(scenario()) == (1, 0)


def test_the_build_context_leaves_out_the_virtualenv_and_run_state():
    """Without .dockerignore the multi-GB .venv went into every image build's context."""
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv/", ".run/", ".git/"} <= ignored
    assert not {f"{name}/" for name in copied_packages()} & ignored  # nothing the image copies


def test_the_gpu_image_has_the_c_compiler_triton_builds_its_driver_with():
    gpu = compose_config("gpu")["services"]["inference-gpu"]["build"]["args"]
    assert gpu["C_COMPILER"] == "gcc" and gpu["TORCH_INDEX_URL"] == ""
    assert 'apt-get install -y --no-install-recommends "${C_COMPILER}" libc6-dev' in DOCKERFILE.read_text()
    assert "C_COMPILER" not in compose_config("cpu")["services"]["inference-cpu"]["build"]["args"]


def test_the_readme_real_model_override_mounts_the_model_into_every_service(tmp_path):
    """The README's docker-compose.override.yml for a real model merges into a valid file that
    mounts the host directory read-only where LORASERVE_MODEL points both services."""
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"<!-- compose-override: real model -->\n```yaml\n(.*?)```", readme, re.S)
    assert snippet, "README lost its real-model compose override"
    override = tmp_path / "docker-compose.override.yml"
    override.write_text(snippet[1])
    services = compose_config("gpu", overrides=(override,))["services"]
    for name in ("adapter-svc", "inference-gpu"):
        mounts = [v for v in services[name]["volumes"] if str(v).endswith("/models/my-model:ro")]
        assert mounts, f"{name} does not mount the real model"
