"""Chat rendering (`loraserve.chat_template`) against transformers' `apply_chat_template`.

Six families' templates, with a system message and multi-turn history and with one user turn,
with and without the generation prompt; then the environment's details one by one (globals,
filters, whitespace control, sandbox) and the errors a template can raise.
"""

import pytest

from loraserve.chat_template import pick_template, render_chat
from loraserve.errors import ChatTemplateError, InvalidArgument

from chat_templates import CHATML, CONVERSATIONS, FAMILIES
from oracles import byte_level_tokenizer


def hf_tokenizer(template: str, named: dict[str, str], extra: list[str] = ()):
    from transformers import PreTrainedTokenizerFast

    tok = byte_level_tokenizer([*named.values(), *extra])
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **named)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rendering_equals_transformers(family, conversation, add_generation_prompt):
    template, named, extra = FAMILIES[family]
    hf = hf_tokenizer(template, named, extra)
    messages = CONVERSATIONS[conversation]
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    got = render_chat(template, messages, add_generation_prompt, hf.special_tokens_map)
    assert got == want
    if add_generation_prompt and "add_generation_prompt" in template:  # [INST] templates ignore it
        assert got != render_chat(template, messages, False, hf.special_tokens_map)


def test_template_variables_reach_the_template_and_override_special_tokens():
    named = {"eos_token": "<|im_end|>"}
    hf = hf_tokenizer(CHATML, named, ["<|im_start|>"])
    messages = CONVERSATIONS["one_user_turn"]
    for variables in ({"enable_thinking": False}, {"enable_thinking": True}, {"eos_token": "<override>"}):
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **variables)
        assert render_chat(CHATML, messages, True, named, variables) == want
    assert render_chat(CHATML, messages, True, named, {"enable_thinking": False}).endswith("</think>\n\n")


ENVIRONMENT_TEMPLATES = {
    # tojson without HTML escaping, with its options
    "tojson": "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2, sort_keys=True) }}",
    # trim_blocks and lstrip_blocks
    "whitespace": "  {% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}\n",
    # loopcontrols, namespace() and dict()
    "globals": (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}{{ dict(a=1) | tojson }}{{ dict.fromkeys(['x']) | tojson }}"
    ),
    # transformers' {% generation %} marker renders its body
    "generation": "{% for m in messages %}{% generation %}<{{ m.content }}>{% endgeneration %}{% endfor %}",
    # what is passed besides messages
    "variables": "{{ tools is none }} {{ documents is none }} {{ add_generation_prompt }} {{ bos_token }}",
    "strftime_now": "{{ strftime_now('%Y') }}",
}


@pytest.mark.parametrize("name", sorted(ENVIRONMENT_TEMPLATES))
def test_environment_matches_transformers(name):
    template = ENVIRONMENT_TEMPLATES[name]
    named = {"bos_token": "<s>", "eos_token": "</s>"}
    hf = hf_tokenizer(template, named)
    messages = CONVERSATIONS["system_and_history"]
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert render_chat(template, messages, True, named) == want


def test_the_sandbox_refuses_what_transformers_refuses():
    for template in ("{{ messages.append(1) }}", "{% set ns = namespace(_x=1) %}", "{{ ''.__class__ }}"):
        hf = hf_tokenizer(template, {})
        try:
            want = hf.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
        except Exception:
            want = None
        if want is None:
            with pytest.raises(ChatTemplateError):
                render_chat(template, [{"role": "user", "content": "x"}])
        else:
            assert render_chat(template, [{"role": "user", "content": "x"}], False) == want


@pytest.mark.parametrize(
    ("template", "messages", "message"),
    [
        (
            FAMILIES["mistral"][0],
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            "After the optional system message, conversation roles must alternate user/assistant/user/assistant/...",
        ),
        ("{{ raise_exception('no tools here') }}", [{"role": "user", "content": "a"}], "no tools here"),
        ("{{ messages[0].content + 1 }}", [{"role": "user", "content": "a"}], "TypeError: "),
        ("{% for m in messages %}", [{"role": "user", "content": "a"}], "syntax error on line 1: "),
    ],
)
def test_template_errors_carry_the_templates_message(template, messages, message):
    with pytest.raises(ChatTemplateError) as caught:
        render_chat(template, messages, True, {"bos_token": "<s>", "eos_token": "</s>"})
    assert isinstance(caught.value, InvalidArgument)  # INVALID_ARGUMENT in both services
    assert caught.value.template_message.startswith(message)
    assert str(caught.value) == f"chat template: {caught.value.template_message}"


def test_reserved_variables_are_refused():
    with pytest.raises(ChatTemplateError, match="may not set \\['messages'\\]"):
        render_chat(CHATML, [{"role": "user", "content": "a"}], True, {}, {"messages": []})


def test_named_templates_pick_default():
    assert pick_template("{{ x }}") == "{{ x }}"
    assert pick_template(None) is None
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    assert pick_template(named) == "D"
    with pytest.raises(ChatTemplateError, match="none is named 'default'"):
        pick_template(named[:1])
