"""A model's vocabulary as a GGUF file stores it, and a generated one laid out like NLD's.

`make_vocab` builds a real byte-level BPE vocabulary (merges learned by the `tokenizers`
trainer) with the Tekken/NLD id layout: ids 0..999 special tokens, then the 256 byte
tokens, then learned tokens in merge order, then unused padding up to the requested size.
"""
from __future__ import annotations

import json
import os
import sysconfig
from dataclasses import dataclass
from functools import lru_cache

import gguf
import gguf.vocab
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

from trimode.model.chat import CHATML_TEMPLATE
from trimode.model.config import ModelError

# Mistral's Tekken split, verbatim from the `pattern` of mistral-common's tekken_240911.json.
TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN_PRE = "tekken"

NUM_SPECIAL = 1000
NAMED_SPECIALS = {
    0: "<unk>", 1: "<s>", 2: "</s>",
    10: "<|im_start|>", 11: "<|im_end|>",
    20: "<think>", 21: "</think>",
    100: "<|mask|>",
}
# Learning more tokens than this takes longer than a test should wait; the rest is padding.
MAX_LEARNED_TOKENS = 8192
# The stdlib modules (sorted by name) are read until this many characters: enough text for
# MAX_LEARNED_TOKENS merges, little enough to train in about a second.
CORPUS_CHARS = 600_000
# Non-ASCII text the stdlib lacks, so the vocabulary also has multi-byte merges.
MULTILINGUAL_SAMPLE = (
    "你好，世界。今天天气很好，我们去公园散步吧。机器学习模型需要大量的数据。\n"
    "こんにちは、世界。東京は日本の首都です。ありがとうございます。\n"
    "안녕하세요, 세계. 오늘은 날씨가 좋습니다.\n"
    "مَرْحَبًا بِالْعَالَمِ. اللُّغَةُ الْعَرَبِيَّةُ جَمِيلَةٌ.\n"
    "नमस्ते दुनिया। हिन्दी भाषा में संयुक्ताक्षर होते हैं: क्ष, त्र, ज्ञ, श्र।\n"
    "Привет, мир! Как дела? Всё хорошо, спасибо.\n"
    "Γειά σου κόσμε. Καλημέρα σας.\n"
    "Ça va très bien, merci. Über den Wolken muß die Freiheit wohl grenzenlos sein.\n"
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️\n"
) * 8


@dataclass
class Vocab:
    """The `tokenizer.*` GGUF keys: token strings (GPT-2 byte-to-unicode form), gguf.TokenType
    values, merges ("a b"), the pre-tokenizer name and the chat template ("": none)."""
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    chat_template: str
    bos_id: int = 1
    eos_id: int = 11
    mask_id: int = 100
    model: str = "gpt2"

    def __post_init__(self):
        if len(self.tokens) != len(self.token_types):
            raise ModelError(f"vocabulary has {len(self.tokens)} tokens but {len(self.token_types)} token types")
        for name in ("bos_id", "eos_id", "mask_id"):
            if not 0 <= getattr(self, name) < len(self.tokens):
                raise ModelError(f"{name} {getattr(self, name)} is outside the vocabulary of {len(self.tokens)}")

    def __len__(self) -> int:
        return len(self.tokens)

    def to_metadata(self) -> dict:
        """The GGUF `tokenizer.*` keys with plain python values, as `load_model(...).metadata` gives them."""
        template = {"tokenizer.chat_template": self.chat_template} if self.chat_template else {}
        return {
            "tokenizer.ggml.model": self.model,
            "tokenizer.ggml.pre": self.pre,
            "tokenizer.ggml.tokens": list(self.tokens),
            "tokenizer.ggml.token_type": list(self.token_types),
            "tokenizer.ggml.merges": list(self.merges),
            "tokenizer.ggml.bos_token_id": self.bos_id,
            "tokenizer.ggml.eos_token_id": self.eos_id,
            "tokenizer.ggml.mask_token_id": self.mask_id,
            **template,
        }


def special_token_name(i: int) -> str:
    return NAMED_SPECIALS.get(i, f"<SPECIAL_{i}>")


def make_vocab(vocab_size: int) -> Vocab:
    """A deterministic NLD-layout BPE vocabulary of exactly `vocab_size` tokens.

    The merges come from this machine's Python standard library, so they are the same on
    every run with the same Python, not across Python versions.
    """
    byte_char = gguf.vocab.bytes_to_unicode()
    byte_tokens = [byte_char[b] for b in range(256)]
    if vocab_size < NUM_SPECIAL + len(byte_tokens):
        raise ModelError(f"vocab_size {vocab_size} is below the {NUM_SPECIAL} special and 256 byte tokens")
    n_learned = min(vocab_size - NUM_SPECIAL - len(byte_tokens), MAX_LEARNED_TOKENS)
    learned, merges = _learn_bpe(n_learned) if n_learned else ((), ())
    learned, merges = list(learned), list(merges)

    n_pad = vocab_size - NUM_SPECIAL - len(byte_tokens) - len(learned)
    tokens = ([special_token_name(i) for i in range(NUM_SPECIAL)] + byte_tokens + learned
              + [f"<pad_{i}>" for i in range(n_pad)])
    T = gguf.TokenType
    # Byte tokens are NORMAL, as in converted Tekken files: llama.cpp does not print
    # BYTE-typed tokens of a gpt2-model vocabulary.
    token_types = ([int(T.CONTROL)] * NUM_SPECIAL + [int(T.NORMAL)] * (len(byte_tokens) + len(learned))
                   + [int(T.UNUSED)] * n_pad)
    return Vocab(tokens=tokens, token_types=token_types, merges=merges, pre=TEKKEN_PRE,
                 chat_template=CHATML_TEMPLATE)


def _training_corpus() -> list[str]:
    stdlib = sysconfig.get_paths()["stdlib"]
    texts, total = [MULTILINGUAL_SAMPLE], len(MULTILINGUAL_SAMPLE)
    for name in sorted(f for f in os.listdir(stdlib) if f.endswith(".py")):
        with open(os.path.join(stdlib, name), encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
        total += len(texts[-1])
        if total >= CORPUS_CHARS:
            break
    return texts


@lru_cache(maxsize=4)
def _learn_bpe(n_tokens: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Up to `n_tokens` learned tokens (in the order learned) and the merges ("a b") making them."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(TEKKEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + n_tokens, min_frequency=2,
                                  show_progress=False, initial_alphabet=alphabet)
    tok.train_from_iterator(_training_corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    # The trainer numbers the alphabet first, then each new token as it is learned.
    learned = sorted((i, t) for t, i in model["vocab"].items() if i >= len(alphabet))
    return tuple(t for _, t in learned), tuple(f"{a} {b}" for a, b in model["merges"])
