"""A byte-level BPE trained on the corpus, laid out like NLD's Tekken vocabulary.

The layout and pre-tokenizer are trimode.model.vocab's (what the runtime tokenizer reads):
ids 0..999 special tokens (<s>=1, <|im_start|>=10, <|im_end|>=11, mask=100, <think>,
</think>), then the 256 byte tokens in byte order, then one token per merge in merge order.
Unlike make_vocab, the merges are learned from the whole training split and there is no padding.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import gguf
import gguf.vocab
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from trimode.model.vocab import NUM_SPECIAL, TEKKEN_PATTERN, TEKKEN_PRE, Vocab, special_token_name


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(TEKKEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


@dataclass
class TrainedVocab:
    tokens: list[str]              # id -> token text (byte-level unicode for ids >= 1000)
    merges: list[tuple[str, str]]  # in rank order; merge r produces token 1256 + r

    @property
    def size(self) -> int:
        return len(self.tokens)

    def tokenizer(self) -> Tokenizer:
        """An encoder/decoder whose ids are exactly this layout's ids."""
        ids = {tok: i for i, tok in enumerate(self.tokens)}
        tok = Tokenizer(models.BPE(vocab=ids, merges=self.merges))
        tok.pre_tokenizer = pre_tokenizer()
        tok.decoder = decoders.ByteLevel()
        return tok

    def to_vocab(self) -> Vocab:
        """The GGUF vocabulary (special-token names from trimode.model.vocab)."""
        T = gguf.TokenType
        tokens = [special_token_name(i) for i in range(NUM_SPECIAL)] + self.tokens[NUM_SPECIAL:]
        types = [int(T.CONTROL)] * NUM_SPECIAL + [int(T.NORMAL)] * (len(tokens) - NUM_SPECIAL)
        return Vocab(tokens=tokens, token_types=types, merges=[f"{a} {b}" for a, b in self.merges],
                     # Trained on plain source files, never on chat turns: no template, so
                     # `trimode generate` completes text as llama-cli does for such models.
                     pre=TEKKEN_PRE, chat_template="")


def train_vocab(texts: list[str], vocab_size: int) -> TrainedVocab:
    n_merges = vocab_size - NUM_SPECIAL - 256
    if n_merges <= 0:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for merges")
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=256 + n_merges, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    trainer_tok.train_from_iterator(texts, trainer)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
              for m in json.loads(trainer_tok.to_str())["model"]["merges"]][:n_merges]
    byte_tokens = [gguf.vocab.bytes_to_unicode()[b] for b in range(256)]
    tokens = [special_token_name(i) for i in range(NUM_SPECIAL)] + byte_tokens + [a + b for a, b in merges]
    if len(set(tokens[NUM_SPECIAL:])) != len(tokens) - NUM_SPECIAL:
        raise ValueError("BPE training produced a duplicate merge result")
    if len(tokens) < vocab_size:
        raise ValueError(f"BPE training found only {len(merges)} merges, fewer than {n_merges}")
    return TrainedVocab(tokens=tokens, merges=merges)
