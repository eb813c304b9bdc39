"""Issue 17, items 1-5, 11 and 12: what a hostile tenant (or a careless client) sent a live stack
with authentication on, sent again through the real services, each asserting the corrected answer.

| finding | test |
|---|---|
| 1 tiny temperatures abort the step | test_four_tenants_stream_right_tokens_through_every_attack |
| 2 7.5 MB prompt tokenized on the engine thread | test_four_tenants_..., test_a_prompt_too_long_to_fit_is_refused_before_tokenizing |
| 2 (input sizes on the engine thread) | test_stop_conditions_are_bounded |
| 3 tensor-count bomb | test_four_tenants_..., test_tensor_bombs_are_refused_from_the_header_length_and_count |
| 4 ReDoS through rank_pattern / alpha_pattern | test_four_tenants_..., test_pattern_keys_are_matched_in_linear_time_or_refused |
| 5 WatchEvents exhausts the Redis pool | test_150_watchers_leave_every_other_rpc_working |
| 11 wrong codes | test_wrong_codes_are_now_invalid_argument, test_internal_errors_carry_a_reference_not_the_text |
| 12 ids, metadata, tenant conflicts | test_ids_metadata_and_tenant_conflicts |
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import threading
from pathlib import Path

import grpc
import pytest

from inference_svc.demo_model import write_demo_adapter
from loraserve.auth import token_metadata
from loraserve.model_summary import ModelConfig
from loraserve.peft_format import CONFIG_FILE, MAX_CONFIG_BYTES, WEIGHTS_FILE, HeaderLimits
from loraserve.security import SecurityConfig
from loraserve.v1 import adapter_pb2 as pb
from loraserve.v1 import inference_pb2

from credentials import authenticated_replica, tenant_token, write_tokens
from harness import (
    TIMEOUT_S,
    ManagerHandle,
    RedisProcess,
    ReplicaHandle,
    code_of,
    manager_config,
    register,
    wait_for,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
TENANTS = ("acme", "globex", "initech", "umbrella")
STREAM = dict(max_tokens=48, temperature=0, ignore_eos=True)
PROMPT = [11, 12, 13, 14]
# The backtracking key of the report: nested quantifiers that Python's `re` explores for ever
# against a dotted module name that ends without an X.
REDOS_KEY = r"((\w+\.?)+)+X"
BOMB_TENSORS = 500_000
# The replica heartbeats every second; the manager marks it down after this long without one. The
# report's stalls were 10-20 s; a shared 2-core test machine alone can pause the process ~2 s.
REPLICA_TTL_S = 6.0


# --- adapters a hostile tenant writes --------------------------------------------------------------


def write_config(directory: Path, **changes) -> None:
    path = directory / CONFIG_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def write_header_only(path: Path, header: bytes) -> None:
    """A safetensors file made of a header alone (every tensor zero-size)."""
    path.write_bytes(struct.pack("<Q", len(header)) + header)


def write_tensor_bomb(directory: Path, template: Path, count: int) -> Path:
    """The report's bomb: a valid config and `count` zero-size tensors in the safetensors header."""
    shutil.copytree(template, directory)
    entry = '"base_model.model.model.layers.0.self_attn.q_proj.lora_A.b{}.weight":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
    header = ("{" + ",".join(entry.format(i) for i in range(count)) + "}").encode()
    write_header_only(directory / WEIGHTS_FILE, header)
    return directory


def write_variant(directory: Path, template: Path, **config) -> Path:
    shutil.copytree(template, directory)
    write_config(directory, **config)
    return directory


