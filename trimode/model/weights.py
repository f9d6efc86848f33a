"""Weights as the engine holds them: Q8_0 stays 8-bit (int8 values + fp16 scale per 32).

A Q8_0 matrix of ggml shape {K, N} (K contiguous) becomes q int8 [N, K] and scale fp16
[N, K // 32], so row n of the matrix is output feature n, the layout every kernel reads.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Q8_BLOCK = 32
# The CPU matmul reads weights 16 features to a vector (two AVX2 registers of fp32), so its
# inner step is an outer product without horizontal sums: pack_features lays them out so.
FEATURES_PER_PACK = 16
# Inputs per lane of an int8 dot product (vpdpbusd sums 4 byte products, as AVX2's emulation of it).
INT8_DOT_GROUP = 4
# The on-disk block: fp16 scale, then 32 int8 values (34 bytes).
Q8_0_DTYPE = np.dtype([("d", "<f2"), ("qs", "i1", (Q8_BLOCK,))])


class Q8Matrix:
    """q int8 [N, K] and scale float16 [N, K // 32]. A matrix read from a file keeps the file's
    blocks (a view of its memory map) and unpacks them on first use of q or scale, or
    straight into an engine's parameter buffer (unpack_into) without keeping a copy."""

    def __init__(self, q: np.ndarray | None = None, scale: np.ndarray | None = None, *,
                 blocks: np.ndarray | None = None):
        if blocks is None and (q is None or scale is None):
            raise ValueError("a Q8Matrix needs q and scale, or blocks")
        self._q, self._scale, self._blocks = q, scale, blocks

    @property
    def shape(self) -> tuple[int, int]:
        if self._q is not None:
            return self._q.shape
        n, nb = self._blocks.shape
        return n, nb * Q8_BLOCK

    @property
    def q(self) -> np.ndarray:
        if self._q is None:
            self._q = np.ascontiguousarray(self._blocks["qs"]).reshape(self.shape)
        return self._q

    @property
    def scale(self) -> np.ndarray:
        if self._scale is None:
            self._scale = np.ascontiguousarray(self._blocks["d"])
        return self._scale

    @classmethod
    def from_blocks(cls, raw: np.ndarray, n: int, k: int) -> "Q8Matrix":
        """Over GGUF Q8_0 blocks (any buffer of n * k / 32 blocks), not copied."""
        blocks = np.frombuffer(raw, dtype=Q8_0_DTYPE, count=n * k // Q8_BLOCK).reshape(n, k // Q8_BLOCK)
        return cls(blocks=blocks)

    def unpack_into(self, q: np.ndarray, scale: np.ndarray, rows: slice = slice(None)) -> None:
        """Write rows `rows` of q and scale into q int8 [r, K] and scale float16 [r, K // 32]."""
        if self._blocks is None or self._q is not None:
            q[...], scale[...] = self.q[rows], self.scale[rows]
            return
        blocks = self._blocks[rows]
        # q may be a strided view (interleaved rows); splitting its contiguous last axis keeps
        # it a view, so the writes land in q
        blocks_of_q = q.reshape(len(blocks), -1, Q8_BLOCK)
        if not np.shares_memory(blocks_of_q, q):
            raise ValueError("unpack_into: q's rows must each be contiguous")
        blocks_of_q[...] = blocks["qs"]
        scale[...] = blocks["d"]

    def to_blocks(self) -> np.ndarray:
        n, k = self.shape
        blocks = np.empty((n, k // Q8_BLOCK), dtype=Q8_0_DTYPE)
        blocks["d"] = self.scale
        blocks["qs"] = self.q.reshape(n, k // Q8_BLOCK, Q8_BLOCK)
        return blocks

    def dequantize(self, dtype=np.float32) -> np.ndarray:
        n, k = self.shape
        w = self.q.reshape(n, k // Q8_BLOCK, Q8_BLOCK).astype(dtype) * self.scale.astype(dtype)[:, :, None]
        return w.reshape(n, k)

    @classmethod
    def quantize(cls, w: np.ndarray) -> "Q8Matrix":
        """ggml's reference Q8_0 quantizer: d = max|w| / 127 per block, q = round(w / d)."""
        n, k = w.shape
        blocks = np.asarray(w, np.float32).reshape(n, k // Q8_BLOCK, Q8_BLOCK)
        d = np.abs(blocks).max(axis=-1) / 127.0
        inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
        q = np.round(blocks * inv[:, :, None]).astype(np.int8)
        return cls(q=q.reshape(n, k), scale=d.astype(np.float16))


def packed_shape(n: int, cols: int, group: int = 1) -> tuple[int, int, int]:
    """[packs, cols / group, 16 * group]: n features in packs of FEATURES_PER_PACK, the last one
    zero-padded; each feature's `group` consecutive values side by side (pack_features)."""
    return -(-n // FEATURES_PER_PACK), cols // group, FEATURES_PER_PACK * group


def pack_features(rows: np.ndarray, out: np.ndarray, packs: slice = slice(None), group: int = 1) -> None:
    """out[p, c, group * f + j] = rows[16 p + f, group * c + j] for the packs `packs` of out
    (packed_shape): q [N, K] or scale [N, K // 32] as the CPU matmul reads them; features past
    N are zero."""
    first, stop, _ = packs.indices(len(out))
    f = FEATURES_PER_PACK
    src = rows[first * f:stop * f]
    full, cols = len(src) // f, rows.shape[1] // group
    grouped = out.reshape(len(out), cols, f, group)
    grouped[first:first + full] = src[:full * f].reshape(full, f, cols, group).transpose(0, 2, 1, 3)
    if first + full < stop:  # the last pack holds fewer than 16 features
        grouped[first + full] = 0
        grouped[first + full, :, :len(src) - full * f] = src[full * f:].reshape(-1, cols, group).transpose(1, 0, 2)


def pack_for_int8_dot(q: np.ndarray, out: np.ndarray, packs: slice = slice(None)) -> None:
    """Q8_0 values as the int8-activation CPU matmul reads them: packed in groups of
    INT8_DOT_GROUP inputs (one 64-byte vector is 16 features x 4 inputs, the operand of one
    vpdpbusd), offset by 128 to unsigned (the instruction multiplies unsigned by signed bytes;
    the kernel takes the offset back out with the activations' block sums)."""
    pack_features(q.view(np.uint8), out, packs, INT8_DOT_GROUP)
    part = out[packs]
    np.bitwise_xor(part, np.uint8(0x80), out=part)


def packed(rows: np.ndarray, group: int = 1) -> np.ndarray:
    """pack_features into a new array."""
    out = np.empty(packed_shape(*rows.shape, group), rows.dtype)
    pack_features(rows, out, group=group)
    return out


def packed_for_int8_dot(q: np.ndarray) -> np.ndarray:
    """pack_for_int8_dot into a new array."""
    out = np.empty(packed_shape(*q.shape, INT8_DOT_GROUP), np.uint8)
    pack_for_int8_dot(q, out)
    return out


Matrix = "Q8Matrix | np.ndarray"  # a float matrix is float32 [N, K]


def as_float(w) -> np.ndarray:
    return w.dequantize(np.float64) if isinstance(w, Q8Matrix) else np.asarray(w, np.float64)


# The matrices of one layer, as LayerWeights names them (norms aside).
LAYER_MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # float32 [H]
    wq: "Q8Matrix | np.ndarray"  # [n_heads * head_dim, H]
    wk: "Q8Matrix | np.ndarray"  # [n_kv_heads * head_dim, H]
    wv: "Q8Matrix | np.ndarray"
    wo: "Q8Matrix | np.ndarray"  # [H, n_heads * head_dim]
    ffn_norm: np.ndarray
    w_gate: "Q8Matrix | np.ndarray"  # [F, H]
    w_up: "Q8Matrix | np.ndarray"
    w_down: "Q8Matrix | np.ndarray"  # [H, F]


@dataclass
class ModelWeights:
    embed: "Q8Matrix | np.ndarray"  # [V, H]
    layers: list[LayerWeights] = field(default_factory=list)
    output_norm: np.ndarray | None = None  # [H]
    output: "Q8Matrix | np.ndarray | None" = None  # [V, H]


def quantized_parts(weights: ModelWeights) -> dict[str, bool]:
    """Which groups run as Q8_0 (a group with any float matrix runs as float: dequantizing
    Q8_0 is exact, so nothing is lost)."""
    layer_mats = [getattr(layer, n) for layer in weights.layers for n in LAYER_MATRICES]
    return {"embed": isinstance(weights.embed, Q8Matrix),
            "layers": all(isinstance(w, Q8Matrix) for w in layer_mats),
            "output": isinstance(weights.output, Q8Matrix)}
