"""Special tokens, stop ids and sampling defaults the way the checkpoint says (issue 13, item 4),
and chat prompts encoded from the checkpoint's files (item 5).

The oracle is transformers' tokenizer on the same files; tokenizers are built with the `tokenizers`
library (byte-level, special tokens, a BOS post-processor) and models are the tiny demo model.
"""

import json
import shutil

import grpc
import pytest

from inference_svc.demo_model import TINY_SHAPE, write_demo_model
from inference_svc.errors_grpc import status_for
from inference_svc.generation import sampling_params_from
from inference_svc.generation_config import GenerationConfig
from inference_svc.sampling import SamplingParams
from inference_svc.tokenizer import ChatPrompt, TextPrompt, encode_prompt, load_tokenizer
from loraserve.errors import ChatTemplateError, InvalidModel
from loraserve.v1 import inference_pb2

from chat_templates import CONVERSATIONS, FAMILIES
from helpers import run_to_completion, tiny_engine, tokens_of
from oracles import write_tokenizer_files

TEXTS = ["Hello world", "<s>already a BOS", "Grüße 🚀", ""]


def auto_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def fast_tokenizer(path, **kwargs):
    """transformers' fast tokenizer on tokenizer.json with explicit settings (update_post_processor)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), **kwargs)


@pytest.fixture(scope="module")
def bos_model(tmp_path_factory):
    """The tiny model with a tokenizer whose post-processor prepends <s> (id 256), as Llama's does."""
    model_dir = write_demo_model(tmp_path_factory.mktemp("bos") / "model", **TINY_SHAPE)
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": FAMILIES["llama2"][0]}
    write_tokenizer_files(model_dir, ["<s>", "</s>"], config, bos="<s>")
    return model_dir


def engine_prompt_ids(engine, prompt) -> list[int]:
    """The ids the engine queues for a prompt (the request is aborted at once)."""
    engine.add_request("probe", prompt, SamplingParams(max_tokens=1))
    ids = list(engine.sequences["probe"].prompt_ids)
    engine.abort_request("probe")
    return ids


def test_the_engine_encodes_text_as_transformers_does(bos_model, adapter_root):
    engine = tiny_engine(bos_model, adapter_root)
    hf = auto_tokenizer(bos_model)
    for text in TEXTS[:3]:
        with_bos = hf(text, add_special_tokens=True)["input_ids"]
        assert with_bos[0] == 256
        assert engine_prompt_ids(engine, text) == with_bos  # a plain text prompt: the checkpoint's way
        assert engine_prompt_ids(engine, TextPrompt(text, add_special_tokens=True)) == with_bos
        assert (
            engine_prompt_ids(engine, TextPrompt(text, add_special_tokens=False))
            == hf(text, add_special_tokens=False)["input_ids"]
        )


def test_chat_ids_equal_apply_chat_template(bos_model, adapter_root):
    """Rendered chat is encoded without special tokens again: one BOS, the template's."""
    engine = tiny_engine(bos_model, adapter_root)
    hf = auto_tokenizer(bos_model)
    messages = CONVERSATIONS["system_and_history"]
    want = hf.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert want.count(256) == 2  # [INST] templates write <s> before every user turn
    assert engine_prompt_ids(engine, ChatPrompt(tuple(messages))) == want


@pytest.mark.parametrize(
    ("flags", "post_processor_bos"),
    [
        ({"add_bos_token": True}, None),  # Mistral / Llama 2 style: the config asks for BOS
        ({"add_bos_token": True, "add_eos_token": True}, None),
        ({"add_bos_token": False}, "<s>"),  # an explicit false overrides the post-processor
    ],
)
def test_tokenizer_config_flags_rebuild_the_post_processor(tmp_path, flags, post_processor_bos):
    config = {"bos_token": "<s>", "eos_token": "</s>", **flags}
    write_tokenizer_files(tmp_path, ["<s>", "</s>"], config, bos=post_processor_bos)
    ours = load_tokenizer(tmp_path)
    hf = fast_tokenizer(tmp_path, bos_token="<s>", eos_token="</s>", **flags)
    for text in TEXTS:
        for special in (True, False):
            assert ours.encode(text, special) == hf(text, add_special_tokens=special)["input_ids"], (
                text,
                special,
            )


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_familys_files_give_transformers_text_and_ids(tmp_path, family):
    template, named, extra = FAMILIES[family]
    bos = named.get("bos_token")
    write_tokenizer_files(tmp_path, [*named.values(), *extra], {**named, "chat_template": template}, bos=bos)
    ours, hf = load_tokenizer(tmp_path), auto_tokenizer(tmp_path)
    assert ours.config.special_tokens == hf.special_tokens_map
    assert ours.eos_token_ids == (hf.eos_token_id,)
    for messages in CONVERSATIONS.values():
        for generation_prompt in (True, False):
            prompt = ChatPrompt(tuple(messages), generation_prompt)
            kwargs = dict(add_generation_prompt=generation_prompt)
            want_ids = hf.apply_chat_template(messages, **kwargs)["input_ids"]
            assert encode_prompt(ours, prompt) == want_ids
            text = hf.apply_chat_template(messages, tokenize=False, **kwargs)
            assert encode_prompt(ours, TextPrompt(text, add_special_tokens=False)) == want_ids


