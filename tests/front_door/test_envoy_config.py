"""The generated Envoy configurations pass `envoy --mode validate`, and say what the door promises."""

from __future__ import annotations

import subprocess

import pytest

from loraserve.front_door import FrontDoorConfig, envoy_binary, envoy_config, main, render
from loraserve.names import DESTINATION_HEADER

REPLICAS = ("127.0.0.1:50061", "127.0.0.1:50062", "127.0.0.1:50063")
HTTP = ("127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003")

CASES = {
    "picker": FrontDoorConfig(replicas=REPLICAS),
    "picker+http": FrontDoorConfig(replicas=REPLICAS, http_port=8000, replica_http=HTTP),
    "dns names": FrontDoorConfig(
        replicas=("inference-0:50051", "inference-1:50051"),
        replica_http=("inference-0:8000", "inference-1:8000"),
        http_port=8000,
        picker="picker:9002",
    ),
    "maglev": FrontDoorConfig(replicas=REPLICAS, mode="maglev"),
    "round_robin": FrontDoorConfig(replicas=REPLICAS, mode="round_robin"),
}


def envoy_validates(path) -> None:
    """`envoy --mode validate` accepts the configuration at `path`."""
    done = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "OK" in done.stdout + done.stderr


@pytest.mark.parametrize("name", sorted(CASES))
def test_envoy_accepts_the_generated_config(name, tmp_path):
    path = tmp_path / "envoy.yaml"
    path.write_text(render(CASES[name]))
    envoy_validates(path)


def _filters(listener: dict) -> list[str]:
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return [f["name"] for f in manager["http_filters"]]


def test_the_destination_header_is_stripped_before_the_picker_sets_it():
    config = envoy_config(CASES["picker+http"])
    for listener in config["static_resources"]["listeners"]:
        names = _filters(listener)
        assert names == [
            "envoy.filters.http.header_mutation",
            "envoy.filters.http.ext_proc",
            "envoy.filters.http.router",
        ]
        strip = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]
        assert strip["typed_config"]["mutations"]["request_mutations"] == [{"remove": DESTINATION_HEADER}]
        ext_proc = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][1][
            "typed_config"
        ]
        assert ext_proc["failure_mode_allow"] is True
        assert ext_proc["processing_mode"]["request_body_mode"] == "BUFFERED"


def test_only_requests_that_name_an_adapter_in_their_body_ask_the_picker():
    config = envoy_config(CASES["picker+http"])
    for listener in config["static_resources"]["listeners"]:
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        routes = manager["route_config"]["virtual_hosts"][0]["routes"]
        picked = [r["match"]["path"] for r in routes[:-1]]
        assert picked in (
            ["/loraserve.v1.InferenceService/Generate"],
            ["/v1/completions", "/v1/chat/completions"],
        )
        assert all("typed_per_filter_config" not in r for r in routes[:-1])
        rest = routes[-1]
        assert rest["match"] == {"prefix": "/"}
        assert rest["typed_per_filter_config"]["envoy.filters.http.ext_proc"]["disabled"] is True


def test_streams_have_no_timeout_and_retries_only_before_a_response():
    config = envoy_config(CASES["picker"])
    (listener,) = config["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    route = manager["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["timeout"] == "0s" and manager["stream_idle_timeout"] == "0s"
    assert set(route["retry_policy"]["retry_on"].split(",")) == {
        "unavailable",
        "reset",
        "connect-failure",
        "refused-stream",
    }
    (cluster, _picker) = config["static_resources"]["clusters"]
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"] == {"service_name": "loraserve.v1.InferenceService"}
    assert check["no_traffic_interval"] == check["interval"]


def test_baselines_leave_the_picker_out():
    for mode in ("maglev", "round_robin"):
        config = envoy_config(CASES[mode])
        assert [c["name"] for c in config["static_resources"]["clusters"]] == ["replicas_grpc"]
        assert _filters(config["static_resources"]["listeners"][0]) == ["envoy.filters.http.router"]


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(replicas=()), "replicas"),
        (dict(replicas=("nohost",)), "must be host:port"),
        (dict(replicas=REPLICAS, mode="fastest"), "mode ('fastest') must be one of"),
        (dict(replicas=REPLICAS, http_port=8000), "replica_http"),
        (dict(replicas=REPLICAS, health_interval_s=0), "health_interval_s (0) must be > 0"),
    ],
)
def test_bad_settings_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FrontDoorConfig(**fields)


def test_the_command_prints_a_config_or_one_line_of_error(capsys):
    assert main(["--replica", REPLICAS[0], "--port", "9000"]) == 0
    assert '"port_value": 9000' in capsys.readouterr().out
    assert main(["--replica", "nohost"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def validates_with_the_stacks_secrets(flags: list[str], tmp_path, capsys) -> None:
    """`flags` generate a config Envoy accepts, with the TLS files `keygen init` writes standing in
    at the /secrets paths the deployment mounts them under."""
    from loraserve import keygen

    secrets = tmp_path / "secrets"
    assert keygen.main(["init", "--server-dir", str(secrets), "--client-dir", str(tmp_path / "client")]) == 0
    capsys.readouterr()
    assert main([f.replace("/secrets/", f"{secrets}/") for f in flags]) == 0
    path = tmp_path / "envoy.yaml"
    path.write_text(capsys.readouterr().out)
    envoy_validates(path)


def test_the_compose_door_command_generates_a_valid_config(tmp_path, capsys):
    import re
    import shlex
    from pathlib import Path

    compose = (Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text()
    (flags,) = re.findall(r"python -m loraserve\.front_door (.*?) > /tmp/envoy\.yaml", compose, flags=re.S)
    assert "--tls-ca" in flags and "--tls-cert" in flags  # TLS to the replicas and to clients
    validates_with_the_stacks_secrets(shlex.split(flags), tmp_path, capsys)


def test_the_kubernetes_door_generates_a_valid_config(tmp_path, capsys):
    from pathlib import Path

    import yaml

    base = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "base" / "front-door.yaml"
    docs = yaml.safe_load_all(base.read_text())
    (door,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "loraserve-door"]
    (init,) = door["spec"]["template"]["spec"]["initContainers"]
    assert init["command"][2].startswith("python -m loraserve.front_door")
    validates_with_the_stacks_secrets(init["args"], tmp_path, capsys)
