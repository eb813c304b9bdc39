"""Text <-> token ids: `tokenizer.json` through the `tokenizers` library, or raw UTF-8 bytes.

Special tokens follow the checkpoint, as transformers' fast tokenizers do: `encode` adds what the
post-processor of `tokenizer.json` adds (a BOS, for Llama and Mistral), unless
`tokenizer_config.json` sets `add_bos_token` / `add_eos_token`, which then decide (transformers'
`update_post_processor`). A request may turn special tokens off. Chat prompts are rendered with
the checkpoint's chat template (`loraserve.chat_template`) and then encoded without special tokens
by default, as `apply_chat_template(tokenize=True)` does: the template writes them itself.

`PromptEncoder` is what serving uses: it refuses text that cannot fit the prompt limit before
tokenizing it (no token is longer than the tokenizer's longest vocabulary entry, so text longer
than `max tokens x that many characters` cannot fit), and it tokenizes with the GIL released, so
a long prompt is encoded off the engine thread without stalling the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from inference_svc.errors import PromptTooLong
from inference_svc.generation_config import read_json_object
from loraserve.chat_template import pick_template, render_chat
from loraserve.errors import ChatTemplateError, InvalidModel

log = logging.getLogger(__name__)

# The named special tokens a chat template sees (transformers' SPECIAL_TOKENS_ATTRIBUTES).
NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


@dataclass(frozen=True)
class TokenizerConfig:
    """What `tokenizer_config.json` (with `special_tokens_map.json`, `chat_template.jinja`) says."""

    # named special tokens as text, e.g. {"bos_token": "<s>", "eos_token": "</s>"}
    special_tokens: dict[str, str] = field(default_factory=dict)
    # explicit add_bos_token / add_eos_token; None = the tokenizer.json post-processor decides
    add_bos_token: bool | None = None
    add_eos_token: bool | None = None
    # `chat_template`: Jinja source, or named templates; chat_template.jinja wins over the config
    chat_template: str | list | dict | None = None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> TokenizerConfig:
        model_dir = Path(model_dir)
        raw = read_json_object(model_dir / "tokenizer_config.json")
        tokens = {**read_json_object(model_dir / "special_tokens_map.json"), **raw}
        special = {name: _token_text(tokens[name]) for name in NAMED_SPECIAL_TOKENS if tokens.get(name)}
        template_file = model_dir / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else raw.get("chat_template")
        return cls(
            special_tokens=special,
            add_bos_token=_flag(raw, "add_bos_token"),
            add_eos_token=_flag(raw, "add_eos_token"),
            chat_template=template,
        )


class Tokenizer:
    """A Hugging Face fast tokenizer loaded from `tokenizer.json`, with its checkpoint's settings."""

    def __init__(self, path: Path, config: TokenizerConfig | None = None):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import processors

        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for a bad file
            raise InvalidModel(f"{path}: cannot load tokenizer ({e})") from e
        self.config = config or TokenizerConfig()
        self.vocab_size = self._tok.get_vocab_size()
        if self.config.add_bos_token is not None or self.config.add_eos_token is not None:
            self._tok.post_processor = processors.TemplateProcessing(**self._template())
        eos_id = self.token_id(self.config.special_tokens.get("eos_token"))
        self.eos_token_ids: tuple[int, ...] = () if eos_id is None else (eos_id,)
        # characters the longest vocabulary entry (added tokens included) stands for, at most
        self.max_token_chars = max(1, max(map(len, self._tok.get_vocab(with_added_tokens=True)), default=1))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL while it runs (encode holds it: other threads would stall)
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def _template(self) -> dict:
        """`bos $A eos` with the pieces the flags ask for (transformers' `update_post_processor`)."""
        pieces = {}
        for name, flag in (
            ("bos_token", self.config.add_bos_token),
            ("eos_token", self.config.add_eos_token),
        ):
            token = self.config.special_tokens.get(name)
            token_id = self.token_id(token)
            if flag and token_id is not None:
                pieces[name] = (token, token_id)
        bos, eos = pieces.get("bos_token"), pieces.get("eos_token")
        single = f"{bos[0] + ':0 ' if bos else ''}$A:0{' ' + eos[0] + ':0' if eos else ''}"
        pair = f"{single}{' ' + bos[0] + ':1' if bos else ''} $B:1{' ' + eos[0] + ':1' if eos else ''}"
        return dict(single=single, pair=pair, special_tokens=list(pieces.values()))


