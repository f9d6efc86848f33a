"""NLD as ONNX graphs (opset 21), one per attention mask: an independent check of the TVM build.

    causal.onnx         tokens at positions P.. over a past of P tokens, causal within the
                        block; outputs logits and the block's K/V (the caller appends them)
    bidirectional.onnx  the same inputs; every block token sees the whole block; logits only
    weights.bin         every weight once, shared by both graphs as ONNX external data
    inputs.json         the graphs' inputs and outputs: names, shapes, dtypes, meaning

Q8_0 matrices stay as in the GGUF (int8 [N, K] + fp16 scale [N, K/32]) and run as blocked
DequantizeLinear (axis 1, block 32) into Gemm; the embedding gathers int8 rows and their
scales, then dequantizes. Rope tables and the long-context query scale are inputs computed on
the host from ModelConfig (`graph_inputs` builds them), so the graph holds no YaRN math.
Needs only the `onnx` package; nothing here imports TVM.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from trimode.model.config import ModelConfig
from trimode.model.weights import Q8_BLOCK, ModelWeights, Q8Matrix

OPSET = 21  # the first opset whose DequantizeLinear takes block_size
IR_VERSION = 10  # the IR version that goes with opset 21
WEIGHTS_FILE = "weights.bin"
INPUTS_FILE = "inputs.json"
GRAPH_FILES = {"causal": "causal.onnx", "bidirectional": "bidirectional.onnx"}
# Offsets of weights in weights.bin are page aligned, so runtimes may map them in place.
ALIGN = 4096


@dataclass(frozen=True)
class Port:
    """One graph input or output; dims are ints or symbolic names."""
    name: str
    dtype: int  # onnx.TensorProto element type
    dims: tuple
    meaning: str

    def value_info(self) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(self.name, self.dtype, list(self.dims))

    def describe(self) -> dict:
        return {"name": self.name, "dtype": helper.tensor_dtype_to_np_dtype(self.dtype).name,
                "shape": list(self.dims), "meaning": self.meaning}


def input_ports(cfg: ModelConfig) -> list[Port]:
    f32, half = TensorProto.FLOAT, cfg.head_dim // 2
    past = (cfg.n_layers, "P", cfg.n_kv_heads, cfg.head_dim)
    return [
        Port("tokens", TensorProto.INT64, ("T",), "token ids of the block, at positions P..P+T-1"),
        Port("past_keys", f32, past, "roped keys of the P cached tokens, every layer"),
        Port("past_values", f32, past, "values of the P cached tokens, every layer"),
        Port("rope_cos", f32, ("T", half), "YaRN cos of the block's positions (ModelConfig.rope_tables)"),
        Port("rope_sin", f32, ("T", half), "YaRN sin of the block's positions"),
        Port("q_scale", f32, ("T",), "long-context query scale of the block's positions (ModelConfig.q_scale)"),
    ]


def output_ports(cfg: ModelConfig, causal: bool) -> list[Port]:
    logits = Port("logits", TensorProto.FLOAT, ("T", cfg.vocab), "logits of every block row")
    if not causal:
        return [logits]
    present = (cfg.n_layers, "T", cfg.n_kv_heads, cfg.head_dim)
    return [logits,
            Port("present_keys", TensorProto.FLOAT, present, "the block's roped keys, to append to past_keys"),
            Port("present_values", TensorProto.FLOAT, present, "the block's values, to append to past_values")]


def graph_inputs(cfg: ModelConfig, tokens, past_keys: np.ndarray, past_values: np.ndarray) -> dict:
    """The feed of one run: the block `tokens` after the cached `past_*` [L, P, kv_heads, d]."""
    start, n = past_keys.shape[1], len(tokens)
    cos, sin = cfg.rope_tables(start + n)
    return {"tokens": np.asarray(tokens, np.int64),
            "past_keys": np.asarray(past_keys, np.float32),
            "past_values": np.asarray(past_values, np.float32),
            "rope_cos": cos[start:].astype(np.float32),
            "rope_sin": sin[start:].astype(np.float32),
            "q_scale": cfg.q_scale(np.arange(start, start + n)).astype(np.float32)}


def empty_past(cfg: ModelConfig) -> np.ndarray:
    return np.zeros((cfg.n_layers, 0, cfg.n_kv_heads, cfg.head_dim), np.float32)


# ---------------------------------------------------------------------------------------------
# Building a graph

class GraphBuilder:
    """Nodes in order, small constants inline, weights by name (stored once for both graphs)."""

    def __init__(self, weights: dict[str, np.ndarray]):
        self.nodes: list[onnx.NodeProto] = []
        self.constants: list[TensorProto] = []
        self.weights = weights
        self._count = 0

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        self._count += 1
        out = f"{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value, dtype=np.float32) -> str:
        name = f"const_{len(self.constants)}"
        self.constants.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def ints(self, *values: int) -> str:
        return self.const(values, np.int64)

    def weight(self, name: str, array: np.ndarray) -> str:
        self.weights.setdefault(name, np.ascontiguousarray(array))
        return name

    def output(self, value: str, name: str) -> None:
        self.nodes.append(helper.make_node("Identity", [value], [name]))


def dequantized(g: GraphBuilder, q: str, scale_f16: str) -> str:
    # The fp16 scale is widened first: q * scale is then exact in float32 (8 + 11 bits),
    # where a float16 DequantizeLinear output would round it.
    scale = g.op("Cast", scale_f16, to=TensorProto.FLOAT)
    return g.op("DequantizeLinear", q, scale, axis=1, block_size=Q8_BLOCK)


def linear(g: GraphBuilder, x: str, mat, name: str) -> str:
    """x [T, K] @ W^T -> [T, N]; W is a Q8Matrix [N, K] or a float matrix [N, K]."""
    if isinstance(mat, Q8Matrix):
        w = dequantized(g, g.weight(f"{name}.q", mat.q), g.weight(f"{name}.scale", mat.scale))
    else:
        w = g.weight(f"{name}.weight", np.asarray(mat, np.float32))
    return g.op("Gemm", x, w, transB=1)


def embedding(g: GraphBuilder, tokens: str, table) -> str:
    if isinstance(table, Q8Matrix):
        rows = g.op("Gather", g.weight("embed.q", table.q), tokens, axis=0)          # [T, H] int8
        scales = g.op("Gather", g.weight("embed.scale", table.scale), tokens, axis=0)  # [T, H/32]
        return dequantized(g, rows, scales)
    return g.op("Gather", g.weight("embed.weight", np.asarray(table, np.float32)), tokens, axis=0)


def rmsnorm(g: GraphBuilder, x: str, weight: np.ndarray, name: str, eps: float) -> str:
    mean_sq = g.op("ReduceMean", g.op("Mul", x, x), g.ints(-1), keepdims=1)
    inv_rms = g.op("Reciprocal", g.op("Sqrt", g.op("Add", mean_sq, g.const(eps))))
    return g.op("Mul", g.op("Mul", x, inv_rms), g.weight(name, np.asarray(weight, np.float32)))


def rope(g: GraphBuilder, x: str, cos: str, sin: str, half: int) -> str:
    """Rotate-half (NEOX) pairing i <-> i + d/2. x [T, heads, d]; cos/sin [T, 1, d/2]."""
    x1 = g.op("Slice", x, g.ints(0), g.ints(half), g.ints(-1))
    x2 = g.op("Slice", x, g.ints(half), g.ints(2 * half), g.ints(-1))
    first = g.op("Sub", g.op("Mul", x1, cos), g.op("Mul", x2, sin))
    second = g.op("Add", g.op("Mul", x2, cos), g.op("Mul", x1, sin))
    return g.op("Concat", first, second, axis=-1)


def causal_mask(g: GraphBuilder) -> str:
    """Additive [T, P+T]: row t sees the whole past and block tokens 0..t."""
    n_new = g.op("Squeeze", g.op("Shape", "tokens"))
    n_past = g.op("Squeeze", g.op("Shape", "past_keys", start=1, end=2))
    zero, one = g.const(0, np.int64), g.const(1, np.int64)
    rows = g.op("Unsqueeze", g.op("Range", zero, n_new, one), g.ints(1))       # [T, 1]
    cols = g.op("Range", zero, g.op("Add", n_past, n_new), one)                 # [P+T]
    visible = g.op("LessOrEqual", cols, g.op("Add", rows, n_past))             # [T, P+T]
    return g.op("Where", visible, g.const(0.0), g.const(-np.inf))


def attention(g: GraphBuilder, cfg: ModelConfig, q: str, keys: str, values: str, mask: str | None) -> str:
    """q [T, heads, d]; keys/values [S, kv_heads, d] -> [T, heads * d]. GQA without copying
    K/V: q head j = kv head j // group, so q is viewed as [kv_heads, group, T, d] and K/V as
    [kv_heads, 1, S, d], and MatMul broadcasts each kv head over its group."""
    kvh, group, d = cfg.n_kv_heads, cfg.group_size, cfg.head_dim
    q = g.op("Transpose", g.op("Reshape", q, g.ints(-1, kvh, group, d)), perm=[1, 2, 0, 3])
    k_t = g.op("Unsqueeze", g.op("Transpose", keys, perm=[1, 2, 0]), g.ints(1))   # [kvh, 1, d, S]
    v = g.op("Unsqueeze", g.op("Transpose", values, perm=[1, 0, 2]), g.ints(1))   # [kvh, 1, S, d]
    scores = g.op("Mul", g.op("MatMul", q, k_t), g.const(1.0 / np.sqrt(d)))       # [kvh, g, T, S]
    if mask is not None:
        scores = g.op("Add", scores, mask)
    out = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)                     # [kvh, g, T, d]
    return g.op("Reshape", g.op("Transpose", out, perm=[2, 0, 1, 3]), g.ints(-1, cfg.q_dim))


def build_graph(cfg: ModelConfig, weights: ModelWeights, causal: bool,
                store: dict[str, np.ndarray]) -> onnx.ModelProto:
    """One mask mode's graph; its weights are added to `store` (name -> array), not embedded."""
    g = GraphBuilder(store)
    half = cfg.head_dim // 2
    cos = g.op("Unsqueeze", "rope_cos", g.ints(1))                 # [T, 1, d/2]
    sin = g.op("Unsqueeze", "rope_sin", g.ints(1))
    q_scale = g.op("Unsqueeze", "q_scale", g.ints(1, 2))          # [T, 1, 1]
    mask = causal_mask(g) if causal else None
    heads_shape = g.ints(-1, cfg.n_heads, cfg.head_dim)
    kv_shape = g.ints(-1, cfg.n_kv_heads, cfg.head_dim)

    x = embedding(g, "tokens", weights.embed)                      # [T, H]
    new_keys, new_values = [], []
    for i, layer in enumerate(weights.layers):
        p = f"layers.{i}"
        h = rmsnorm(g, x, layer.attn_norm, f"{p}.attn_norm", cfg.rms_eps)
        q = g.op("Reshape", linear(g, h, layer.wq, f"{p}.wq"), heads_shape)
        k = g.op("Reshape", linear(g, h, layer.wk, f"{p}.wk"), kv_shape)
        v = g.op("Reshape", linear(g, h, layer.wv, f"{p}.wv"), kv_shape)
        q = g.op("Mul", rope(g, q, cos, sin, half), q_scale)
        k = rope(g, k, cos, sin, half)
        new_keys.append(g.op("Unsqueeze", k, g.ints(0)))
        new_values.append(g.op("Unsqueeze", v, g.ints(0)))
        layer_index = g.ints(i)
        past_k = g.op("Squeeze", g.op("Gather", "past_keys", layer_index, axis=0), g.ints(0))
        past_v = g.op("Squeeze", g.op("Gather", "past_values", layer_index, axis=0), g.ints(0))
        keys = g.op("Concat", past_k, k, axis=0)                  # [P+T, kvh, d]
        values = g.op("Concat", past_v, v, axis=0)
        attn = attention(g, cfg, q, keys, values, mask)
        x = g.op("Add", x, linear(g, attn, layer.wo, f"{p}.wo"))
        h = rmsnorm(g, x, layer.ffn_norm, f"{p}.ffn_norm", cfg.rms_eps)
        gate = linear(g, h, layer.w_gate, f"{p}.w_gate")
        up = linear(g, h, layer.w_up, f"{p}.w_up")
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)   # silu(gate) * up
        x = g.op("Add", x, linear(g, act, layer.w_down, f"{p}.w_down"))
    h = rmsnorm(g, x, weights.output_norm, "output_norm", cfg.rms_eps)
    g.output(linear(g, h, weights.output, "output"), "logits")
    if causal:
        g.output(g.op("Concat", *new_keys, axis=0), "present_keys")
        g.output(g.op("Concat", *new_values, axis=0), "present_values")

    graph = helper.make_graph(
        g.nodes, f"nld_{'causal' if causal else 'bidirectional'}",
        [p.value_info() for p in input_ports(cfg)],
        [p.value_info() for p in output_ports(cfg, causal)],
        initializer=g.constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="trimode")
    model.ir_version = IR_VERSION
    return model


