"""Which kernel computes what, per target: the one place the model's ops meet the factories.

`rows` names the row-count class of a pass: "one" (decode, m = 1), "block" (verify and
draft, m <= MAX_BLOCK), "many" (prefill, any m). GPU kernels may be specialised per class;
the CPU ones handle any m.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from trimode.compiler.kernels import attention, embedding, kv_quant, logits, norm, q8_matmul, q8_matmul_amx, rope
from trimode.model.config import ModelConfig
from trimode.model.kv_cache import check_kv_cache, kv_dtype, kv_row
from trimode.model.weights import INT8_DOT_GROUP, Q8_BLOCK, packed_shape
from trimode.runtime.forward import MAX_BLOCK
from trimode.schedules import entry_key


@dataclass
class Kernels:
    cfg: ModelConfig
    target_kind: str  # "llvm" | "cuda"
    schedules: dict = field(default_factory=dict)
    # CPU only: Q8_0 matmuls take their activations quantized to int8, multiplied by this
    # dot product (q8_matmul.INT8_DOTS; artifacts.int8_activations_enabled says which)
    int8_activations: str | None = None
    # CPU only: fp32 lanes of the vector register (pipeline.register_lanes)
    register_lanes: int = 8
    # how the K/V cache keeps a row (model/kv_cache.py); q8_0 on CPU builds only
    kv_cache: str = "f16"
    # CPU only: block and prefill passes' int8 matmuls on AMX tiles (artifacts.amx_enabled)
    amx: bool = False

    def __post_init__(self):
        check_kv_cache(self.kv_cache, self.cfg.head_dim, self.target_kind)

    @property
    def dtype(self) -> str:
        # fp16 on llvm is pathologically slow (TVM.md); GPUs want half precision.
        return "float32" if self.target_kind == "llvm" else "float16"

    @property
    def kv_dtype(self) -> str:
        # The K/V cache and the block's K/V in fp16 by default, on every target, as llama.cpp
        # keeps them: half the memory and half the bytes a long-context step reads of fp32
        # (the CPU converts on load, F16C; it does no arithmetic in fp16). q8_0: int8 rows.
        return kv_dtype(self.kv_cache)

    @property
    def kv_row(self) -> int:
        """The cache tensor's last dimension: a row's elements (kv_cache.kv_row)."""
        return kv_row(self.kv_cache, self.cfg.head_dim)

    @property
    def is_gpu(self) -> bool:
        return self.target_kind == "cuda"

    @property
    def matmul_activations(self) -> str:
        """What the Q8_0 matmuls multiply the weights by (the manifest records it)."""
        return "int8" if self.int8_activations else self.dtype

    def q8_weight_shapes(self, n: int, k: int) -> tuple[tuple, tuple, str]:
        """The shapes of a Q8_0 matrix's q and scale parameters as the matmul reads them, and
        q's dtype: [N, K] and [N, K / 32] on CUDA; packed 16 features to a vector on the CPU
        (q8_matmul.py), q in groups of 4 inputs offset to uint8 for int8 dot products
        (weights.pack_for_int8_dot)."""
        if self.is_gpu:
            return (n, k), (n, k // Q8_BLOCK), "int8"
        if self.int8_activations:
            return packed_shape(n, k, INT8_DOT_GROUP), packed_shape(n, k // Q8_BLOCK), "uint8"
        return packed_shape(n, k), packed_shape(n, k // Q8_BLOCK), "int8"

    def quantize_rows(self, k: int, rows: str):
        """The int8 matmuls' activations from fp32 rows (q8_matmul.quantize_rows)."""
        assert self.int8_activations, "only a build with int8 activations quantizes them"
        return opaque(_cached(q8_matmul.quantize_rows, k, rows))

    def q8_matmul(self, n: int, k: int, rows: str, gated: bool = False):
        """gated: the kernel ends with silu(gate) * up of row pairs (model.swiglu)."""
        if not self.is_gpu:
            if self.amx and rows != "one":
                return _cached(q8_matmul_amx.q8_matmul_amx, n, k, rows, gated)
            return _cached(q8_matmul.q8_matmul_cpu, n, k, rows, gated, self.int8_activations)
        from trimode.compiler.kernels import q8_matmul_cuda

        m = Q8_ROWS[rows]

        def tuned(m):  # tuning measures the plain kernel: gated_schedule fits it to the gated one
            schedule = self.schedules.get(entry_key("q8_matmul", (n, k), m))
            return q8_matmul_cuda.gated_schedule(schedule) if gated else schedule

        return opaque(q8_matmul_cuda.q8_matmul(n, k, m, self.dtype, schedule=tuned(m),
                                               block_schedule=tuned("block"), gated=gated))

    def q8_embedding(self, vocab: int, hidden: int):
        return embedding.q8_embedding(vocab, hidden, self.dtype)

    def float_embedding(self, vocab: int, hidden: int):
        return embedding.float_embedding(vocab, hidden, self.dtype)

    def rms_norm(self, hidden: int, eps: float):
        return _cached(norm.rms_norm, hidden, eps, self.dtype)

    def add_rms_norm(self, hidden: int, eps: float):
        return _cached(norm.add_rms_norm, hidden, eps, self.dtype)

    def rope_split(self):
        c = self.cfg
        if self.kv_cache == "q8_0":
            return _cached(kv_quant.rope_split_q8, c.n_heads, c.n_kv_heads, c.head_dim, self.dtype)
        return _cached(rope.rope_split, c.n_heads, c.n_kv_heads, c.head_dim, self.dtype,
                       self.kv_dtype)

    def rope_split_append(self):
        c = self.cfg
        if self.kv_cache == "q8_0":
            return _cached(kv_quant.rope_split_append_q8, c.n_layers, c.n_heads, c.n_kv_heads,
                           c.head_dim, self.dtype)
        return _cached(rope.rope_split_append, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim,
                       self.dtype, self.kv_dtype)

    def attention(self, causal: bool, rows: str):
        c = self.cfg
        if not self.is_gpu:
            return _cached(attention.attention_cpu, c.n_layers, c.n_heads, c.n_kv_heads,
                           c.head_dim, causal, self.kv_cache, self.register_lanes)
        plan = self._attention_plan(rows)
        if cuda_attention_kernel(rows, c.head_dim) == "attention_mma":
            from trimode.compiler.kernels import attention_mma

            return opaque(attention_mma.attention_mma(c.n_heads, c.n_kv_heads, c.head_dim, causal,
                                                      self.dtype, rows, plan))
        from trimode.compiler.kernels import attention_cuda

        return opaque(attention_cuda.attention_cuda(c.n_heads, c.n_kv_heads, c.head_dim, causal,
                                                    self.dtype, 1 if rows == "one" else "dynamic",
                                                    plan=plan))

    def attention_scratch(self, rows: str, t) -> list[list]:
        """Shapes of the fp32 split buffers the attention kernel takes after its output (none
        on CPU). Bounded row classes get a constant size, so the buffers are planned once and
        a CUDA graph can own them; prefill's grow with T."""
        if not self.is_gpu:
            return []
        from trimode.compiler.kernels import attention_cuda

        c, plan = self.cfg, self._attention_plan(rows)
        if rows == "many":
            n = attention_cuda.scratch_rows_at(c.n_heads, c.n_kv_heads, plan, t)
        else:
            n = attention_cuda.scratch_rows(c.n_heads, c.n_kv_heads, plan,
                                            1 if rows == "one" else MAX_BLOCK)
        return [[n, c.n_heads, c.head_dim], [n, c.n_heads]]

    def _attention_plan(self, rows: str):
        from trimode.compiler.kernels import attention_cuda, attention_mma

        c = self.cfg
        name = cuda_attention_kernel(rows, c.head_dim)
        kernel = attention_mma if name == "attention_mma" else attention_cuda
        tuned = self.schedules.get(f"{name}/{rows}")
        if tuned:
            return attention_cuda.AttentionPlan(**tuned)
        return kernel.default_plan(c.n_heads, c.n_kv_heads, rows, c.head_dim)

    def last_row(self, hidden: int):
        return _cached(logits.last_row, hidden, self.dtype)

    def argmax_prob(self, vocab: int):
        if self.is_gpu:  # one pass, 16-byte loads (dlight's schedule of the TIR: three scalar passes)
            from trimode.compiler.kernels import argmax_cuda

            return opaque(argmax_cuda.argmax_prob_cuda(vocab))
        return opaque(_cached(logits.argmax_prob, vocab))

    def top_candidates(self, vocab: int):
        """GPU only: each row's largest logits, which the host samples top-k from instead of
        copying the row over PCIe. On the CPU the row is in host memory already."""
        assert self.is_gpu, "top candidates are a GPU build's entry"
        from trimode.compiler.kernels import topk_cuda

        return opaque(topk_cuda.top_candidates_cuda(vocab))

    def chunk_mass(self, vocab: int):
        """GPU only: each row's softmax mass by chunks, from which the host draws without top-k
        and then copies only the chunk the draw lands in."""
        assert self.is_gpu, "chunk masses are a GPU build's entry"
        from trimode.compiler.kernels import chunk_mass_cuda

        return opaque(chunk_mass_cuda.chunk_mass_cuda(vocab))


def cuda_attention_kernel(rows: str, head_dim: int) -> str:
    """The CUDA attention kernel of a row class (also its schedule database's key prefix).
    Blocks and prefills share each K/V tile among T * G rows: tensor cores where head_dim
    allows. Decode has G rows per kv head: the CUDA-core split-KV kernel."""
    from trimode.compiler.kernels import attention_mma

    return "attention_mma" if rows != "one" and attention_mma.supports(head_dim) else "attention"


# The CUDA Q8_0 kernel's row class per pass (q8_matmul_cuda: decode one row, verify/draft any
# T <= MAX_BLOCK with one kernel, prefill any T); also the schedule databases' m keys.
Q8_ROWS = {"one": 1, "block": "block", "many": "dynamic"}
OPAQUE = 8  # relax's kOpaque op pattern


def opaque(func):
    """Hand-written kernels are called as they are: FuseOps must not merge them with neighbours."""
    return func.with_attr("op_pattern", OPAQUE)


@lru_cache(maxsize=None)
def _cached(factory, *args):
    # One PrimFunc object per (factory, sizes): the module then holds one copy of each kernel.
    return factory(*args)
