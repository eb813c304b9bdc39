"""The official `openai` client against a running replica: models, completions and chat
completions for the base model and an adapter, streaming and not, with logprobs; the tokens are
the ones gRPC Generate streams for the same request and seed. The README's examples run too."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from inference_svc.tokenizer import ChatPrompt
from loraserve.v1 import inference_pb2

from harness import TIMEOUT_S, request
from http_clients import client

MAX_TOKENS = 6
SAMPLED = dict(temperature=0.9, top_p=0.95, seed=1234)  # sampled, yet reproducible by the seed
IDS = {"return_tokens_as_token_ids": True, "ignore_eos": True}  # vLLM's extensions: ids as "token_id:N"
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is LoRA?"}]


def grpc_tokens(server, req: inference_pb2.GenerateRequest) -> tuple[list[int], list[float], str]:
    """(token ids, logprobs, text) that gRPC Generate streams for `req`."""
    responses = list(server.stub.Generate(req, timeout=TIMEOUT_S))
    ids = [t for r in responses for t in r.token_ids]
    return ids, [lp for r in responses for lp in r.logprobs], "".join(r.text for r in responses)


def ids_of(tokens: list[str]) -> list[int]:
    assert all(t.startswith("token_id:") for t in tokens)
    return [int(t.removeprefix("token_id:")) for t in tokens]


def test_models_lists_the_base_model_and_every_adapter(served):
    models = client(served).models.list().data
    assert [m.id for m in models] == ["tiny", *(f"demo-{i}" for i in range(8))]
    assert all(m.object == "model" and m.created > 0 and m.owned_by == "loraserve" for m in models)
    assert models[0].parent is None
    assert {m.parent for m in models[1:]} == {"tiny"}


@pytest.mark.parametrize("model", ["tiny", "demo-3"])
@pytest.mark.parametrize("stream", [False, True])
def test_completion_equals_grpc_generate(served, model, stream):
    api = client(served)
    asked = dict(model=model, prompt="Hello there", max_tokens=MAX_TOKENS, logprobs=2, extra_body=IDS)
    if stream:
        chunks = list(
            api.completions.create(stream=True, stream_options={"include_usage": True}, **asked, **SAMPLED)
        )
        *choices, usage_chunk = chunks
        assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == MAX_TOKENS
        text = "".join(c.choices[0].text for c in choices)
        tokens = [t for c in choices for t in c.choices[0].logprobs.tokens]
        logprobs = [lp for c in choices for lp in c.choices[0].logprobs.token_logprobs]
        top = [t for c in choices for t in c.choices[0].logprobs.top_logprobs]
        finish = choices[-1].choices[0].finish_reason
        assert all(c.choices[0].finish_reason is None for c in choices[:-1])
    else:
        answer = api.completions.create(**asked, **SAMPLED)
        (choice,) = answer.choices
        text, finish = choice.text, choice.finish_reason
        tokens, logprobs, top = (
            choice.logprobs.tokens,
            choice.logprobs.token_logprobs,
            choice.logprobs.top_logprobs,
        )
        assert answer.model == model and answer.object == "text_completion" and answer.id.startswith("cmpl-")
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (
            len("Hello there"),
            MAX_TOKENS,
        )
    adapter = "" if model == "tiny" else model
    want = grpc_tokens(
        served,
        request("Hello there", adapter, max_tokens=MAX_TOKENS, logprobs=2, ignore_eos=True, **SAMPLED),
    )
    assert (ids_of(tokens), text) == (want[0], want[2])
    assert logprobs == pytest.approx(want[1], abs=1e-6)
    assert all(len(alternatives) == 2 for alternatives in top)
    assert finish == "length"


@pytest.mark.parametrize("model", ["tiny", "demo-5"])
@pytest.mark.parametrize("stream", [False, True])
def test_chat_completion_equals_grpc_generate(served, model, stream):
    api = client(served)
    asked = dict(model=model, messages=MESSAGES, max_completion_tokens=MAX_TOKENS, extra_body=IDS)
    asked.update(logprobs=True, top_logprobs=3, **SAMPLED)
    if stream:
        chunks = list(api.chat.completions.create(stream=True, **asked))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        entries = [e for c in chunks for e in c.choices[0].logprobs.content]
        finish = chunks[-1].choices[0].finish_reason
    else:
        answer = api.chat.completions.create(**asked)
        (choice,) = answer.choices
        assert choice.message.role == "assistant" and answer.object == "chat.completion"
        assert answer.id.startswith("chatcmpl-") and answer.usage.completion_tokens == MAX_TOKENS
        text, entries, finish = choice.message.content, choice.logprobs.content, choice.finish_reason
    adapter = "" if model == "tiny" else model
    req = inference_pb2.GenerateRequest(
        adapter_id=adapter,
        messages=inference_pb2.ChatMessages(messages=[inference_pb2.ChatMessage(**m) for m in MESSAGES]),
        params=inference_pb2.SamplingParams(max_tokens=MAX_TOKENS, logprobs=3, ignore_eos=True, **SAMPLED),
    )
    ids, logprobs, want_text = grpc_tokens(served, req)
    assert (ids_of([e.token for e in entries]), text) == (ids, want_text)
    assert [e.logprob for e in entries] == pytest.approx(logprobs, abs=1e-6)
    assert all(len(e.top_logprobs) == 3 for e in entries)
    assert finish == "length"


def test_chat_goes_through_the_chat_template(served):
    """The prompt is the template's rendering: its usage counts what the offline engine encodes."""
    answer = client(served).chat.completions.create(model="demo-1", messages=MESSAGES, max_tokens=2)

    def prompt_tokens(engine):
        from inference_svc.tokenizer import encode_prompt

        return len(encode_prompt(engine.tokenizer, ChatPrompt(tuple(MESSAGES))))

    assert answer.usage.prompt_tokens == served.on_engine(prompt_tokens)


def test_token_id_prompts_stop_strings_and_text_logprobs(served):
    api = client(served)
    greedy = dict(model="demo-2", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    whole = api.completions.create(prompt=[5, 6, 7, 8], logprobs=0, **greedy)
    ids, _, text = grpc_tokens(
        served, request([5, 6, 7, 8], "demo-2", max_tokens=8, temperature=0, ignore_eos=True)
    )
    assert whole.choices[0].text == text and whole.usage.prompt_tokens == 4
    logprobs = whole.choices[0].logprobs
    assert logprobs.tokens == served.on_engine(lambda engine: [engine.tokenizer.decode([i]) for i in ids])
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(ids))]
    stop = next(c for c in text[2:] if c.strip())
    stopped = api.completions.create(prompt=[5, 6, 7, 8], stop=[stop], **greedy)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop)]


def test_the_readme_examples_work(served, capsys):
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index("## OpenAI-compatible HTTP API") :]
    section = section[: section.index("\n## ", 1)]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    exec(compile(code.replace("http://localhost:8000/v1", served.http_url), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith("['tiny', 'demo-0'") and "completion_tokens=8" in out
    (shell,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    curls = [line for line in shell.replace("\\\n", " ").splitlines() if line.startswith("curl ")]
    assert len(curls) == 3
    for line in curls:
        done = subprocess.run(
            shlex.split(line.replace("localhost:8000", served.http_url.removesuffix("/v1"))),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        assert done.returncode == 0 and done.stdout.strip() and '"error"' not in done.stdout, done.stdout