# --- the stack -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(loop, tmp_path_factory, model_dir):
    """A manager and a managed replica (authentication on, 4 slots, 8 host entries), four tenants
    with an adapter each, and an adapter root the attacker's files are written under."""
    tmp = tmp_path_factory.mktemp("hardening")
    root = tmp / "root"
    model = ModelConfig.from_dir(model_dir)
    for i, tenant in enumerate(TENANTS):
        write_demo_adapter(root / f"{tenant}-a0", model, rank=8, seed=10 + i)
    template = write_demo_adapter(tmp / "template", model, rank=8, seed=1)
    redis_proc = RedisProcess(tmp / "redis").start()
    tokens = write_tokens(tmp / "tokens.json", extra_tenants=("initech", "umbrella", "mallory"))
    security = SecurityConfig(auth_tokens=str(tokens.path))
    config = manager_config(redis_proc.url, tmp, root, model_dir, replica_ttl_s=REPLICA_TTL_S)
    manager = ManagerHandle(loop, config, security)
    replica = None
    try:
        admin = tokens.md("admin")
        for tenant in TENANTS:
            register(manager.stub, f"{tenant}-a0", root / f"{tenant}-a0", call_metadata=admin, tenant=tenant)
        overrides = dict(adapter_roots=(str(root),))
        replica = authenticated_replica(
            manager, model_dir, "r-hard", tokens, server_overrides=overrides, max_loras=4, max_cpu_loras=8
        )
        yield dict(
            tokens=tokens, admin=admin, manager=manager, replica=replica, root=root, template=template,
            model=model, tmp=tmp, redis=redis_proc,
        )  # fmt: skip
    finally:
        if replica is not None:
            replica.close()
        manager.close()
        redis_proc.stop()


def replica_state(manager: ManagerHandle, admin, replica_id: str) -> pb.ReplicaState:
    cluster = manager.stub.GetClusterState(pb.GetClusterStateRequest(), timeout=TIMEOUT_S, metadata=admin)
    return next(r for r in cluster.replicas if r.replica_id == replica_id)


def md(tenant: str) -> tuple:
    return token_metadata(tenant_token(tenant))


def generate(replica: ReplicaHandle, metadata, adapter_id: str = "", prompt=PROMPT, **params) -> list[int]:
    request = inference_pb2.GenerateRequest(
        adapter_id=adapter_id,
        token_ids=inference_pb2.TokenIds(ids=list(prompt)),
        params=inference_pb2.SamplingParams(**{**STREAM, **params}),
    )
    return [
        t for r in replica.stub.Generate(request, timeout=TIMEOUT_S, metadata=metadata) for t in r.token_ids
    ]


class TenantStream(threading.Thread):
    """One tenant generating with its adapter, request after request, until stopped; each
    request must give exactly the tokens it gave alone before the attacks."""

    def __init__(self, replica: ReplicaHandle, tenant: str):
        super().__init__(daemon=True, name=f"stream-{tenant}")
        self.replica, self.tenant = replica, tenant
        self.reference = generate(replica, md(tenant), f"{tenant}-a0")
        self.completed, self.wrong, self.errors = 0, 0, []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                got = generate(self.replica, md(self.tenant), f"{self.tenant}-a0")
            except grpc.RpcError as e:
                self.errors.append((e.code(), e.details()))
                return
            self.completed += 1
            self.wrong += got != self.reference


class Attack(threading.Thread):
    """Runs `fn()` on a thread; `outcome` is its result or the RpcError's (code, details)."""

    def __init__(self, name: str, fn):
        super().__init__(daemon=True, name=name)
        self.fn, self.outcome = fn, None

    def run(self) -> None:
        try:
            self.outcome = ("ok", self.fn())
        except grpc.RpcError as e:
            self.outcome = (e.code(), e.details())


# --- 1-4: one tenant can no longer hurt the others ---------------------------------------------------


