"""The generated vocabulary and the tokenizer built from GGUF metadata."""
import random

import gguf
import gguf.vocab
import pytest
import regex

from trimode.model.config import ModelError
from trimode.model.tokenizer import PRE_TOKENIZERS, Tokenizer
from trimode.model.vocab import NUM_SPECIAL, TEKKEN_PATTERN, _learn_bpe, make_vocab

UNICODE_CORPUS = [
    "Hello, world!",
    "你好，世界。机器学习模型需要大量的数据。",
    "こんにちは、東京。",
    "안녕하세요",
    "مَرْحَبًا بِالْعَالَمِ، اللُّغَةُ الْعَرَبِيَّةُ",
    "नमस्ते दुनिया, क्ष त्र ज्ञ श्र्",
    "e\u0301 a\u0308\u0304 Z\u0335\u0322\u0347 ǅemal ǈ",
    "emoji 😀🎉 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ \U0001FAE0",
    "def f(x):\n\tif x<=0:\n\t\treturn {'a': [1, 2]}  # ok\r\n",
    "   leading\n\n\n  trailing   \n",
    "\u00a0nbsp\u3000ideographic\u2028line\u2029para",
    "HTTPServer camelCase SNAKE_CASE 12345 3.14e-10 a/b//c\n/",
    "",
    " ",
    "\n",
    "\x00\x01\x7f control bytes",
]
# Strings where the Tekken split is easy to get wrong (marks, case runs, digits, newlines).
TRICKY = UNICODE_CORPUS + [
    "ÉCOLE école Ǆungla", "a\u0301b\u0301C\u0301D", "\u0301leading mark", "x\u094d\u0915",
    "don't I'LL we've", "  \n  \n\t x", "!!!\n\n??/ //\r\n", "١٢٣ ๑๒๓ ²³ Ⅻ", "A\u200dB",
]
SPECIAL_TEXT = "<s></s><unk><|im_start|>user\n<think>x</think><|im_end|><|mask|><SPECIAL_5>"


@pytest.fixture(scope="module")
def vocab():
    return make_vocab(2048)


@pytest.fixture(scope="module")
def tok(vocab):
    return Tokenizer.from_metadata(vocab.to_metadata())


@pytest.fixture(scope="module")
def big_tok():
    return Tokenizer.from_metadata(make_vocab(131072).to_metadata())


def test_vocab_layout(vocab):
    assert len(vocab.tokens) == len(vocab.token_types) == 2048
    assert len(set(vocab.tokens)) == 2048
    for i, name in {0: "<unk>", 1: "<s>", 2: "</s>", 10: "<|im_start|>", 11: "<|im_end|>",
                    20: "<think>", 21: "</think>", 100: "<|mask|>", 5: "<SPECIAL_5>"}.items():
        assert vocab.tokens[i] == name
    assert set(vocab.token_types[:NUM_SPECIAL]) == {int(gguf.TokenType.CONTROL)}
    assert vocab.tokens[NUM_SPECIAL:NUM_SPECIAL + 256] == [gguf.vocab.bytes_to_unicode()[b] for b in range(256)]
    assert set(vocab.token_types[NUM_SPECIAL:]) == {int(gguf.TokenType.NORMAL)}
    assert (vocab.bos_id, vocab.eos_id, vocab.mask_id, vocab.pre) == (1, 11, 100, "tekken")


def test_vocab_merges_are_real_bpe(vocab, tok):
    index = {t: i for i, t in enumerate(vocab.tokens)}
    assert len(vocab.merges) == 2048 - NUM_SPECIAL - 256
    for m in vocab.merges:
        a, b = m.split(" ")
        assert index[a] < index[a + b] and index[b] < index[a + b]
    code = "    def __init__(self, name):\n        self.name = name\n        return None\n"
    assert len(tok.encode(code)) < len(code.encode()) / 2.5


def test_big_vocab_is_padded_with_unused(big_tok):
    types = big_tok.token_types
    assert len(big_tok) == 131072
    assert types[-1] == int(gguf.TokenType.UNUSED)
    first_pad = types.index(int(gguf.TokenType.UNUSED))
    assert set(types[first_pad:]) == {int(gguf.TokenType.UNUSED)}
    assert big_tok.decode([first_pad, 131071]) == ""


def test_vocab_is_deterministic():
    assert _learn_bpe.__wrapped__(300) == _learn_bpe.__wrapped__(300)


@pytest.mark.parametrize("text", UNICODE_CORPUS)
def test_roundtrip(tok, big_tok, text):
    for t in (tok, big_tok):
        ids = t.encode(text)
        assert t.decode(ids) == text
        assert all(t.token_types[i] == int(gguf.TokenType.NORMAL) for i in ids)


def test_special_tokens_never_come_from_plain_text(tok, vocab):
    every_special = "".join(vocab.tokens[:NUM_SPECIAL])
    for text in (SPECIAL_TEXT, every_special):
        ids = tok.encode(text)
        assert min(ids) >= NUM_SPECIAL
        assert tok.decode(ids) == text


