"""The DeepSeek-VL2 tokenizer: a read-only wrapper around a `tokenizers` fast tokenizer.

Responsible for loading `tokenizer.json`, checking that every special token DeepSeek-VL2 relies on is
already there, and encoding / decoding plain text. Not responsible for the chat template or images
(model/processor.py). Unlike the reference processor, which adds missing special tokens to the tokenizer
it was given, this wrapper never changes the vocabulary: a tokenizer that lacks one is rejected.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from dsvl2.model.errors import TokenizerError
from dsvl2.model.requests import ASSISTANT, IMAGE_TOKEN, USER

if TYPE_CHECKING:
    import tokenizers

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
GROUNDING_TOKENS = ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>")
# Tokens that occur inside prompt or answer text: each must encode to exactly its own id, or the chat
# template and the grounding parser would see them split into byte pieces.
TEXT_SPECIAL_TOKENS = (*GROUNDING_TOKENS, USER, ASSISTANT)
REQUIRED_TOKENS = (BOS, EOS, PAD, IMAGE_TOKEN, *TEXT_SPECIAL_TOKENS)


class Tokenizer:
    """Byte-level BPE tokenizer with the DeepSeek-VL2 special tokens.

    `encode` never adds bos/eos (the processor places them itself, like the reference's
    `encode(text, add_special_tokens=False)`); `decode` drops bos/eos/pad but keeps grounding and role
    tokens verbatim, and ignores ids the tokenizer does not know (the model vocab is larger than it).
    """

    def __init__(self, fast: tokenizers.Tokenizer, *, source: str = "<memory>") -> None:
        vocab_len = fast.get_vocab_size(with_added_tokens=True)
        ids = {tok: fast.token_to_id(tok) for tok in REQUIRED_TOKENS}
        missing = [tok for tok, i in ids.items() if i is None]
        split = [
            tok
            for tok in TEXT_SPECIAL_TOKENS
            if ids[tok] is not None and fast.encode(tok, add_special_tokens=False).ids != [ids[tok]]
        ]
        if missing or split:
            problems = []
            if missing:
                problems.append(f"missing special tokens {', '.join(missing)}")
            if split:
                problems.append(f"tokens not registered as added tokens (they split when encoded): {', '.join(split)}")
            raise TokenizerError(
                f"tokenizer at {source} is not a DeepSeek-VL2 tokenizer: {'; '.join(problems)} "
                "(dsvl2 does not add tokens to a tokenizer; use the tokenizer files of the checkpoint)"
            )
        self._fast = fast
        self._len = vocab_len
        self._ids = {tok: int(i) for tok, i in ids.items() if i is not None}
        self._dropped = frozenset((self._ids[BOS], self._ids[EOS], self._ids[PAD]))

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `<path>/tokenizer.json`; raise TokenizerError if it is missing, unreadable or incomplete."""
        directory = Path(path)
        file = directory / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(f"no tokenizer.json in {directory} (expected the Hugging Face fast tokenizer)")
        _check_declared_roles(directory / "tokenizer_config.json")
        from tokenizers import Tokenizer as FastTokenizer  # lazy: keeps `import model.tokenizer` cheap

        try:
            fast = FastTokenizer.from_file(str(file))
        except Exception as exc:  # the library raises a bare Exception for malformed files
            raise TokenizerError(f"cannot read {file}: {exc}") from exc
        return cls(fast, source=str(directory))

    def __len__(self) -> int:
        """Number of token strings, added tokens included (smaller than the model's vocab_size)."""
        return self._len

    @property
    def bos_id(self) -> int:
        return self._ids[BOS]

    @property
    def eos_id(self) -> int:
        return self._ids[EOS]

    @property
    def pad_id(self) -> int:
        return self._ids[PAD]

    @property
    def image_id(self) -> int:
        return self._ids[IMAGE_TOKEN]

    def token_id(self, token: str) -> int:
        """Id of one of the required special tokens (e.g. `<|ref|>`); KeyError for any other string."""
        return self._ids[token]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos (add_special_tokens=False)."""
        return self._fast.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` without bos/eos/pad; grounding and role tokens stay; unknown ids decode to ''."""
        kept = [i for i in (int(x) for x in ids) if 0 <= i < self._len and i not in self._dropped]
        return self._fast.decode(kept, skip_special_tokens=False)


def _check_declared_roles(config: Path) -> None:
    """The reference takes bos/eos/pad from tokenizer_config.json; we look them up by their DeepSeek
    strings, so a config naming other strings would silently change the ids: reject it instead."""
    if not config.is_file():
        return
    try:
        declared = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"cannot read {config}: {exc}") from exc
    for key, expected in (("bos_token", BOS), ("eos_token", EOS), ("pad_token", PAD)):
        value = declared.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if value is not None and value != expected:
            raise TokenizerError(f"{config}: {key} is {value!r}, DeepSeek-VL2 uses {expected!r}")