def test_four_tenants_stream_right_tokens_through_every_attack(stack):
    """The issue's must-show: four tenants' streams complete with their exact tokens while another
    tenant sends temperature=1e-40 and 1e-45, a 7.5 MB prompt, a 500,000-tensor bomb and a
    ReDoS pattern, all at once; the replica is never marked down (same epoch, still UP: no stall
    of REPLICA_TTL_S)."""
    manager, replica, admin, root = stack["manager"], stack["replica"], stack["admin"], stack["root"]
    greedy = generate(replica, md("mallory"), temperature=0)
    bomb = write_tensor_bomb(root / "bomb", stack["template"], BOMB_TENSORS)
    redos = write_variant(
        root / "redos", stack["template"], rank_pattern={REDOS_KEY: 4}, alpha_pattern={REDOS_KEY: 1.0}
    )
    epoch = replica_state(manager, admin, "r-hard").epoch
    streams = [TenantStream(replica, t) for t in TENANTS]
    for s in streams:
        s.start()

    def redos_everywhere():  # registered (the key matches nothing), then loaded by the replica
        register(manager.stub, "redos", redos, call_metadata=admin, tenant="mallory")
        load = pb.ClusterLoadAdapterRequest(adapter_id="redos", replica_id="r-hard")
        return manager.stub.LoadAdapter(load, timeout=TIMEOUT_S, metadata=admin).replica_id

    load_bomb = inference_pb2.LoadAdapterRequest(adapter_id="bomb", path=str(bomb))
    attacks = [
        Attack("1e-40", lambda: generate(replica, md("mallory"), temperature=1e-40)),
        Attack("1e-45", lambda: generate(replica, md("mallory"), temperature=1e-45, top_p=0.5)),
        Attack("7.5 MB prompt", lambda: list(replica.stub.Generate(
            inference_pb2.GenerateRequest(text="x" * 7_500_000), timeout=TIMEOUT_S, metadata=md("mallory")))),
        Attack("bomb at the manager", lambda: register(
            manager.stub, "bomb", bomb, call_metadata=admin, tenant="mallory")),
        Attack("bomb at the replica", lambda: replica.stub.LoadAdapter(
            load_bomb, timeout=TIMEOUT_S, metadata=admin)),
        Attack("ReDoS", redos_everywhere),
    ]  # fmt: skip
    for a in attacks:
        a.start()
    for a in attacks:
        a.join(TIMEOUT_S)
    wait_for(
        lambda: all(s.completed >= 2 for s in streams), "two requests of every tenant during the attacks"
    )
    for s in streams:
        s.stop.set()
        s.join(TIMEOUT_S)
    outcomes = {a.name: a.outcome for a in attacks}
    assert outcomes["1e-40"] == ("ok", greedy) and outcomes["1e-45"] == ("ok", greedy), outcomes
    code, details = outcomes["7.5 MB prompt"]
    assert code == INVALID and "7500000 characters cannot fit the prompt limit" in details, details
    for where in ("bomb at the manager", "bomb at the replica"):
        code, details = outcomes[where]
        assert code == INVALID and "tensors, so its header is at most" in details, (where, details)
    assert outcomes["ReDoS"] == ("ok", "r-hard"), outcomes["ReDoS"]
    for s in streams:
        assert not s.errors and s.wrong == 0, (s.tenant, s.errors, s.wrong)
    state = replica_state(manager, admin, "r-hard")
    assert state.status == pb.REPLICA_STATUS_UP and state.epoch == epoch  # never marked down
    print(f"\nstreams completed during the attacks: {[s.completed for s in streams]}")


def test_a_prompt_too_long_to_fit_is_refused_before_tokenizing(stack):
    """A text or chat prompt longer than the prompt limit x the longest token is refused naming
    the limit; shorter prompts are tokenized off the engine thread (a spy on the tokenizer records
    which threads call it: a test-only wrapper, there is no other way to see the thread)."""
    replica = stack["replica"]
    encoder = replica.on_engine(lambda engine: engine.prompt_encoder)
    threads: list[str] = []
    tokenizer = encoder.tokenizer
    original = tokenizer.encode

    def spy(text, add_special_tokens=True):
        threads.append(threading.current_thread().name)
        return original(text, add_special_tokens)

    replica.on_engine(lambda engine: setattr(tokenizer, "encode", spy))
    try:
        too_long = "y" * (encoder.max_chars + 1)
        for req in (
            inference_pb2.GenerateRequest(text=too_long),
            inference_pb2.GenerateRequest(
                messages=inference_pb2.ChatMessages(
                    messages=[inference_pb2.ChatMessage(role="user", content=too_long)]
                )
            ),
        ):
            code, details = code_of(
                lambda req=req: list(replica.stub.Generate(req, timeout=TIMEOUT_S, metadata=md("acme")))
            )
            assert code == INVALID and f"prompt limit of {encoder.max_tokens} tokens" in details, details
            assert f"send at most {encoder.max_chars}" in details
        assert threads == []  # refused before the tokenizer saw them
        ok = inference_pb2.GenerateRequest(text="hello", params=inference_pb2.SamplingParams(max_tokens=2))
        assert list(replica.stub.Generate(ok, timeout=TIMEOUT_S, metadata=md("acme")))
        assert threads and all(name.startswith("tokenize") for name in threads), threads
    finally:
        replica.on_engine(lambda engine: delattr(tokenizer, "encode"))