class ByteTokenizer:
    """Fallback when a model ships no tokenizer.json: token id = UTF-8 byte (ids >= 256 print nothing)."""

    vocab_size = 256
    eos_token_ids: tuple[int, ...] = ()
    max_token_chars = 1  # a character is at least one byte, so at least one token

    def __init__(self, config: TokenizerConfig | None = None):
        self.config = config or TokenizerConfig()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def load_tokenizer(model_dir: str | Path) -> Tokenizer | ByteTokenizer:
    path = Path(model_dir) / "tokenizer.json"
    config = TokenizerConfig.from_dir(model_dir)
    if path.is_file():
        return Tokenizer(path, config)
    log.warning(
        "%s has no tokenizer.json: text is tokenized as raw UTF-8 bytes (token id = byte), which is "
        "wrong for any real checkpoint; copy the checkpoint's tokenizer.json next to its config.json",
        model_dir,
    )
    return ByteTokenizer(config)


# --- prompts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextPrompt:
    """Text with a choice about special tokens (a plain `str` prompt uses the checkpoint's)."""

    text: str
    add_special_tokens: bool = True  # the BOS/EOS the checkpoint's post-processor adds


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation, rendered with the checkpoint's chat template and then encoded."""

    messages: tuple[Mapping[str, str], ...]  # {"role": ..., "content": ...}, oldest first
    add_generation_prompt: bool = True  # end with the header of the assistant's reply
    template_kwargs: Mapping[str, object] = field(default_factory=dict)  # extra template variables
    add_special_tokens: bool = False  # the template writes BOS itself (apply_chat_template does not add it)


Prompt = str | list[int] | TextPrompt | ChatPrompt


def chat_text(tokenizer: Tokenizer | ByteTokenizer, prompt: ChatPrompt) -> str:
    """The prompt text a conversation renders to; ChatTemplateError if it cannot."""
    template = pick_template(tokenizer.config.chat_template)
    if template is None:
        raise ChatTemplateError(
            "the model has no chat template (tokenizer_config.json or chat_template.jinja)"
        )
    return render_chat(
        template,
        list(prompt.messages),
        prompt.add_generation_prompt,
        tokenizer.config.special_tokens,
        prompt.template_kwargs,
    )


@dataclass(frozen=True)
class PromptEncoder:
    """A prompt -> its ids, refusing text too long to fit before tokenizing it. Thread-safe (the
    tokenizer and the limit never change), so the server runs it off the engine thread."""

    tokenizer: Tokenizer | ByteTokenizer
    max_tokens: int  # the most tokens any prompt may have (max_prompt_tokens, max_model_len)

    @property
    def max_chars(self) -> int:
        """Longest text that can encode to `max_tokens` tokens or fewer."""
        return self.max_tokens * self.tokenizer.max_token_chars

    def encode(self, prompt: Prompt) -> list[int]:
        """The prompt's ids; PromptTooLong when its text (a chat: once rendered) exceeds `max_chars`."""
        if isinstance(prompt, list):
            return list(prompt)  # the engine checks their count and range
        text = prompt if isinstance(prompt, str) else getattr(prompt, "text", None)
        if isinstance(prompt, ChatPrompt):
            text = chat_text(self.tokenizer, prompt)
        if len(text) > self.max_chars:
            raise PromptTooLong(
                "prompt",
                f"{len(text)} characters cannot fit the prompt limit of {self.max_tokens} tokens "
                f"(max_prompt_tokens / max_model_len; no token spans more than "
                f"{self.tokenizer.max_token_chars} characters): send at most {self.max_chars}",
            )
        if isinstance(prompt, ChatPrompt):
            return self.tokenizer.encode(text, prompt.add_special_tokens)
        return encode_prompt(self.tokenizer, prompt)


def encode_prompt(tokenizer: Tokenizer | ByteTokenizer, prompt: Prompt) -> list[int]:
    """A request's prompt ids: token ids as given, text and chat encoded as the checkpoint says."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, TextPrompt):
        return tokenizer.encode(prompt.text, prompt.add_special_tokens)
    if isinstance(prompt, ChatPrompt):
        return tokenizer.encode(chat_text(tokenizer, prompt), prompt.add_special_tokens)
    return list(prompt)


def _token_text(value) -> str:
    """A special token entry: its text, or an AddedToken dict with the text in "content"."""
    return value["content"] if isinstance(value, dict) else str(value)


def _flag(raw: dict, name: str) -> bool | None:
    value = raw.get(name)
    if value is not None and not isinstance(value, bool):
        raise InvalidModel(f"tokenizer_config.json: {name} must be true or false, got {value!r}")
    return value


class IncrementalDecoder:
    """Turns a growing list of ids into text deltas without splitting multi-byte characters.

    Each push decodes only a short window (the ids since the last emitted text, plus the ids of
    the previous delta as context), so a sequence's detokenization is linear in its length.
    """

    def __init__(self, tokenizer: Tokenizer | ByteTokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # ids before this are already in `text`
        self.text = ""  # everything decoded so far

    def push(self, token_id: int) -> str:
        """Add one id; return the new text it completes ("" while a character is incomplete)."""
        self._ids.append(token_id)
        before = self._tok.decode(self._ids[self._prefix : self._read])
        after = self._tok.decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        delta = after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta
