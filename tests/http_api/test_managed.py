"""A replica joined to the adapter manager, with tokens: /v1/models lists what the registry holds
(adapters and aliases, each with its tenant), scoped to a tenant's own; an alias resolves with the
same sticky rule as gRPC, `user` being the request key."""

import openai
import pytest

from loraserve.security import SecurityConfig
from loraserve.v1 import adapter_pb2 as pb
from loraserve.v1 import inference_pb2

from credentials import authenticated_replica, write_tokens
from harness import TIMEOUT_S, ManagerHandle, RedisProcess, manager_config, register
from http_clients import client

TENANTS = {"ad-0": "acme", "ad-1": "acme", "ad-2": "globex", "ad-3": ""}
ALIASES = {"acme-bot": ("ad-0", "ad-1"), "mixed": ("ad-1", "ad-2")}
GREEDY = dict(
    max_tokens=4,
    temperature=0,
    logprobs=0,
    extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
)


@pytest.fixture(scope="module")
def cluster(loop, tmp_path_factory, model_dir, adapters, adapter_root):
    root = tmp_path_factory.mktemp("managed_http")
    redis_proc = RedisProcess(root / "redis").start()
    tokens = write_tokens(root / "tokens.json")
    security = SecurityConfig(auth_tokens=str(tokens.path))
    manager = ManagerHandle(loop, manager_config(redis_proc.url, root, adapter_root, model_dir), security)
    admin = tokens.md("admin")
    for adapter_id, tenant in TENANTS.items():
        register(manager.stub, adapter_id, adapters[adapter_id], call_metadata=admin, tenant=tenant)
    for name, (a, b) in ALIASES.items():
        variants = [pb.AliasVariant(adapter_id=a, weight=50), pb.AliasVariant(adapter_id=b, weight=50)]
        alias = pb.SetAliasRequest(alias=pb.Alias(name=name, variants=variants))
        manager.stub.SetAlias(alias, timeout=TIMEOUT_S, metadata=admin)
    overrides = {"http_port": 0, "served_model_name": "tiny"}
    replica = authenticated_replica(manager, model_dir, "r-http", tokens, server_overrides=overrides)
    yield manager, replica, tokens
    replica.close()
    manager.close()
    redis_proc.stop()


def test_models_come_from_the_registry_scoped_to_the_tenant(cluster):
    _, replica, tokens = cluster
    listed = {m.id: m for m in client(replica, tokens.admin).models.list().data}
    assert list(listed) == ["tiny", "ad-0", "ad-1", "ad-2", "ad-3", "acme-bot", "mixed"]
    owners = {m.id: m.owned_by for m in listed.values()}
    assert owners == {
        "tiny": "loraserve",
        "ad-0": "acme",
        "ad-1": "acme",
        "ad-2": "globex",
        "ad-3": "loraserve",  # no tenant
        "acme-bot": "acme",  # every variant is acme's
        "mixed": "loraserve",  # variants of two tenants
    }
    assert {m.parent for m in listed.values()} == {None, "tiny"} and listed["tiny"].parent is None
    assert [m.id for m in client(replica, tokens.acme).models.list().data] == [
        "tiny",
        "ad-0",
        "ad-1",
        "acme-bot",
    ]
    assert [m.id for m in client(replica, tokens.globex).models.list().data] == ["tiny", "ad-2"]


def resolved(manager, alias: str, key: str, tokens) -> str:
    request = pb.ResolveAdapterRequest(adapter_id=alias, request_key=key)
    return manager.stub.ResolveAdapter(request, timeout=TIMEOUT_S, metadata=tokens.md("admin")).adapter_id


def grpc_ids(replica, adapter_id: str, tokens, chat: bool = False) -> list[int]:
    req = inference_pb2.GenerateRequest(
        adapter_id=adapter_id,
        params=inference_pb2.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
    )
    if chat:
        req.messages.messages.add(role="user", content="hello")
    else:
        req.text = "hello"
    responses = replica.stub.Generate(req, timeout=TIMEOUT_S, metadata=tokens.md("admin"))
    return [t for r in responses for t in r.token_ids]


def test_alias_resolves_sticky_by_user_as_over_grpc(cluster):
    manager, replica, tokens = cluster
    acme = client(replica, tokens.acme)
    by_variant = {}
    for i in range(40):  # users until both variants have one
        user = f"user-{i}"
        by_variant.setdefault(resolved(manager, "acme-bot", user, tokens), user)
        if len(by_variant) == 2:
            break
    assert set(by_variant) == {"ad-0", "ad-1"}
    for variant, user in by_variant.items():
        want = grpc_ids(replica, variant, tokens)
        for stream in (False, True):
            answer = acme.completions.create(
                model="acme-bot", prompt="hello", user=user, stream=stream, **GREEDY
            )
            chunks = list(answer) if stream else [answer]
            ids = [int(t.split(":")[1]) for c in chunks for t in c.choices[0].logprobs.tokens]
            assert ids == want, (variant, user, stream)
            chat = acme.chat.completions.create(
                model="acme-bot",
                messages=[{"role": "user", "content": "hello"}],
                user=user,
                stream=stream,
                **{**GREEDY, "logprobs": True},
            )
            chunks = list(chat) if stream else [chat]
            ids = [int(e.token.split(":")[1]) for c in chunks for e in c.choices[0].logprobs.content]
            assert ids == grpc_ids(replica, variant, tokens, chat=True), (variant, user, stream)
    assert grpc_ids(replica, "ad-0", tokens) != grpc_ids(replica, "ad-1", tokens)  # so the check above bites


def test_other_tenants_aliases_and_adapters_are_not_found(cluster):
    _, replica, tokens = cluster
    globex = client(replica, tokens.globex)
    for model in ("acme-bot", "ad-0", "mixed"):
        with pytest.raises(openai.NotFoundError):
            globex.completions.create(model=model, prompt="hello", max_tokens=2)
    assert globex.completions.create(model="ad-2", prompt="hello", max_tokens=2).usage.completion_tokens == 2
