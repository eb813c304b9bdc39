"""Chat messages -> prompt text with a checkpoint's Jinja chat template, as transformers renders it.

The environment is the one `transformers`' `apply_chat_template` builds
(`transformers/utils/chat_template_utils.py`): a sandbox that cannot change its inputs
(`ImmutableSandboxedEnvironment`), `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension
(`{% break %}`), a `{% generation %}` block tag (rendered as its body), a `tojson` filter that
does not escape HTML, and the globals `raise_exception`, `strftime_now`, `dict` and `namespace`.
The template sees `messages`, `tools` and `documents` (None), `add_generation_prompt`, the
tokenizer's named special tokens (`bos_token`, `eos_token`, ...) and the caller's extra
variables, which override special tokens of the same name. Torch-free: both the gRPC `messages`
prompt and the OpenAI chat API render through here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from loraserve.errors import ChatTemplateError

# Variables the renderer sets itself; extra variables may not replace them.
RESERVED_VARIABLES = frozenset({"messages", "tools", "documents", "add_generation_prompt"})


def pick_template(value: str | list | dict | None) -> str | None:
    """The template to use from a `chat_template` entry: a string, or named templates ("default").

    `tokenizer_config.json` stores several templates as `[{"name": ..., "template": ...}]`;
    transformers uses the one named "default" when no tools are passed. Raises ChatTemplateError
    when there are named templates but no default.
    """
    if value is None or isinstance(value, str):
        return value
    named = value if isinstance(value, dict) else {t["name"]: t["template"] for t in value}
    if "default" not in named:
        raise ChatTemplateError(
            f"the model has several chat templates ({sorted(named)}) and none is named 'default'"
        )
    return named["default"]


def render_chat(
    template: str,
    messages: list[Mapping[str, str]],
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str] | None = None,
    variables: Mapping[str, object] | None = None,
) -> str:
    """Render one conversation; raises ChatTemplateError with the template's own message.

    Args:
        template: the Jinja source (see `pick_template`).
        messages: `{"role": ..., "content": ...}` dicts, oldest first.
        add_generation_prompt: end with the header that opens the assistant's reply.
        special_tokens: the tokenizer's named special tokens, e.g. {"bos_token": "<s>"}.
        variables: extra template variables (`chat_template_kwargs`), e.g. {"enable_thinking": False}.
    """
    clash = RESERVED_VARIABLES.intersection(variables or {})
    if clash:
        raise ChatTemplateError(f"chat_template_kwargs may not set {sorted(clash)}")
    compiled = _compile(template)
    chat = [{k: v for k, v in m.items() if v is not None} for m in messages]  # transformers drops None
    try:
        return compiled.render(
            messages=chat,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **{**(special_tokens or {}), **(variables or {})},
        )
    except jinja2.TemplateError as e:  # raise_exception, undefined values, sandbox refusals
        raise ChatTemplateError(e.message or type(e).__name__) from e
    except Exception as e:  # the template's own code failed (a bad operand, a missing key ...)
        raise ChatTemplateError(f"{type(e).__name__}: {e}") from e


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    try:
        return _ENVIRONMENT.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"syntax error on line {e.lineno}: {e.message}") from e


# --- the environment transformers builds ------------------------------------------------------


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers' assistant-mask marker; renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` without exposing the type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed attributes."""

    def __init__(*args, **kwargs):  # Jinja's Namespace signature trick: `namespace(self=...)` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}"
            )


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


_ENVIRONMENT = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
)
_ENVIRONMENT.filters["tojson"] = _tojson
_ENVIRONMENT.globals["raise_exception"] = _raise_exception
_ENVIRONMENT.globals["strftime_now"] = _strftime_now
_ENVIRONMENT.globals["dict"] = _TemplateDict()
_ENVIRONMENT.globals["namespace"] = _TemplateNamespace