# ---------------------------------------------------------------------------------------------
# Writing

def write_weights(store: dict[str, np.ndarray], path: Path) -> list[TensorProto]:
    """Writes every array once (page aligned) and returns initializers pointing into the file."""
    tensors = []
    with open(path, "wb") as out:
        for name, array in store.items():
            offset = out.tell() + -out.tell() % ALIGN
            out.seek(offset)
            array.tofile(out)
            tensor = TensorProto(name=name, dims=array.shape,
                                 data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                                 data_location=TensorProto.EXTERNAL)
            for key, value in (("location", path.name), ("offset", offset), ("length", array.nbytes)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            tensors.append(tensor)
    return tensors


def export_onnx(cfg: ModelConfig, weights: ModelWeights, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Writes both graphs, weights.bin and inputs.json into `out_dir`; returns the graph paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store: dict[str, np.ndarray] = {}
    graphs = {mode: build_graph(cfg, weights, mode == "causal", store) for mode in GRAPH_FILES}
    initializers = write_weights(store, out_dir / WEIGHTS_FILE)
    paths = {}
    for mode, model in graphs.items():
        model.graph.initializer.extend(initializers)
        paths[mode] = out_dir / GRAPH_FILES[mode]
        onnx.save_model(model, paths[mode])
    description = {
        "opset": OPSET, "weights": WEIGHTS_FILE,
        "geometry": cfg.geometry_key(),
        "inputs": [p.describe() for p in input_ports(cfg)],
        "graphs": {mode: {"file": GRAPH_FILES[mode],
                          "outputs": [p.describe() for p in output_ports(cfg, mode == "causal")]}
                   for mode in GRAPH_FILES},
    }
    (out_dir / INPUTS_FILE).write_text(json.dumps(description, indent=2) + "\n")
    return paths
