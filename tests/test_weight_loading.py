"""Loading weights for the engine: Q8_0 matrices stay views of the file's map until unpacked,
and the engine's parameters, unpacked in row chunks on a thread pool straight from the
blocks, equal the plain stacked matrices."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from trimode.model.gguf_file import load_model
from trimode.model.weights import INT8_DOT_GROUP, Q8Matrix, packed, packed_for_int8_dot
from trimode.runtime import engine as engine_module
from trimode.runtime.engine import packed_parameters, parameter_groups, quantized_parts


def test_a_file_matrix_is_a_view_until_used(tiny_gguf):
    model = load_model(tiny_gguf)
    wq = model.weights.layers[0].wq
    assert wq._q is None and wq._scale is None  # nothing unpacked by loading
    q, scale = np.empty(wq.shape, np.int8), np.empty((wq.shape[0], wq.shape[1] // 32), np.float16)
    wq.unpack_into(q, scale)
    assert wq._q is None  # unpacking into a buffer keeps no copy
    assert np.array_equal(wq.q, q) and np.array_equal(wq.scale, scale)
    blocks = wq.to_blocks()  # and back to the file's form
    assert blocks.tobytes() == model.weights.layers[0].wq._blocks.tobytes()


def test_unpack_rows_of_a_materialized_matrix():
    rng = np.random.default_rng(0)
    m = Q8Matrix(q=rng.integers(-127, 128, (8, 64), dtype=np.int8),
                 scale=rng.random((8, 2)).astype(np.float16))
    q, scale = np.empty((3, 64), np.int8), np.empty((3, 2), np.float16)
    m.unpack_into(q, scale, slice(2, 5))
    assert np.array_equal(q, m.q[2:5]) and np.array_equal(scale, m.scale[2:5])


def loaded_parameters(weights, packed_names=None) -> dict[str, np.ndarray]:
    """Every group parameter_groups yields, copied, checking on the way that no name comes
    twice and that a group never overlaps the one uploading before it (reused buffers)."""
    params, previous = {}, {}
    with ThreadPoolExecutor(3) as pool:
        for group in parameter_groups(weights, quantized_parts(weights), "float32", pool, packed_names):
            assert not params.keys() & group.keys()
            assert not any(np.shares_memory(a, b) for a in group.values() for b in previous.values())
            params.update({name: array.copy() for name, array in group.items()})
            previous = group
    return params


def test_parameters_in_small_chunks_equal_the_stacked_matrices(tiny_gguf, monkeypatch):
    monkeypatch.setattr(engine_module, "UNPACK_CHUNK_BYTES", 300)  # a few rows per chunk
    weights = load_model(tiny_gguf).weights
    params = loaded_parameters(weights)
    layer = weights.layers[1]
    for name, mats in (("qkv", [layer.wq, layer.wk, layer.wv]), ("down", [layer.w_down])):
        assert np.array_equal(params[f"layers.1.{name}.q"], np.concatenate([m.q for m in mats]))
        assert np.array_equal(params[f"layers.1.{name}.scale"], np.concatenate([m.scale for m in mats]))
    # gate_up interleaves its rows (gate 0, up 0, gate 1, ...): the gated matmul's pairs
    gate, up = layer.w_gate, layer.w_up
    interleaved = lambda a, b: np.stack([a, b], axis=1).reshape(-1, a.shape[1])  # noqa: E731
    assert np.array_equal(params["layers.1.gate_up.q"], interleaved(gate.q, up.q))
    assert np.array_equal(params["layers.1.gate_up.scale"], interleaved(gate.scale, up.scale))
    assert np.array_equal(params["head.q"], weights.output.q)
    assert params["layers.0.attn_norm.weight"].dtype == np.float32


def test_packed_parameters_equal_the_stacked_matrices_packed(tiny_gguf, monkeypatch):
    """The CPU layouts (16 features to a vector; q in groups of 4 inputs offset to uint8 for the
    int8 kernels), packed by chunks of one pack on the pool, for the parameters the compiled
    module declares 3-D, and only those, each as its shape says."""
    monkeypatch.setattr(engine_module, "UNPACK_CHUNK_BYTES", 300)
    weights = load_model(tiny_gguf).weights
    manifest = {"params": [{"name": "layers.1.qkv.q", "shape": [30, 384, 16]},
                           {"name": "layers.1.qkv.scale", "shape": [30, 12, 16]},
                           {"name": "head.q", "shape": [256, 96, 64]},
                           {"name": "head.scale", "shape": [256, 12, 16]},
                           {"name": "layers.1.down.q", "shape": [384, 1024]},
                           {"name": "embed.q", "shape": [4096, 384]}]}
    wanted = packed_parameters(manifest)
    assert wanted == {"layers.1.qkv": 1, "head": INT8_DOT_GROUP}
    params = loaded_parameters(weights, wanted)
    layer = weights.layers[1]
    qkv = [layer.wq, layer.wk, layer.wv]
    assert np.array_equal(params["layers.1.qkv.q"], packed(np.concatenate([m.q for m in qkv])))
    assert np.array_equal(params["layers.1.qkv.scale"], packed(np.concatenate([m.scale for m in qkv])))
    assert np.array_equal(params["head.q"], packed_for_int8_dot(weights.output.q))
    assert np.array_equal(params["head.scale"], packed(weights.output.scale))
    assert np.array_equal(params["layers.1.down.q"], layer.w_down.q)  # not declared packed
    assert np.array_equal(params["embed.q"], weights.embed.q)


def test_a_q8matrix_needs_its_parts():
    with pytest.raises(ValueError, match="needs q and scale"):
        Q8Matrix(q=np.zeros((1, 32), np.int8))
