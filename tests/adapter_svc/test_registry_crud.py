"""Registry CRUD over gRPC against a real Redis, and every validation error with its status code."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2
from safetensors.torch import load_file, save_file

from inference_svc.demo_model import write_demo_adapter
from loraserve.model_summary import ModelConfig
from loraserve.v1 import adapter_pb2 as pb

from harness import TIMEOUT_S, ManagerHandle, code_of, manager_config, register, wait_for, write_model
from redis_deployments import single_redis_only

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def upload_requests(adapter_id: str, directory, chunk: int = 4096, **header):
    config = (directory / "adapter_config.json").read_bytes()
    yield pb.UploadAdapterRequest(
        header=pb.UploadHeader(adapter_id=adapter_id, adapter_config_json=config, **header)
    )
    data = (directory / "adapter_model.safetensors").read_bytes()
    for i in range(0, len(data), chunk):
        yield pb.UploadAdapterRequest(chunk=data[i : i + chunk])


def test_register_get_list_unregister(manager, redis_proc, adapters, tmp_path):
    path = adapters["ad-0"]
    got = register(manager.stub, "ad-0", path, tenant="acme", metadata={"owner": "team-a"})
    weights = (path / "adapter_model.safetensors").read_bytes()
    assert got.sha256 == hashlib.sha256(weights).hexdigest()
    assert got.size_bytes == len(weights)
    assert (got.rank, got.lora_alpha, list(got.target_modules)) == (4, 16.0, ["q_proj", "v_proj"])
    assert (got.tenant, dict(got.metadata)) == ("acme", {"owner": "team-a"})
    assert got.state == pb.ADAPTER_STATE_REGISTERED
    assert got.source == f"dir:{path.resolve()}"
    assert manager.stub.GetAdapter(pb.GetAdapterRequest(adapter_id="ad-0"), timeout=TIMEOUT_S) == got

    # Redis holds the record under the one key layout, and the store a content-addressed copy.
    r = redis_proc.client()
    assert r.hget(redis_proc.keys.adapter("ad-0"), "sha256") == got.sha256
    assert r.zrange(redis_proc.keys.adapters, 0, -1) == ["ad-0"]
    assert r.zrange(redis_proc.keys.by_tenant("acme"), 0, -1) == ["ad-0"]
    stored = list((tmp_path / "store" / "blobs").glob(f"*/{got.sha256}-*/adapter_model.safetensors"))
    assert len(stored) == 1 and stored[0].read_bytes() == weights

    # Registering the same content again is idempotent; other content under the id is refused.
    assert register(manager.stub, "ad-0", path, tenant="acme").sha256 == got.sha256
    assert code_of(register, manager.stub, "ad-0", adapters["ad-1"]).code == grpc.StatusCode.ALREADY_EXISTS

    register(manager.stub, "ad-1", adapters["ad-1"], tenant="other")
    listed = manager.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=TIMEOUT_S)
    assert [a.adapter_id for a in listed.adapters] == ["ad-0", "ad-1"] and listed.next_page_token == ""
    by_tenant = manager.stub.ListAdapters(pb.ListAdaptersRequest(tenant="other"), timeout=TIMEOUT_S)
    assert [a.adapter_id for a in by_tenant.adapters] == ["ad-1"]

    manager.stub.UnregisterAdapter(pb.UnregisterAdapterRequest(adapter_id="ad-0"), timeout=TIMEOUT_S)
    assert (
        code_of(manager.stub.GetAdapter, pb.GetAdapterRequest(adapter_id="ad-0")).code
        == grpc.StatusCode.NOT_FOUND
    )
    assert r.exists(redis_proc.keys.adapter("ad-0")) == 0
    assert r.zrange(redis_proc.keys.adapters, 0, -1) == ["ad-1"]
    assert r.zrange(redis_proc.keys.by_tenant("acme"), 0, -1) == []
    unregister = code_of(manager.stub.UnregisterAdapter, pb.UnregisterAdapterRequest(adapter_id="ad-0")).code
    assert unregister == grpc.StatusCode.NOT_FOUND
    types = [f["type"] for _, f in r.xrange(redis_proc.keys.events)]
    assert types == ["registered", "registered", "unregistered"]


def test_upload(manager, adapters, loop, redis_proc, tmp_path, adapter_root, model_dir):
    path = adapters["ad-2"]
    uploaded = manager.stub.UploadAdapter(upload_requests("up-2", path, tenant="t"), timeout=TIMEOUT_S)
    assert uploaded.source == "upload"
    assert uploaded.sha256 == hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert register(manager.stub, "ad-2", path).sha256 == uploaded.sha256  # same bytes, one blob
    assert len(list((tmp_path / "store" / "blobs").glob("*/*"))) == 1

    wrong = upload_requests("up-x", path, sha256="0" * 64)
    assert code_of(manager.stub.UploadAdapter, wrong).code == INVALID
    chunks_only = iter([pb.UploadAdapterRequest(chunk=b"abc")])
    assert code_of(manager.stub.UploadAdapter, chunks_only).code == INVALID

    small = ManagerHandle(
        loop,
        manager_config(redis_proc.url, tmp_path / "small", adapter_root, model_dir, max_upload_bytes=4096),
    )
    try:
        big = upload_requests("up-big", path)
        assert code_of(small.stub.UploadAdapter, big).code == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        small.close()
    assert not list((tmp_path / "store" / "staging").iterdir())  # refused uploads leave nothing


def _copy(adapters, root, name: str):
    target = root / name
    shutil.copytree(adapters["ad-0"], target)
    return target


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def _nan_weights(path):
    tensors = load_file(str(path / "adapter_model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(path / "adapter_model.safetensors"))


def _truncate(path):
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


def _bad_header(path):
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", 10**12) + data[8:])


def _pickle_only(path):
    tensors = load_file(str(path / "adapter_model.safetensors"))
    torch.save(tensors, path / "adapter_model.bin")
    (path / "adapter_model.safetensors").unlink()


BROKEN = {
    "rank too large": (lambda p: None, "exceeds max_lora_rank", 16),
    "rank zero": (lambda p: _edit_config(p, r=0), "must be a positive integer", 4),
    "unknown target module": (
        lambda p: _edit_config(p, target_modules=["q_proj", "lm_head"]),
        "not supported",
        4,
    ),
    "dora": (lambda p: _edit_config(p, use_dora=True), "DoRA", 4),
    "modules_to_save": (lambda p: _edit_config(p, modules_to_save=["lm_head"]), "modules_to_save", 4),
    "bias": (lambda p: _edit_config(p, bias="all"), "bias", 4),
    "config not json": (lambda p: (p / "adapter_config.json").write_text("{"), "not valid JSON", 4),
    "missing weights": (lambda p: (p / "adapter_model.safetensors").unlink(), "is missing", 4),
    "missing config": (lambda p: (p / "adapter_config.json").unlink(), "is missing", 4),
    "pickle only": (_pickle_only, "pickle", 4),
    "truncated safetensors": (_truncate, "data section", 4),
    "corrupt header": (_bad_header, "header length", 4),
    "nan weights": (_nan_weights, "NaN or Inf", 4),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_invalid_adapters_are_refused_with_the_problem_named(manager, model_dir, adapter_root, case):
    mutate, phrase, rank = BROKEN[case]
    path = adapter_root / f"broken-{case.replace(' ', '-')}"
    shutil.rmtree(path, ignore_errors=True)
    write_demo_adapter(path, ModelConfig.from_dir(model_dir), rank=rank, target_modules=("q_proj", "v_proj"))
    mutate(path)
    with pytest.raises(grpc.RpcError) as e:
        register(manager.stub, "broken", path)
    assert e.value.code() == INVALID, e.value.details()
    assert phrase in e.value.details()
    assert "staging" not in e.value.details()  # the client's path, not the manager's scratch copy


def test_shape_mismatch_against_the_base_model(manager, adapter_root, tmp_path):
    other = ModelConfig.from_dir(write_model(tmp_path / "other"))
    other = other.__class__(**{**other.__dict__, "hidden_size": 32, "num_heads": 2, "head_dim": 16})
    path = write_demo_adapter(adapter_root / "wrong-shape", other, rank=4, target_modules=("q_proj",))
    with pytest.raises(grpc.RpcError) as e:
        register(manager.stub, "wrong-shape", path)
    assert e.value.code() == INVALID and "do not match the base model" in e.value.details()


def test_paths_outside_the_adapter_roots_are_refused(manager, adapters, adapter_root, tmp_path):
    outside = shutil.copytree(adapters["ad-0"], tmp_path / "outside")
    (adapter_root / "escape-dir").unlink(missing_ok=True)
    (adapter_root / "escape-dir").symlink_to(outside, target_is_directory=True)
    linked = adapter_root / "escape-file"
    shutil.rmtree(linked, ignore_errors=True)
    linked.mkdir()
    shutil.copy(adapters["ad-0"] / "adapter_config.json", linked)
    (linked / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    for path in (
        str(outside),
        str(adapter_root / "escape-dir"),
        str(linked),
        f"{adapter_root}/../{outside.parent.name}/outside",
        "ad-0",
    ):
        with pytest.raises(grpc.RpcError) as e:
            register(manager.stub, "escape", path)
        assert e.value.code() == INVALID, path
    assert code_of(register, manager.stub, "no-such", adapter_root / "no-such").code == INVALID


def alias_request(name: str, target: str) -> pb.SetAliasRequest:
    return pb.SetAliasRequest(
        alias=pb.Alias(name=name, variants=[pb.AliasVariant(adapter_id=target, weight=1)])
    )


def test_ids_namespace_and_aliases(manager, adapters):
    assert code_of(register, manager.stub, "bad id", adapters["ad-0"]).code == INVALID
    assert code_of(register, manager.stub, "a:b", adapters["ad-0"]).code == INVALID
    register(manager.stub, "ad-0", adapters["ad-0"])
    set_alias = manager.stub.SetAlias
    assert code_of(set_alias, alias_request("ad-0", "ad-0")).code == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(set_alias, alias_request("bot", "nope")).code == grpc.StatusCode.NOT_FOUND
    set_alias(alias_request("bot", "ad-0"), timeout=TIMEOUT_S)
    assert code_of(register, manager.stub, "bot", adapters["ad-1"]).code == grpc.StatusCode.ALREADY_EXISTS
    unregister = manager.stub.UnregisterAdapter
    assert (
        code_of(unregister, pb.UnregisterAdapterRequest(adapter_id="ad-0")).code
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    unregister(
        pb.UnregisterAdapterRequest(adapter_id="ad-0", force=True), timeout=TIMEOUT_S
    )  # unrouted, then gone
    assert code_of(manager.stub.GetAlias, pb.GetAliasRequest(name="bot")).code == grpc.StatusCode.NOT_FOUND
    assert code_of(manager.stub.ListAdapters, pb.ListAdaptersRequest(page_size=5000)).code == INVALID


def test_without_a_validation_context_registration_is_refused(
    loop, redis_proc, tmp_path, adapter_root, adapters
):
    handle = ManagerHandle(loop, manager_config(redis_proc.url, tmp_path, adapter_root, None))
    try:
        with pytest.raises(grpc.RpcError) as e:
            register(handle.stub, "ad-0", adapters["ad-0"])
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "--model-config" in e.value.details()
    finally:
        handle.close()


def test_redis_outage_answers_unavailable_and_recovers(manager, redis_proc, adapters):
    single_redis_only(redis_proc)
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    register(manager.stub, "ad-0", adapters["ad-0"])
    redis_proc.kill()
    assert (
        code_of(manager.stub.GetAdapter, pb.GetAdapterRequest(adapter_id="ad-0")).code
        == grpc.StatusCode.UNAVAILABLE
    )
    assert code_of(register, manager.stub, "ad-1", adapters["ad-1"]).code == grpc.StatusCode.UNAVAILABLE
    wait_for(lambda: manager.health_status() == not_serving, "health NOT_SERVING while Redis is down")
    redis_proc.start()  # same port; no persistence in this test, so the registry starts empty
    wait_for(lambda: manager.health_status() == serving, "health SERVING again")
    assert register(manager.stub, "ad-1", adapters["ad-1"]).adapter_id == "ad-1"


def test_watch_events_tails_the_stream_and_resumes(manager, adapters):
    register(manager.stub, "ad-0", adapters["ad-0"])
    register(manager.stub, "ad-1", adapters["ad-1"])
    stream = manager.stub.WatchEvents(pb.WatchEventsRequest(after_id="0"), timeout=TIMEOUT_S)
    first = [next(stream), next(stream)]
    assert [(e.type, e.adapter_id) for e in first] == [("registered", "ad-0"), ("registered", "ad-1")]
    register(manager.stub, "ad-2", adapters["ad-2"])  # arrives while the stream is open
    third = next(stream)
    assert (third.type, third.adapter_id) == ("registered", "ad-2")
    stream.cancel()
    resumed = manager.stub.WatchEvents(
        pb.WatchEventsRequest(after_id=first[0].id, adapter_id="ad-1"), timeout=TIMEOUT_S
    )
    assert next(resumed).adapter_id == "ad-1"
    resumed.cancel()
