"""Byte-level BPE from a GGUF file's `tokenizer.*` keys, built with the `tokenizers` library.

Two `tokenizers` instances share one vocabulary: plain text goes through one that treats
special-token strings as ordinary bytes (a user typing "<|im_start|>" gets bytes, never the
control token); rendered chat templates go through one that parses them.
"""
from __future__ import annotations

import bisect
import codecs
from functools import cached_property

import gguf
import gguf.vocab
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from trimode.model.config import ModelError
from trimode.model.vocab import TEKKEN_PATTERN, TEKKEN_PRE

# tokenizer.ggml.pre -> the split applied before byte-level mapping.
PRE_TOKENIZERS = {
    TEKKEN_PRE: lambda: pre_tokenizers.Split(Regex(TEKKEN_PATTERN), behavior="isolated"),
}
# NLD's ids, used when the file lacks the key (MODEL.md section 2).
DEFAULT_IDS = {"bos": 1, "eos": 11, "mask": 100}

_BPE_TYPES = (int(gguf.TokenType.NORMAL), int(gguf.TokenType.BYTE))
_SPECIAL_TYPES = (int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED))
_UNUSED = int(gguf.TokenType.UNUSED)


class Tokenizer:
    def __init__(self, tokens: list[str], token_types: list[int], merges: list[str], pre: str,
                 bos_id: int, eos_id: int, mask_id: int):
        if pre not in PRE_TOKENIZERS:
            raise ModelError(f"tokenizer.ggml.pre {pre!r} is not supported (known: {', '.join(PRE_TOKENIZERS)})")
        if len(tokens) != len(token_types):
            raise ModelError(f"tokenizer has {len(tokens)} tokens but {len(token_types)} token types")
        if len(set(tokens)) != len(tokens):
            seen = set()
            twice = next(t for t in tokens if t in seen or seen.add(t))
            raise ModelError(f"tokenizer.ggml.tokens holds {twice!r} twice")
        for name, i in (("bos", bos_id), ("eos", eos_id), ("mask", mask_id)):
            if not 0 <= i < len(tokens):
                raise ModelError(f"tokenizer.ggml.{name}_token_id {i} is outside the vocabulary of {len(tokens)}")
        self.tokens = tokens
        self.token_types = token_types
        self.bos_id, self.eos_id, self.mask_id = bos_id, eos_id, mask_id
        specials = {t: i for i, (t, ty) in enumerate(zip(tokens, token_types)) if ty in _SPECIAL_TYPES}
        self.im_start_id = specials.get("<|im_start|>")
        self.im_end_id = specials.get("<|im_end|>")
        self.think_open_id = specials.get("<think>")
        self.think_close_id = specials.get("</think>")

        self._template = _build(tokens, merges, pre, specials)
        self._plain = _build(tokens, merges, pre, specials)
        self._plain.encode_special_tokens = True

    @classmethod
    def from_metadata(cls, metadata: dict) -> "Tokenizer":
        """From the `tokenizer.*` keys of a GGUF file (plain python values)."""
        model = metadata.get("tokenizer.ggml.model", "gpt2")
        if model != "gpt2":
            raise ModelError(f"tokenizer.ggml.model {model!r} is not supported (byte-level BPE 'gpt2' only)")
        for key in ("tokens", "merges", "pre"):
            if f"tokenizer.ggml.{key}" not in metadata:
                raise ModelError(f"tokenizer.ggml.{key} is missing")
        tokens = list(metadata["tokenizer.ggml.tokens"])
        types = list(metadata.get("tokenizer.ggml.token_type", [int(gguf.TokenType.NORMAL)] * len(tokens)))
        return cls(tokens, [int(t) for t in types], list(metadata["tokenizer.ggml.merges"]),
                   metadata["tokenizer.ggml.pre"],
                   **{f"{name}_id": int(metadata.get(f"tokenizer.ggml.{name}_token_id", default))
                      for name, default in DEFAULT_IDS.items()})

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Plain (user) text: special-token strings in it encode as ordinary bytes."""
        return self._with_bos(self._plain.encode(text, add_special_tokens=False).ids, add_bos)

    def encode_template(self, text: str, add_bos: bool = False) -> list[int]:
        """A rendered chat template: special-token strings in it become their control tokens."""
        return self._with_bos(self._template.encode(text, add_special_tokens=False).ids, add_bos)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; special tokens appear as their text, unused (padding) ids as nothing."""
        self._check_ids(ids)
        return self._template.decode([i for i in ids if self.token_types[i] != _UNUSED],
                                     skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        self._check_ids([token_id])
        return self._bytes_table[token_id]

    def token_text(self, token_id: int) -> str:
        """One token's text; a token holding part of a UTF-8 character shows U+FFFD."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def ids_with_prefix(self, prefix: bytes) -> list[int]:
        """Ordinary (BPE and byte) tokens whose bytes start with `prefix`, by id."""
        table, ids = self._sorted_bytes
        lo = bisect.bisect_left(table, prefix)
        hi = lo
        while hi < len(table) and table[hi].startswith(prefix):
            hi += 1
        return sorted(ids[lo:hi])

    def is_ordinary(self, token_id: int) -> bool:
        """A BPE or byte token of this vocabulary (not a control, user-defined or unused one)."""
        return 0 <= token_id < len(self.tokens) and self.token_types[token_id] in _BPE_TYPES

    def incremental_decoder(self, skip: bytes = b"") -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip)

    def _with_bos(self, ids: list[int], add_bos: bool) -> list[int]:
        return [self.bos_id, *ids] if add_bos else ids

    def _check_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < len(self.tokens)]
        if bad:
            raise ModelError(f"token id {bad[0]} is outside the vocabulary of {len(self.tokens)}")

    @cached_property
    def _sorted_bytes(self) -> tuple[list[bytes], list[int]]:
        # Ordinary tokens sorted by their bytes: those sharing a prefix are one contiguous run.
        pairs = sorted((b, i) for i, b in enumerate(self._bytes_table)
                       if self.token_types[i] in _BPE_TYPES)
        return [b for b, _ in pairs], [i for _, i in pairs]

    @cached_property
    def _bytes_table(self) -> list[bytes]:
        # The bytes each id stands for, in the same form the ByteLevel decoder produces.
        byte_of = {c: b for b, c in gguf.vocab.bytes_to_unicode().items()}
        table = []
        for token, ty in zip(self.tokens, self.token_types):
            if ty == _UNUSED:
                table.append(b"")
            elif ty in _BPE_TYPES and all(c in byte_of for c in token):
                table.append(bytes(byte_of[c] for c in token))
            else:
                table.append(token.encode("utf-8"))
        return table


class IncrementalDecoder:
    """Streaming decode: `push(id)` returns only whole characters, holding back the bytes of
    a UTF-8 character that later tokens complete. `skip`: bytes the stream starts with that
    the reader already has (a healed prompt's tail), dropped from the text."""

    def __init__(self, tokenizer: Tokenizer, skip: bytes = b""):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._skip = skip

    def push(self, token_id: int) -> str:
        data = self._tokenizer.token_bytes(token_id)
        if self._skip:
            if not (data.startswith(self._skip) or self._skip.startswith(data)):
                raise ValueError(f"token {token_id} does not continue the healed prompt tail {self._skip!r}")
            cut = min(len(data), len(self._skip))
            data, self._skip = data[cut:], self._skip[cut:]
        return self._utf8.decode(data)

    def flush(self) -> str:
        """At the end of the stream: whatever is held back (U+FFFD if it is not a whole character)."""
        return self._utf8.decode(b"", final=True)


def _build(tokens: list[str], merges: list[str], pre: str, specials: dict[str, int]) -> HFTokenizer:
    # Every token, special ones included, sits in the BPE vocabulary so the added tokens keep
    # the file's ids; merges never produce a special token's string.
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                     merges=[tuple(m.split(" ", 1)) for m in merges])
    tok = HFTokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        PRE_TOKENIZERS[pre](),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok
