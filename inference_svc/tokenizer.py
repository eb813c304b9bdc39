"""Text <-> token ids: `tokenizer.json` through the `tokenizers` library, or raw UTF-8 bytes."""

from __future__ import annotations

from pathlib import Path

from loraserve.errors import InvalidModel


class Tokenizer:
    """A Hugging Face fast tokenizer loaded from `tokenizer.json`."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for a bad file
            raise InvalidModel(f"{path}: cannot load tokenizer ({e})") from e
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


class ByteTokenizer:
    """Fallback when a model ships no tokenizer.json: token id = UTF-8 byte (ids >= 256 print nothing)."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def load_tokenizer(model_dir: str | Path) -> Tokenizer | ByteTokenizer:
    path = Path(model_dir) / "tokenizer.json"
    return Tokenizer(path) if path.is_file() else ByteTokenizer()


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
