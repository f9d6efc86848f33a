"""GGUF reading and writing (trimode.model.gguf_file) against the gguf package's own reader
and dequantizer, and one test per kind of bad file."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GGMLType
from gguf import GGUFValueType as VT

from trimode.model.config import GEOMETRIES, ModelError
from trimode.model.gguf_file import (TensorSource, load_model, tensor_shapes, write_model,
                                     write_tensors)
from trimode.model.random_weights import random_weights
from trimode.model.vocab import make_vocab
from trimode.model.weights import Q8Matrix

TINY = GEOMETRIES["tiny"]
DROP = object()


def rewrite(src: Path, dst: Path, keys: dict[str, Any] | None = None,
            tensors: dict[str, Any] | None = None) -> Path:
    """Copy the GGUF file `src` to `dst` through gguf's reader and writer, changing metadata
    (`keys`: name -> value, (value, GGUFValueType) for a new key, or DROP) and tensors
    (`tensors`: name -> (array, GGML type) or DROP)."""
    keys, tensors = keys or {}, tensors or {}
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, "dream")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in keys:
            continue
        sub_type = field.types[-1] if field.types[0] == VT.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub_type)
    for name, value in keys.items():
        if value is DROP:
            continue
        if not isinstance(value, tuple):
            value = (value, reader.fields[name].types[0])
        writer.add_key_value(name, value[0], value[1])
    for t in reader.tensors:
        data, kind = tensors.get(t.name, (np.asarray(t.data), t.tensor_type))
        if data is DROP:
            continue
        writer.add_tensor(t.name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def expect_error(path: Path, pattern: str) -> str:
    with pytest.raises(ModelError, match=pattern) as err:
        load_model(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path)), message
    return message


# Round trip --------------------------------------------------------------------------------

def test_round_trip_config_weights_and_tokenizer(tiny_gguf):
    model = load_model(tiny_gguf)
    assert model.config == TINY
    assert model.config.head_dim == 32 != TINY.hidden // TINY.n_heads
    expected = random_weights(TINY, seed=0)
    got = model.weights
    pairs = [(got.embed, expected.embed), (got.output, expected.output),
             (got.output_norm, expected.output_norm)]
    for mine, theirs in zip(got.layers, expected.layers):
        pairs += [(getattr(mine, a), getattr(theirs, a)) for a in vars(theirs)]
    for mine, theirs in pairs:
        if isinstance(theirs, Q8Matrix):
            assert mine.q.dtype == np.int8 and mine.scale.dtype == np.float16
            assert np.array_equal(mine.q, theirs.q) and np.array_equal(mine.scale, theirs.scale)
        else:
            assert mine.dtype == np.float32 and np.array_equal(mine, theirs)
    vocab = make_vocab(TINY.vocab)
    for key, value in vocab.to_metadata().items():
        assert model.metadata[key] == value, key
    assert model.metadata["general.architecture"] == "dream"
    assert set(model.tensor_types.values()) == {"Q8_0", "F32"}
    assert all(model.tensor_types[n] == "F32" for n in model.tensor_types if "norm" in n)


def test_written_layout_is_the_nld_one(tiny_gguf):
    """Keys, types, names and ggml shapes as MODEL.md section 3 lists them, read by gguf
    itself; Q8_0 blocks decode (by gguf's dequantizer) to what Q8Matrix says."""
    reader = gguf.GGUFReader(tiny_gguf)
    c = TINY
    expected_keys = {
        "dream.block_count": (VT.UINT32, c.n_layers), "dream.context_length": (VT.UINT32, c.context_length),
        "dream.embedding_length": (VT.UINT32, c.hidden), "dream.feed_forward_length": (VT.UINT32, c.ffn),
        "dream.attention.head_count": (VT.UINT32, c.n_heads),
        "dream.attention.head_count_kv": (VT.UINT32, c.n_kv_heads),
        "dream.attention.key_length": (VT.UINT32, c.head_dim),
        "dream.attention.value_length": (VT.UINT32, c.head_dim),
        "dream.attention.layer_norm_rms_epsilon": (VT.FLOAT32, np.float32(c.rms_eps)),
        "dream.rope.freq_base": (VT.FLOAT32, np.float32(c.rope_theta)),
        "dream.rope.scaling.type": (VT.STRING, "yarn"),
        "dream.rope.scaling.factor": (VT.FLOAT32, 16.0),
        "dream.rope.scaling.original_context_length": (VT.UINT32, c.yarn_orig_ctx),
        "dream.rope.scaling.yarn_beta_fast": (VT.FLOAT32, 32.0),
        "dream.rope.scaling.yarn_beta_slow": (VT.FLOAT32, 1.0),
        "dream.attention.causal": (VT.BOOL, False), "diffusion.shift_logits": (VT.BOOL, False),
        "tokenizer.ggml.model": (VT.STRING, "gpt2"), "tokenizer.ggml.mask_token_id": (VT.UINT32, 100),
        "tokenizer.ggml.bos_token_id": (VT.UINT32, 1), "tokenizer.ggml.eos_token_id": (VT.UINT32, 11),
    }
    for key, (kind, value) in expected_keys.items():
        field = reader.get_field(key)
        assert field is not None, key
        assert field.types[0] == kind and field.contents() == value, key
    tensors = {t.name: t for t in reader.tensors}
    assert list(tensors) == list(tensor_shapes(c))
    assert tensors["blk.1.attn_q.weight"].shape.tolist() == [c.hidden, c.q_dim]
    assert tensors["blk.1.attn_k.weight"].shape.tolist() == [c.hidden, c.kv_dim]
    assert tensors["blk.0.attn_output.weight"].shape.tolist() == [c.q_dim, c.hidden]
    assert tensors["blk.0.ffn_down.weight"].shape.tolist() == [c.ffn, c.hidden]
    assert tensors["token_embd.weight"].shape.tolist() == [c.hidden, c.vocab]
    assert tensors["output_norm.weight"].tensor_type == GGMLType.F32
    w = random_weights(c, seed=0)
    down = tensors["blk.1.ffn_down.weight"]
    assert down.tensor_type == GGMLType.Q8_0
    assert np.array_equal(gguf.quants.dequantize(down.data, GGMLType.Q8_0),
                          w.layers[1].w_down.dequantize(np.float32))


@pytest.mark.parametrize("kind", [GGMLType.F32, GGMLType.F16, GGMLType.BF16])
def test_float_matrices_load_as_float32(tiny_gguf, tmp_path, kind):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((TINY.kv_dim, TINY.hidden)).astype(np.float32)
    if kind == GGMLType.F16:
        stored, expected = w.astype(np.float16), w.astype(np.float16).astype(np.float32)
    elif kind == GGMLType.BF16:
        top = (w.view(np.uint32) >> 16).astype(np.uint16)  # truncate to bfloat16
        stored, expected = top.view(np.uint8), (top.astype(np.uint32) << 16).view(np.float32)
    else:
        stored, expected = w, w
    path = rewrite(tiny_gguf, tmp_path / "float.gguf", tensors={"blk.0.attn_v.weight": (stored, kind)})
    model = load_model(path)
    assert model.tensor_types["blk.0.attn_v.weight"] == kind.name
    wv = model.weights.layers[0].wv
    assert wv.dtype == np.float32 and np.array_equal(wv, expected)


def test_write_model_writes_float_weights_as_f32(tmp_path):
    weights = random_weights(TINY, seed=2, quantized=False)
    write_model(tmp_path / "f.gguf", TINY, weights, make_vocab(TINY.vocab))
    model = load_model(tmp_path / "f.gguf")
    assert set(model.tensor_types.values()) == {"F32"}
    assert np.array_equal(model.weights.layers[1].w_up, weights.layers[1].w_up)


def test_absent_keys_get_nld_defaults(tiny_gguf, tmp_path):
    dropped = ["dream.context_length", "dream.rope.freq_base", "dream.attention.key_length",
               "dream.attention.value_length", "dream.rope.scaling.type",
               "dream.rope.scaling.original_context_length", "diffusion.shift_logits",
               "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"]
    config = load_model(rewrite(tiny_gguf, tmp_path / "m.gguf", keys=dict.fromkeys(dropped, DROP))).config
    assert config.context_length == 262144 and config.rope_theta == 1e6
    assert config.rope_scaling == "yarn" and config.yarn_orig_ctx == 16384
    assert config.shift_logits is False and (config.bos_token_id, config.eos_token_id) == (1, 11)
    assert config.head_dim == TINY.head_dim  # from attn_q's shape, not hidden / heads


def test_file_values_are_used(tiny_gguf, tmp_path):
    keys = {"diffusion.shift_logits": True, "dream.rope.freq_base": 1e9,
            "dream.rope.scaling.type": "none", "dream.attention.layer_norm_rms_epsilon": 1e-6,
            "dream.context_length": 4096, "tokenizer.ggml.eos_token_id": 2}
    config = load_model(rewrite(tiny_gguf, tmp_path / "m.gguf", keys=keys)).config
    assert config.shift_logits is True and config.rope_theta == 1e9
    assert config.rope_scaling == "none" and config.rms_eps == 1e-6
    assert config.context_length == 4096 and config.eos_token_id == 2


def test_loading_does_not_read_weights(tiny_gguf, tmp_path):
    """Headers are checked at load; tensor data is touched only when weights are used."""
    path = tmp_path / "m.gguf"
    path.write_bytes(tiny_gguf.read_bytes())
    model = load_model(path)
    assert model.parameter_count() == sum(int(np.prod(s)) for s in tensor_shapes(TINY).values())
    q8_bytes = TINY.weight_elements_per_token() // 32 * 34
    norm_bytes = 4 * TINY.hidden * (2 * TINY.n_layers + 1)
    assert model.weight_bytes_per_token() == q8_bytes + norm_bytes


# Bad files: one test per case ----------------------------------------------------------------

def test_not_a_gguf(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("hello, this is not a model\n")
    expect_error(path, "not a GGUF file")


def test_missing_file(tmp_path):
    expect_error(tmp_path / "absent.gguf", "cannot open")


@pytest.mark.parametrize("keep", [0.0005, 0.5, 0.999])
def test_truncated(tiny_gguf, tmp_path, keep):
    data = tiny_gguf.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:int(len(data) * keep)])
    expect_error(path, "truncated")


