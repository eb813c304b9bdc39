"""Chat prompts and the checkpoint's generation defaults over a real loopback gRPC connection.

The served model is the tiny demo model (its tokenizer_config.json carries a Zephyr-style chat
template that calls `raise_exception` for unknown roles) with a generation_config.json that makes
decoding greedy and 6 tokens long unless a request says otherwise.
"""

import json
import re

import grpc
import pytest

from entrypoints.cli import main as cli_main
from inference_svc.sampling import SamplingParams
from inference_svc.tokenizer import ChatPrompt
from loraserve.v1 import inference_pb2

from harness import TIMEOUT_S, offline_engine, write_model_and_adapters

CHECKPOINT_MAX_TOKENS = 6
HISTORY = [
    ("system", "Answer briefly."),
    ("user", "What is LoRA?"),
    ("assistant", "Low-rank adapters."),
    ("user", "And many at once?"),
]


@pytest.fixture(scope="module")
def grpc_model(tmp_path_factory):
    """The model and adapters `served` serves here: the conftest's, with a generation_config.json."""
    model_dir, adapters = write_model_and_adapters(tmp_path_factory.mktemp("chat"))
    generation_config = {"temperature": 0.0, "max_new_tokens": CHECKPOINT_MAX_TOKENS}
    (model_dir / "generation_config.json").write_text(json.dumps(generation_config))
    return model_dir, adapters


@pytest.fixture(scope="module")
def offline(grpc_model):
    return offline_engine(*grpc_model)


def chat_request(turns, adapter_id="", **chat) -> inference_pb2.GenerateRequest:
    messages = [inference_pb2.ChatMessage(role=r, content=c) for r, c in turns]
    return inference_pb2.GenerateRequest(
        adapter_id=adapter_id,
        messages=inference_pb2.ChatMessages(messages=messages, **chat),
        params=inference_pb2.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
    )


def collect(stub, req) -> tuple[list[int], inference_pb2.GenerateResponse]:
    messages = list(stub.Generate(req, timeout=TIMEOUT_S))
    return [t for m in messages for t in m.token_ids], messages[-1]


def hf_chat_ids(model_dir, turns, add_generation_prompt=True) -> list[int]:
    from transformers import AutoTokenizer

    messages = [{"role": r, "content": c} for r, c in turns]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)["input_ids"]


@pytest.mark.parametrize("adapter_id", ["", "demo-1"])
def test_messages_generate_what_the_offline_engine_does(served, offline, grpc_model, adapter_id):
    tokens, last = collect(served.stub, chat_request(HISTORY, adapter_id))
    prompt = ChatPrompt(tuple({"role": r, "content": c} for r, c in HISTORY))
    want = offline.generate(
        [prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), [adapter_id or None]
    )
    assert tokens == want[0].token_ids
    assert last.usage.prompt_tokens == len(hf_chat_ids(grpc_model[0], HISTORY))

    _, last = collect(served.stub, chat_request(HISTORY, adapter_id, add_generation_prompt=False))
    assert last.usage.prompt_tokens == len(hf_chat_ids(grpc_model[0], HISTORY, add_generation_prompt=False))
    assert last.usage.prompt_tokens == len(hf_chat_ids(grpc_model[0], HISTORY)) - len("<|assistant|>\n")


@pytest.mark.parametrize(
    ("req", "details"),
    [
        (
            chat_request([("user", "hi"), ("tool", "42")]),
            "chat template: unknown role tool: use system, user or assistant",  # raise_exception's message
        ),
        (chat_request([]), "messages: must contain at least one message"),
        (
            chat_request([("user", "hi")], chat_template_kwargs="{not json"),
            "messages.chat_template_kwargs: not valid JSON",
        ),
        (
            chat_request([("user", "hi")], chat_template_kwargs='{"messages": []}'),
            "chat template: chat_template_kwargs may not set ['messages']",
        ),
    ],
)
def test_template_errors_are_invalid_argument(served, req, details):
    with pytest.raises(grpc.RpcError) as caught:
        collect(served.stub, req)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(details)
    assert served.on_engine(lambda engine: not engine.has_unfinished_requests())


def test_generation_config_defaults_apply_when_unset(served, offline):
    unset = inference_pb2.GenerateRequest(text="Hello", params=inference_pb2.SamplingParams(ignore_eos=True))
    tokens, last = collect(served.stub, unset)
    greedy = SamplingParams(max_tokens=CHECKPOINT_MAX_TOKENS, temperature=0, ignore_eos=True)
    assert tokens == offline.generate(["Hello"], greedy)[0].token_ids  # greedy and 6 tokens: the file's
    assert last.finish_reason == inference_pb2.FINISH_REASON_LENGTH

    set_fields = inference_pb2.GenerateRequest(
        text="Hello",
        params=inference_pb2.SamplingParams(max_tokens=3, temperature=1.0, seed=7, ignore_eos=True),
    )
    tokens, _ = collect(served.stub, set_fields)
    sampled = SamplingParams(max_tokens=3, temperature=1.0, seed=7, ignore_eos=True)
    assert tokens == offline.generate(["Hello"], sampled)[0].token_ids  # the request's values win


def test_cli_generate_chat(served, grpc_model, capsys):
    argv = ["generate", "--replica", served.address, "--max-tokens", "4", "--ignore-eos"]
    code = cli_main([*argv, "--chat", "--system", "Answer briefly.", "What is LoRA?"])
    _, err = capsys.readouterr()
    assert code == 0, err
    n_prompt = len(hf_chat_ids(grpc_model[0], [("system", "Answer briefly."), ("user", "What is LoRA?")]))
    assert re.search(rf"\[base model: {n_prompt} prompt \+ 4 tokens, finish length", err), err

    with pytest.raises(SystemExit) as exited:
        cli_main([*argv, "--system", "Answer briefly.", "What is LoRA?"])
    assert exited.value.code == 2
    assert "--system needs --chat" in capsys.readouterr().err