def test_chat_template_jinja_and_named_templates(tmp_path):
    """chat_template.jinja wins over tokenizer_config.json; of named templates, "default" is used."""
    messages = CONVERSATIONS["one_user_turn"]
    named = [
        {"name": "tool_use", "template": "T"},
        {"name": "default", "template": "D:{{ messages[0].content }}"},
    ]
    write_tokenizer_files(tmp_path, ["<s>"], {"bos_token": "<s>", "chat_template": named})
    for file_template, text in (
        (None, "D:Hello!"),
        ("J:{{ bos_token }}{{ messages[0].content }}", "J:<s>Hello!"),
    ):
        if file_template is not None:
            (tmp_path / "chat_template.jinja").write_text(file_template)
        ours, hf = load_tokenizer(tmp_path), auto_tokenizer(tmp_path)
        assert hf.apply_chat_template(messages, tokenize=False) == text
        assert (
            encode_prompt(ours, ChatPrompt(tuple(messages))) == hf.apply_chat_template(messages)["input_ids"]
        )


def test_a_model_without_a_chat_template_refuses_chat(tmp_path, adapter_root):
    model_dir = write_demo_model(tmp_path / "model", **TINY_SHAPE)
    (model_dir / "tokenizer_config.json").unlink()
    engine = tiny_engine(model_dir, adapter_root)
    with pytest.raises(ChatTemplateError, match="the model has no chat template") as caught:
        engine.add_request("r", ChatPrompt(({"role": "user", "content": "hi"},)), SamplingParams())
    assert status_for(caught.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert not engine.sequences


# --- end-of-sequence ids -------------------------------------------------------------------------

PROMPT, MAX_TOKENS = "Hello", 12


@pytest.fixture(scope="module")
def greedy_run(model_dir, adapter_root):
    """What the tiny model generates greedily for PROMPT when nothing stops it."""
    engine = tiny_engine(model_dir, adapter_root)
    engine.add_request("r", PROMPT, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    return tokens_of(run_to_completion(engine)["r"])


def stop_case(greedy: list[int]) -> tuple[int, int, int]:
    """(a token the model emits first at position k >= 1, k, a byte token it never emits)."""
    k = next(i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i])
    never = min(set(range(256)) - set(greedy))
    return greedy[k], k, never


def copy_with(model_dir, dest, generation_config=None, eos_token=None):
    shutil.copytree(model_dir, dest)
    if generation_config is not None:
        (dest / "generation_config.json").write_text(json.dumps(generation_config))
    if eos_token is not None:
        config = json.loads((dest / "tokenizer_config.json").read_text())
        (dest / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": eos_token}))
    return dest


def generate(engine, **params):
    engine.add_request("r", PROMPT, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, **params))
    outputs = run_to_completion(engine)["r"]
    return tokens_of(outputs), outputs[-1].finish_reason


@pytest.mark.parametrize("where", ["first", "second", "alone"])
def test_a_request_stops_at_any_generation_config_eos_id(
    tmp_path, model_dir, adapter_root, greedy_run, where
):
    target, k, never = stop_case(greedy_run)
    eos = {"first": [target, never], "second": [never, target], "alone": target}[where]
    engine = tiny_engine(copy_with(model_dir, tmp_path / "m", {"eos_token_id": eos}), adapter_root)
    assert {target, 257} <= engine.eos_token_ids  # config.json's EOS (257) still counts

    assert generate(engine) == (greedy_run[: k + 1], "stop")
    assert generate(engine, ignore_eos=True) == (greedy_run, "length")


def test_the_tokenizers_eos_token_stops_too(tmp_path, model_dir, adapter_root, greedy_run):
    from tokenizers import pre_tokenizers

    target, k, _ = stop_case(greedy_run)
    token_text = sorted(pre_tokenizers.ByteLevel.alphabet())[target]  # the demo vocabulary's order
    engine = tiny_engine(copy_with(model_dir, tmp_path / "m", eos_token=token_text), adapter_root)
    assert engine.tokenizer.eos_token_ids == (target,)
    assert generate(engine) == (greedy_run[: k + 1], "stop")


# --- generation_config.json sampling defaults ----------------------------------------------------


def test_generation_config_is_read_as_vllm_does(tmp_path):
    assert GenerationConfig.from_dir(tmp_path) == GenerationConfig()
    raw = {
        "eos_token_id": [128001, 128008, 128009],
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.05,
        "max_new_tokens": 256,
        "do_sample": True,  # ignored, as vLLM ignores it
        "max_length": 4096,  # ignored
        "bos_token_id": 128000,
    }
    (tmp_path / "generation_config.json").write_text(json.dumps(raw))
    config = GenerationConfig.from_dir(tmp_path)
    assert config.eos_token_ids == (128001, 128008, 128009)
    assert dict(config.sampling_defaults) == {
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.05,
        "max_tokens": 256,
    }
    for bad in ({"top_k": "20"}, {"eos_token_id": ["</s>"]}, {"temperature": True}, {"max_new_tokens": 2.5}):
        (tmp_path / "generation_config.json").write_text(json.dumps(bad))
        with pytest.raises(InvalidModel, match="generation_config.json"):
            GenerationConfig.from_dir(tmp_path)


def test_unset_fields_take_the_checkpoint_defaults_and_set_fields_win():
    checkpoint = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "max_tokens": 256}
    unset = sampling_params_from(inference_pb2.SamplingParams(), checkpoint)
    assert unset == SamplingParams(temperature=0.6, top_p=0.9, top_k=20, min_p=0.05, max_tokens=256)
    explicit = inference_pb2.SamplingParams(temperature=0, top_p=1.0, top_k=0, min_p=0, max_tokens=8)
    assert sampling_params_from(explicit, checkpoint) == SamplingParams(max_tokens=8, temperature=0.0)
    assert sampling_params_from(inference_pb2.SamplingParams()) == SamplingParams()  # no file: engine's
