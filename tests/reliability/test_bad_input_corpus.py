"""Malformed adapters through the real services: the 25-case corpus of
`tests/inference_svc/test_adapter_validation.py`, path escapes and bad uploads, sent to the manager
(RegisterAdapter, UploadAdapter) and to a replica (LoadAdapter by path). Each is refused with the
right code and a message naming the problem, while another tenant's generation keeps running and
comes out right, and no slot, registry entry or stored blob changes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import grpc
import pytest
import torch
from test_adapter_validation import CORPUS, WEIGHTS

from inference_svc.demo_model import write_demo_adapter
from loraserve.model_summary import ModelConfig
from loraserve.security import SecurityConfig
from loraserve.v1 import adapter_pb2 as pb
from loraserve.v1 import inference_pb2

from credentials import replica_token, write_tokens
from harness import TIMEOUT_S, ManagerHandle, RedisProcess, ReplicaHandle, code_of, manager_config, register

INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
MAX_UPLOAD_BYTES = 256 * 1024
# The replica here has max_lora_rank 8 (the corpus module's engine has 16).
FRAGMENTS = {
    **{case: fragment for case, (_, _, fragment) in CORPUS.items()},
    "rank above max_lora_rank": "exceeds max_lora_rank (8)",
}
STREAM = dict(max_tokens=48, temperature=0, ignore_eos=True)


def slug(case: str) -> str:
    return "bad-" + "".join(c if c.isalnum() else "-" for c in case)


@pytest.fixture(scope="module")
def setup(loop, tmp_path_factory, model_dir):
    """A manager and a replica (authentication on), an adapter root with the corpus in it, and two
    good adapters: acme's pinned in a slot, globex's used by the concurrent stream."""
    tmp = tmp_path_factory.mktemp("corpus")
    root, outside = tmp / "root", tmp / "outside"
    model = ModelConfig.from_dir(model_dir)
    good = {
        name: write_demo_adapter(root / name, model, rank=8, seed=i)
        for i, name in enumerate(("good-a", "good-g"))
    }
    template = write_demo_adapter(tmp / "template", model, rank=8, seed=1)
    for case, (corrupt, _, _) in CORPUS.items():
        shutil.copytree(template, root / slug(case))
        corrupt(root / slug(case))
    escapes = make_escapes(root, outside, template)

    redis_proc = RedisProcess(tmp / "redis").start()
    tokens = write_tokens(tmp / "tokens.json")
    security = SecurityConfig(auth_tokens=str(tokens.path), service_token=replica_token("r-corpus"))
    manager = ManagerHandle(
        loop,
        manager_config(redis_proc.url, tmp, root, model_dir, max_upload_bytes=MAX_UPLOAD_BYTES),
        security,
    )
    replica = None
    try:
        admin = tokens.md("admin")
        register(manager.stub, "good-a", good["good-a"], call_metadata=admin, tenant="acme")
        register(manager.stub, "good-g", good["good-g"], call_metadata=admin, tenant="globex")
        replica = ReplicaHandle(
            loop,
            model_dir,
            manager.address,
            "r-corpus",
            security=security,
            server_overrides=dict(adapter_roots=(str(root),)),
        )
        manager.stub.PinAdapter(pb.PinAdapterRequest(adapter_id="good-a"), timeout=TIMEOUT_S, metadata=admin)
        manager.stub.LoadAdapter(
            pb.ClusterLoadAdapterRequest(adapter_id="good-a", to_slot=True), timeout=TIMEOUT_S, metadata=admin
        )
        yield dict(
            tokens=tokens, manager=manager, replica=replica, root=root, escapes=escapes, store=tmp / "store"
        )
    finally:
        if replica is not None:
            replica.close()
        manager.close()
        redis_proc.stop()


def make_escapes(root: Path, outside: Path, template: Path) -> dict[str, tuple[str, str]]:
    """{name: (path as sent, message fragment)} of paths that try to leave the adapter root."""
    shutil.copytree(template, outside / "adapter")
    (root / "dir-link").symlink_to(outside / "adapter", target_is_directory=True)
    (root / "file-link").mkdir()
    shutil.copy(template / "adapter_config.json", root / "file-link")
    (root / "file-link" / WEIGHTS).symlink_to(outside / "adapter" / WEIGHTS)
    shutil.copytree(template, root / "pickle-link")  # a loader allowed pickles could open it
    (root / "pickle-link" / "adapter_model.bin").symlink_to(outside / "adapter" / WEIGHTS)
    return {
        "directory symlink out of the root": (str(root / "dir-link"), "outside"),
        "weights file symlink out of the root": (str(root / "file-link"), "outside"),
        "pickle weights symlink out of the root": (str(root / "pickle-link"), "outside"),
        "'..' out of the root": (f"{root}/../outside/adapter", "'..'"),
        "absolute path outside the root": (str(outside / "adapter"), "outside"),
        "relative path": ("root/good-a", "absolute"),
    }


def upload(
    stub, metadata, adapter_id: str, config: bytes, weights: bytes, sha256: str = "", chunk: int = 64 * 1024
):
    def messages():
        yield pb.UploadAdapterRequest(
            header=pb.UploadHeader(
                adapter_id=adapter_id, adapter_config_json=config, tenant="acme", sha256=sha256
            )
        )
        for i in range(0, len(weights), chunk):
            yield pb.UploadAdapterRequest(chunk=weights[i : i + chunk])

    return stub.UploadAdapter(messages(), timeout=TIMEOUT_S, metadata=metadata)


class Generating(threading.Thread):
    """globex generating with its adapter, one request after another, until stopped; each must
    produce exactly the reference tokens."""

    def __init__(self, replica: ReplicaHandle, metadata):
        super().__init__(daemon=True)
        self.replica, self.metadata = replica, metadata
        self.reference = self.tokens()
        self.completed, self.wrong, self.errors = 0, 0, []
        self.stop = threading.Event()

    def tokens(self) -> list[int]:
        request = inference_pb2.GenerateRequest(
            adapter_id="good-g",
            token_ids=inference_pb2.TokenIds(ids=[11, 12, 13, 14]),
            params=inference_pb2.SamplingParams(**STREAM),
        )
        return [
            t
            for r in self.replica.stub.Generate(request, timeout=TIMEOUT_S, metadata=self.metadata)
            for t in r.token_ids
        ]

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                got = self.tokens()
            except grpc.RpcError as e:
                self.errors.append((e.code(), e.details()))
                return
            self.completed += 1
            self.wrong += got != self.reference


def slots(engine) -> list[torch.Tensor]:
    return [t.clone() for layer in (*engine.lora.a, *engine.lora.b) for t in layer.values()]


def residency(replica: ReplicaHandle, metadata) -> list:
    listed = replica.stub.ListResidentAdapters(
        inference_pb2.ListResidentAdaptersRequest(), timeout=TIMEOUT_S, metadata=metadata
    )
    return sorted((a.adapter_id, a.tier, a.slot, a.pinned) for a in listed.adapters)


def registry_and_store(manager: ManagerHandle, store: Path, metadata) -> tuple:
    listed = manager.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=TIMEOUT_S, metadata=metadata)
    blobs = sorted(str(p.relative_to(store)) for p in (store / "blobs").glob("*/*"))
    return [(a.adapter_id, a.sha256, a.tenant) for a in listed.adapters], blobs, os.listdir(store / "staging")


def test_every_malformed_adapter_is_refused_while_another_tenant_generates(setup):
    tokens, manager, replica, root = setup["tokens"], setup["manager"], setup["replica"], setup["root"]
    admin = tokens.md("admin")
    stream = Generating(replica, tokens.md("globex"))
    before = replica.on_engine(slots)
    resident_before = residency(replica, admin)
    registry_before = registry_and_store(manager, setup["store"], admin)
    stream.start()
    refused = []  # (service, case, code, details)

    # 1. RegisterAdapter on the manager: the corpus, then the path escapes.
    for case in CORPUS:
        code, details = code_of(
            register, manager.stub, slug(case), root / slug(case), call_metadata=admin, tenant="acme"
        )
        refused.append(("manager", case, code, details, INVALID, FRAGMENTS[case]))
    for case, (path, fragment) in setup["escapes"].items():
        code, details = code_of(register, manager.stub, "escape", path, call_metadata=admin, tenant="acme")
        refused.append(("manager", case, code, details, INVALID, fragment))

    # 2. UploadAdapter: every corpus case that has both files, then size and checksum lies.
    for case in CORPUS:
        directory = root / slug(case)
        if not (directory / "adapter_config.json").is_file() or not (directory / WEIGHTS).is_file():
            continue
        config, weights = (directory / "adapter_config.json").read_bytes(), (directory / WEIGHTS).read_bytes()
        code, details = code_of(upload, manager.stub, admin, slug(case), config, weights)
        refused.append(("upload", case, code, details, INVALID, FRAGMENTS[case]))
    config = (root / "good-a" / "adapter_config.json").read_bytes()
    weights = (root / "good-a" / WEIGHTS).read_bytes()
    code, details = code_of(upload, manager.stub, admin, "huge", config, weights + bytes(MAX_UPLOAD_BYTES))
    refused.append(
        (
            "upload",
            "oversized upload",
            code,
            details,
            EXHAUSTED,
            f"max_upload_bytes ({MAX_UPLOAD_BYTES} bytes)",
        )
    )
    code, details = code_of(
        upload, manager.stub, admin, "lied", config, weights, hashlib.sha256(b"other").hexdigest()
    )
    refused.append(("upload", "declared sha256 differs", code, details, INVALID, "not the declared"))
    code, details = code_of(upload, manager.stub, admin, "no-config", b"[1, 2]", weights)
    refused.append(("upload", "config not an object", code, details, INVALID, "not a JSON object"))

    # 3. LoadAdapter by path on the replica: the engine's own validation, and its path checks.
    for case in CORPUS:
        request = inference_pb2.LoadAdapterRequest(
            adapter_id=slug(case), path=str(root / slug(case)), to_slot=True
        )
        code, details = code_of(replica.stub.LoadAdapter, request, timeout=TIMEOUT_S, metadata=admin)
        refused.append(("replica", case, code, details, INVALID, FRAGMENTS[case]))
    for case, (path, fragment) in setup["escapes"].items():
        request = inference_pb2.LoadAdapterRequest(adapter_id="escape", path=path, to_slot=True)
        code, details = code_of(replica.stub.LoadAdapter, request, timeout=TIMEOUT_S, metadata=admin)
        refused.append(("replica", case, code, details, INVALID, fragment))

    stream.stop.set()
    stream.join(TIMEOUT_S)
    wrong = [
        (s, c, code.name, d) for s, c, code, d, want, fragment in refused if code != want or fragment not in d
    ]
    assert not wrong, json.dumps(wrong, indent=1)
    assert not stream.errors and stream.wrong == 0 and stream.completed >= 1, (stream.errors, stream.wrong)
    after = replica.on_engine(slots)
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert residency(replica, admin) == resident_before
    assert registry_and_store(manager, setup["store"], admin) == registry_before
    counts = {s: sum(1 for r in refused if r[0] == s) for s in ("manager", "upload", "replica")}
    print(
        f"\nbad inputs refused: {len(refused)} {counts}; concurrent globex streams completed: {stream.completed}"
    )
    assert len({case for _, case, *_ in refused}) >= 25