def test_stop_conditions_are_bounded(stack):
    """Stop strings and ids are checked for every token on the engine thread: a request with
    thousands of them would slow every step of every tenant, so they are bounded up front."""
    replica = stack["replica"]
    for params, fragment in (
        (dict(stop=[f"s{i}" for i in range(5000)]), "stop: 5000 stop strings; at most 16"),
        (dict(stop=["z" * 10_000]), "stop: stop strings must be 1..256 characters"),
        (dict(stop_token_ids=[1] * 5000), "stop_token_ids: 5000 ids; at most 256"),
    ):
        req = inference_pb2.GenerateRequest(
            token_ids=inference_pb2.TokenIds(ids=PROMPT), params=inference_pb2.SamplingParams(**params)
        )
        code, details = code_of(
            lambda req=req: list(replica.stub.Generate(req, timeout=TIMEOUT_S, metadata=md("acme")))
        )
        assert code == INVALID and details == fragment, details


def test_tensor_bombs_are_refused_from_the_header_length_and_count(stack):
    """Limits derived from the model: layers x LoRA-capable modules x 2, with room for the DoRA
    and bias entries refused by name. A header too long for them is refused from its first 8
    bytes; a short header listing too many tensors is refused before any entry is examined.
    Registry, upload and the replica's own load all refuse, with INVALID_ARGUMENT."""
    manager, replica, admin, root = stack["manager"], stack["replica"], stack["admin"], stack["root"]
    limits = HeaderLimits.for_model(stack["model"])
    assert limits.max_tensors == 2 * 7 * 2 * 2
    count_bomb = write_tensor_bomb(root / "count-bomb", stack["template"], limits.max_tensors + 1)
    assert (count_bomb / WEIGHTS_FILE).stat().st_size < limits.max_bytes  # passes the length check
    size_bomb = write_tensor_bomb(root / "size-bomb", stack["template"], 5_000)
    expected = {count_bomb: "an adapter of this model may list at most", size_bomb: "header is at most"}
    for directory, fragment in expected.items():
        code, details = code_of(register, manager.stub, directory.name, directory, call_metadata=admin)
        assert code == INVALID and fragment in details, details
        config, weights = (directory / CONFIG_FILE).read_bytes(), (directory / WEIGHTS_FILE).read_bytes()
        code, details = code_of(
            manager.stub.UploadAdapter, iter(upload_messages(directory.name, config, weights)), metadata=admin
        )
        assert code == INVALID and fragment in details, details
        request = inference_pb2.LoadAdapterRequest(adapter_id=directory.name, path=str(directory))
        code, details = code_of(replica.stub.LoadAdapter, request, metadata=admin)
        assert code == INVALID and fragment in details, details
    listed = manager.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=TIMEOUT_S, metadata=admin)
    assert not {a.adapter_id for a in listed.adapters} & {"count-bomb", "size-bomb"}


def upload_messages(adapter_id: str, config: bytes, weights: bytes, tenant: str = "", chunk: int = 1 << 20):
    yield pb.UploadAdapterRequest(
        header=pb.UploadHeader(adapter_id=adapter_id, adapter_config_json=config, tenant=tenant)
    )
    for i in range(0, len(weights), chunk):
        yield pb.UploadAdapterRequest(chunk=weights[i : i + chunk])