def test_template_text_parses_special_tokens(tok):
    ids = tok.encode_template(SPECIAL_TEXT)
    assert ids[:5] == [1, 2, 0, 10, tok.encode("user")[0]]
    assert [i for i in ids if i < NUM_SPECIAL] == [1, 2, 0, 10, 20, 21, 11, 100, 5]
    assert tok.decode(ids) == SPECIAL_TEXT


def test_special_ids_and_bos(tok):
    assert (tok.bos_id, tok.eos_id, tok.mask_id) == (1, 11, 100)
    assert (tok.im_start_id, tok.im_end_id, tok.think_open_id, tok.think_close_id) == (10, 11, 20, 21)
    assert tok.encode("hi", add_bos=True) == [1, *tok.encode("hi")]
    assert tok.encode_template("<think>", add_bos=True) == [1, 20]


def test_token_text_and_bytes(tok):
    assert tok.token_text(20) == "<think>"
    assert [tok.token_bytes(NUM_SPECIAL + b) for b in (0, 32, 65, 255)] == [b"\x00", b" ", b"A", b"\xff"]
    assert tok.token_text(NUM_SPECIAL + 0xE4) == "\ufffd"  # a lone lead byte
    with pytest.raises(ModelError, match="outside the vocabulary"):
        tok.decode([2048])


@pytest.mark.parametrize("text", [t for t in UNICODE_CORPUS if t])
def test_incremental_decoder_emits_whole_characters(tok, text):
    ids = tok.encode(text)
    decoder = tok.incremental_decoder()
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) + decoder.flush() == text
    assert not any("\ufffd" in p for p in pieces)
    emitted = ""
    for p in pieces:  # every prefix the stream showed is a prefix of the text
        emitted += p
        assert text.startswith(emitted)


def test_incremental_decoder_holds_split_characters(tok):
    # With 2048 tokens a CJK character's three bytes span several tokens: the test is only
    # meaningful if some token is not valid UTF-8 on its own.
    text = "你好世界 😀"
    ids = tok.encode(text)
    assert any(_not_utf8(tok.token_bytes(i)) for i in ids)
    decoder = tok.incremental_decoder()
    pieces = [decoder.push(i) for i in ids]
    assert "" in pieces and "".join(pieces) == text


def test_incremental_decoder_flushes_incomplete_tail(tok):
    decoder = tok.incremental_decoder()
    assert decoder.push(NUM_SPECIAL + 0xF0) == ""  # lead byte of a 4-byte character
    assert decoder.flush() == "\ufffd"


@pytest.mark.parametrize("text", TRICKY)
def test_tekken_split_matches_mistral_regex(text):
    expected = regex.findall(TEKKEN_PATTERN, text)
    assert "".join(expected) == text
    assert [piece for piece, _ in PRE_TOKENIZERS["tekken"]().pre_tokenize_str(text)] == expected


@pytest.mark.parametrize("text", TRICKY)
def test_tokenizer_merges_only_inside_tekken_pieces(big_tok, text):
    pieces = regex.findall(TEKKEN_PATTERN, text)
    assert big_tok.encode(text) == [i for p in pieces for i in big_tok.encode(p)]


def test_tekken_keeps_combining_marks_in_words():
    # llama.cpp's approximation of this split breaks words at Arabic harakat and the virama.
    assert regex.findall(TEKKEN_PATTERN, "مَرْحَبًا नमस्ते") == ["مَرْحَبًا", " नमस्ते"]


def test_stream_equals_decode_on_any_ids(tok):
    # Random ids make invalid UTF-8; the stream must still agree with decode exactly.
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]
        decoder = tok.incremental_decoder()
        assert "".join(decoder.push(i) for i in ids) + decoder.flush() == tok.decode(ids)


def test_large_text_roundtrip(big_tok):
    text = ("".join(UNICODE_CORPUS) * 200)[:100_000]
    assert big_tok.decode(big_tok.encode(text)) == text


@pytest.mark.parametrize("change, message", [
    ({"tokenizer.ggml.pre": "llama-bpe"}, "tokenizer.ggml.pre 'llama-bpe' is not supported"),
    ({"tokenizer.ggml.model": "llama"}, "tokenizer.ggml.model 'llama' is not supported"),
    ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens is missing"),
    ({"tokenizer.ggml.mask_token_id": 5000}, "mask_token_id 5000 is outside the vocabulary"),
    ({"tokenizer.ggml.token_type": [1]}, "2048 tokens but 1 token types"),
    ({"tokenizer.ggml.tokens": ["a", "b", "a"] + [f"<t{i}>" for i in range(2045)]}, "holds 'a' twice"),
])
def test_bad_metadata_is_refused_by_name(vocab, change, message):
    metadata = {**vocab.to_metadata(), **change}
    metadata = {k: v for k, v in metadata.items() if v is not None}
    with pytest.raises(ModelError, match=regex.escape(message)):
        Tokenizer.from_metadata(metadata)


def _not_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True