def test_wrong_architecture(tiny_gguf, tmp_path):
    path = rewrite(tiny_gguf, tmp_path / "llama.gguf", keys={"general.architecture": "llama"})
    expect_error(path, "architecture is 'llama'")


def test_missing_tensor(tiny_gguf, tmp_path):
    path = rewrite(tiny_gguf, tmp_path / "m.gguf", tensors={"blk.1.ffn_up.weight": (DROP, None)})
    expect_error(path, "missing tensor blk.1.ffn_up.weight")


def test_mis_shaped_tensor(tiny_gguf, tmp_path):
    wrong = np.zeros((TINY.kv_dim + 32, TINY.hidden), np.float32)
    path = rewrite(tiny_gguf, tmp_path / "m.gguf", tensors={"blk.0.attn_k.weight": (wrong, GGMLType.F32)})
    expect_error(path, r"blk.0.attn_k.weight has ggml shape \[96, 64\], expected \[96, 32\]")


def test_unsupported_tensor_type(tiny_gguf, tmp_path):
    q4_0 = np.zeros((TINY.q_dim, TINY.hidden // 32 * 18), np.uint8)  # 18-byte blocks of 32
    path = rewrite(tiny_gguf, tmp_path / "m.gguf", tensors={"blk.0.attn_q.weight": (q4_0, GGMLType.Q4_0)})
    expect_error(path, "blk.0.attn_q.weight has type Q4_0; supported: F32, F16, BF16, Q8_0")


def test_missing_mask_token(tiny_gguf, tmp_path):
    path = rewrite(tiny_gguf, tmp_path / "m.gguf", keys={"tokenizer.ggml.mask_token_id": DROP})
    expect_error(path, "no tokenizer.ggml.mask_token_id")


def test_inconsistent_head_counts(tiny_gguf, tmp_path):
    path = rewrite(tiny_gguf, tmp_path / "m.gguf", keys={"dream.attention.head_count_kv": 3})
    expect_error(path, r"head_count \(4\) is not a multiple of attention.head_count_kv \(3\)")


@pytest.mark.parametrize("key, value, pattern", [
    ("dream.attention.value_length", 64, "value_length .64. differs from"),
    ("dream.rope.scaling.type", "linear", "rope.scaling.type 'linear' is not supported"),
    ("dream.attention.causal", True, "dream.attention.causal = True is not supported"),
    ("dream.rope.scaling.yarn_ext_factor", (0.5, VT.FLOAT32), "yarn_ext_factor = 0.5 is not supported"),
    ("dream.rope.scaling.yarn_attn_factor", (1.2773, VT.FLOAT32), "yarn_attn_factor = 1.2773 is not supported"),
    ("dream.rope.dimension_count", (16, VT.UINT32), "rope.dimension_count .16. is not the head size"),
    ("tokenizer.ggml.mask_token_id", 5000, "mask_token_id 5000 is outside the vocabulary of 2048"),
    ("dream.block_count", DROP, "missing metadata key dream.block_count"),
    ("dream.block_count", ("two", VT.STRING), "dream.block_count is 'two', expected an integer"),
    ("dream.attention.head_count_kv", 0, "dream.attention.head_count_kv is 0"),
])
def test_values_the_engine_cannot_honour_are_refused_by_name(tiny_gguf, tmp_path, key, value, pattern):
    expect_error(rewrite(tiny_gguf, tmp_path / "m.gguf", keys={key: value}), pattern)


def test_token_list_must_match_embedding_rows(tiny_gguf, tmp_path):
    tokens = load_model(tiny_gguf).metadata["tokenizer.ggml.tokens"][:-1]
    path = rewrite(tiny_gguf, tmp_path / "m.gguf", keys={"tokenizer.ggml.tokens": tokens})
    expect_error(path, "tokenizer.ggml.tokens has 2047 entries but token_embd.weight has 2048 rows")


# Writer ------------------------------------------------------------------------------------

def test_writer_refuses_a_vocabulary_that_disagrees(tmp_path):
    weights = random_weights(TINY, seed=0)
    with pytest.raises(ValueError, match="vocabulary has 4096 tokens, the model 2048"):
        write_model(tmp_path / "m.gguf", TINY, weights, make_vocab(4096))
    with pytest.raises(ValueError, match="mask_token_id 7 differs"):
        write_model(tmp_path / "m.gguf", TINY.replace(mask_token_id=7), weights, make_vocab(TINY.vocab))
    assert not list(tmp_path.iterdir())


def test_a_failed_write_leaves_no_file(tmp_path):
    sources = {name: TensorSource(shape, GGMLType.F32, lambda s=shape: np.zeros(s, np.float32))
               for name, shape in tensor_shapes(TINY).items()}

    def broken():
        raise RuntimeError("disk on fire")

    sources["blk.1.ffn_up.weight"] = TensorSource((TINY.ffn, TINY.hidden), GGMLType.F32, broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_tensors(tmp_path / "m.gguf", TINY, sources, make_vocab(TINY.vocab))
    assert not list(tmp_path.iterdir())