def test_pattern_keys_are_matched_in_linear_time_or_refused(stack):
    """rank_pattern keys are matched by RE2: the backtracking key of the report registers and loads
    at once; a key that still means what PEFT means changes the rank (and is honoured); keys RE2
    cannot run (backreferences, lookaround) and over-long keys are INVALID_ARGUMENT."""
    manager, replica, admin, root = stack["manager"], stack["replica"], stack["admin"], stack["root"]
    model = stack["model"]
    honoured = write_demo_adapter(
        root / "per-module", model, rank=8, seed=3, target_modules=("q_proj", "v_proj")
    )
    write_config(honoured, rank_pattern={REDOS_KEY: 2, r"layers\.\d+\.self_attn\.q_proj": 8}, r=8)
    record = register(manager.stub, "per-module", honoured, call_metadata=admin)
    assert record.rank == 8
    for key, fragment in (
        (r"(q)\1", "not a regular expression RE2 accepts"),
        (r"(?=q_proj)q", "not a regular expression RE2 accepts"),
        ("a" * 2000, "at most 1024"),
        (
            tuple(f"{i:04d}" + "b" * 996 for i in range(40)),
            "keys of 40000 characters; at most 1024 keys of 32768",
        ),
    ):
        keys = key if isinstance(key, tuple) else (key,)
        bad = write_variant(
            root / f"bad-{abs(hash(key))}", stack["template"], rank_pattern=dict.fromkeys(keys, 4)
        )
        code, details = code_of(register, manager.stub, bad.name, bad, call_metadata=admin)
        assert code == INVALID and fragment in details, details
        request = inference_pb2.LoadAdapterRequest(adapter_id=bad.name, path=str(bad))
        code, details = code_of(replica.stub.LoadAdapter, request, metadata=admin)
        assert code == INVALID and fragment in details, details


# --- 5: watchers ---------------------------------------------------------------------------------------


def test_150_watchers_leave_every_other_rpc_working(loop, stack, model_dir):
    """150 WatchEvents streams against a manager (max_watchers=120, Redis RPC pool of 20): 120
    are served from the watchers' own pool and see new events, 30 are RESOURCE_EXHAUSTED naming
    the limit, and every other RPC keeps working meanwhile, the heartbeats of a replica included:
    it stays UP in the same epoch (before, ~110 watchers took the one pool, every RPC failed
    UNAVAILABLE and replicas were marked DOWN)."""
    tmp, root, tokens = stack["tmp"], stack["root"], stack["tokens"]
    config = manager_config(
        stack["redis"].url,
        tmp / "w",
        root,
        model_dir,
        cluster="watchers",
        replica_ttl_s=REPLICA_TTL_S,
        max_watchers=120,
        redis_max_connections=20,
    )
    security = SecurityConfig(auth_tokens=str(tokens.path))
    manager = ManagerHandle(loop, config, security)
    admin = tokens.md("admin")
    calls, firsts, replica = [], [], None
    try:
        replica = authenticated_replica(manager, model_dir, "r-watch", tokens)
        joined = replica_state(manager, admin, "r-watch")
        calls = [manager.stub.WatchEvents(pb.WatchEventsRequest(), metadata=admin) for _ in range(150)]
        wait_for(lambda: manager.manager.catalog.watchers == 120, "120 watchers admitted", interval=0.1)
        readers = [Attack(f"watcher-{i}", lambda c=c: next(c).type) for i, c in enumerate(calls)]
        for r in readers:
            r.start()
        for i in range(3):  # every other RPC, while the watchers hold their pool
            register(manager.stub, f"w-{i}", root / "acme-a0", call_metadata=admin, tenant="acme")
            assert manager.stub.GetAdapter(
                pb.GetAdapterRequest(adapter_id=f"w-{i}"), timeout=TIMEOUT_S, metadata=admin
            )
        listed = manager.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=TIMEOUT_S, metadata=admin)
        assert {f"w-{i}" for i in range(3)} <= {a.adapter_id for a in listed.adapters}
        manager.stub.GetClusterState(pb.GetClusterStateRequest(), timeout=TIMEOUT_S, metadata=admin)
        for r in readers:
            r.join(TIMEOUT_S)
        firsts = [r.outcome for r in readers]
        served = [o for o in firsts if o == ("ok", "registered")]
        refused = [o for o in firsts if o[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert len(served) == 120 and len(refused) == 30, firsts
        assert all("max_watchers=120" in details for _, details in refused)
        # two more heartbeats land while the 120 watchers still hold their pool
        beats = {joined.last_heartbeat_ms}

        def two_more_heartbeats() -> bool:
            beats.add(replica_state(manager, admin, "r-watch").last_heartbeat_ms)
            return len(beats) >= 3

        wait_for(two_more_heartbeats, "two more heartbeats", interval=0.2)
        assert manager.manager.catalog.watchers == 120
        state = replica_state(manager, admin, "r-watch")
        assert state.status == pb.REPLICA_STATUS_UP and state.epoch == joined.epoch
    finally:
        for c in calls:
            c.cancel()
        wait_for(lambda: manager.manager.catalog.watchers == 0, "the watchers to close")
        if replica is not None:
            replica.close()
        manager.close()


# --- 11: codes ------------------------------------------------------------------------------------------


def raw_call(channel: grpc.Channel, path: str, payload: bytes, metadata, stream: bool = False):
    """Send `payload` as the request bytes of `path`, unparsed (so it can be invalid protobuf)."""
    kind = channel.unary_stream if stream else channel.unary_unary
    call = kind(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    result = call(payload, metadata=metadata, timeout=TIMEOUT_S)
    return list(result) if stream else result


def invalid_utf8_string(field: int, value: bytes = b"ad-\xff\xfe") -> bytes:
    """A length-delimited field `field` holding `value`: invalid UTF-8 for a proto3 string."""
    return bytes([field << 3 | 2, len(value)]) + value


def test_wrong_codes_are_now_invalid_argument(stack):
    manager, replica, admin, root = stack["manager"], stack["replica"], stack["admin"], stack["root"]
    template = stack["template"]
    # deeply nested JSON: in adapter_config.json, in chat_template_kwargs, in the safetensors header
    nested = write_variant(root / "nested-config", template)
    (nested / CONFIG_FILE).write_text("[" * 50_000 + "]" * 50_000)
    code, details = code_of(register, manager.stub, "nested-config", nested, call_metadata=admin)
    assert code == INVALID and "nests JSON too deeply" in details, details
    deep_header = write_variant(root / "nested-header", template)
    write_header_only(deep_header / WEIGHTS_FILE, b'{"a":' + b"[" * 5_000 + b"]" * 5_000 + b"}")
    code, details = code_of(register, manager.stub, "nested-header", deep_header, call_metadata=admin)
    assert code == INVALID and "nests JSON too deeply" in details, details
    chat = inference_pb2.GenerateRequest(
        messages=inference_pb2.ChatMessages(
            messages=[inference_pb2.ChatMessage(role="user", content="hi")],
            chat_template_kwargs="[" * 50_000 + "]" * 50_000,
        )
    )
    code, details = code_of(lambda: list(replica.stub.Generate(chat, timeout=TIMEOUT_S, metadata=md("acme"))))
    assert code == INVALID and "nests too deeply" in details, details
    # WatchEvents after_id that is no event id; ListAdapters with a state number that is no state
    code, details = code_of(
        lambda: next(manager.stub.WatchEvents(pb.WatchEventsRequest(after_id="not-an-id"), metadata=admin))
    )
    assert code == INVALID and "not an event id" in details, details
    code, details = code_of(manager.stub.ListAdapters, pb.ListAdaptersRequest(state=99), metadata=admin)
    assert code == INVALID and "state 99 is not an adapter state" in details, details
    # invalid UTF-8 in a string field, unary, server-streaming and client-streaming, both services
    utf8 = "string fields must be valid UTF-8"
    for call in (
        lambda: raw_call(
            manager.channel, "/loraserve.v1.AdapterService/GetAdapter", invalid_utf8_string(1), admin
        ),
        lambda: raw_call(
            manager.channel,
            "/loraserve.v1.AdapterService/WatchEvents",
            invalid_utf8_string(2),
            admin,
            stream=True,
        ),
        lambda: raw_call(
            replica.channel,
            "/loraserve.v1.InferenceService/Generate",
            invalid_utf8_string(2),
            md("acme"),
            stream=True,
        ),
        lambda: raw_call(
            replica.channel, "/loraserve.v1.InferenceService/EvictAdapter", invalid_utf8_string(1), admin
        ),
    ):
        code, details = code_of(call)
        assert code == INVALID and utf8 in details, details
    upload = manager.channel.stream_unary(
        "/loraserve.v1.AdapterService/UploadAdapter",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    header = bytes([1 << 3 | 2, len(invalid_utf8_string(1))]) + invalid_utf8_string(1)  # header = 1
    code, details = code_of(upload, iter([header]), metadata=admin, timeout=TIMEOUT_S)
    assert code == INVALID and utf8 in details, details
    # a config too big to ever be fetched is refused when it is registered, not when it is loaded
    big = write_variant(root / "big-config", template, padding="p" * (9 * 1024 * 1024))
    code, details = code_of(register, manager.stub, "big-config", big, call_metadata=admin)
    assert code == INVALID and f"may be at most {MAX_CONFIG_BYTES} bytes" in details, details
    config = json.dumps(
        {**json.loads((template / CONFIG_FILE).read_text()), "padding": "p" * (2 << 20)}
    ).encode()
    weights = (template / WEIGHTS_FILE).read_bytes()
    code, details = code_of(
        manager.stub.UploadAdapter, iter(upload_messages("big-upload", config, weights)), metadata=admin
    )
    assert code == INVALID and f"may be at most {MAX_CONFIG_BYTES} bytes" in details, details


def test_internal_errors_carry_a_reference_not_the_text(stack, monkeypatch, caplog):
    """A bug's text (paths, secrets) stays in the log; the client gets a reference to find it.
    The bug is injected (monkeypatch): the manager has no real one to trigger on purpose."""
    manager, admin = stack["manager"], stack["admin"]

    async def broken(*args, **kwargs):
        raise RuntimeError("secret /srv/keys/acme.pem")

    monkeypatch.setattr(manager.manager.catalog, "get", broken)
    code, details = code_of(
        manager.stub.GetAdapter, pb.GetAdapterRequest(adapter_id="acme-a0"), metadata=admin
    )
    assert code == grpc.StatusCode.INTERNAL and "secret" not in details and "RuntimeError" not in details
    reference = re.search(r"reference ([0-9a-f]{12})", details).group(1)
    assert f"[ref {reference}]" in caplog.text and "secret /srv/keys/acme.pem" in caplog.text


# --- 12: ids, metadata, tenants ----------------------------------------------------------------------


def test_ids_metadata_and_tenant_conflicts(stack):
    manager, replica, admin, root = stack["manager"], stack["replica"], stack["admin"], stack["root"]
    files = root / "acme-a0"
    for fields, fragment in (
        (dict(adapter_id="acme-a0\n"), "adapter_id 'acme-a0\\n' must match"),
        (dict(adapter_id="fresh", tenant="acme\n"), "tenant 'acme\\n' must match"),
        (dict(adapter_id="fresh", metadata={"note": "a\x00b"}), "control character U+0000"),
        (dict(adapter_id="fresh", metadata={"note": "\x1b[31mred\x1b[0m"}), "control character U+001B"),
        (dict(adapter_id="fresh", metadata={"k\ney": "v"}), "control character U+000A"),
    ):
        request = pb.RegisterAdapterRequest(path=str(files), **fields)
        code, details = code_of(manager.stub.RegisterAdapter, request, metadata=admin)
        assert code == INVALID and fragment in details, (fields, details)
    code, details = code_of(
        replica.stub.LoadAdapter,
        inference_pb2.LoadAdapterRequest(adapter_id="x\n", path=str(files)),
        metadata=admin,
    )
    assert code == INVALID and "adapter_id: 'x\\n' must match" in details, details
    # the same files under the same id: idempotent for their tenant, refused for another
    again = register(manager.stub, "acme-a0", files, call_metadata=admin, tenant="acme")
    assert again.tenant == "acme"
    code, details = code_of(register, manager.stub, "acme-a0", files, call_metadata=admin, tenant="globex")
    assert code == grpc.StatusCode.ALREADY_EXISTS, details
    assert "already registered for tenant 'acme', not 'globex'" in details
    record = manager.stub.GetAdapter(
        pb.GetAdapterRequest(adapter_id="acme-a0"), timeout=TIMEOUT_S, metadata=admin
    )
    assert record.tenant == "acme"
