"""A candidate layout for the CPU Q8_0 matmul, timed beside the shipped kernel
(compiler/kernels/q8_matmul.py) at the default model's shapes, one thread, in one process.

The shipped kernel takes one weight row against a 4-row tile of x and sums each output
horizontally (a dot-product form). The candidate packs the weights F = 16 features to a
vector ([n / 16, k, 16] int8, scales [n / 16, k / 32, 16]; a host transpose at upload) so
the kernel is an outer product: x[r, k] broadcast times 16 converted weights, R x 16
accumulators in registers, no horizontal sums. Blocks of rows (R > 0) prescale each converted
weight vector by its block's scales; decode (R = 0 in CASES) keeps a per-block sum scaled once.
Not wired into the model (it needs the packed upload for llvm and remainder tiles); both
results are checked against float64 before timing.

    python bench/cpu_q8_packed.py            # CASES=MxR,... (default 1x0,4x4,120x4,120x5,120x6)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TVM_NUM_THREADS", "1")

import tvm  # noqa: E402
from tvm.script import tirx as T  # noqa: E402
from tvm.target import codegen  # noqa: E402

from cpu_q8_matmul import SHAPES, fastest_call_us  # noqa: E402  (this folder's kernel bench)
from trimode.compiler.kernels import q8_matmul  # noqa: E402
from trimode.model.weights import Q8_BLOCK, Q8Matrix  # noqa: E402

F = 16  # features per packed vector: two AVX2 registers of fp32


def packed_kernel(n: int, k: int, R: int):
    """m a multiple of R: R x F accumulators, weights prescaled."""
    nb, n_blocks = n // F, k // Q8_BLOCK

    @T.prim_func(private=True)
    def mm(var_x: T.handle, q: T.Buffer((nb, k, F), "int8"), scale: T.Buffer((nb, n_blocks, F), "float16"),
           var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(var_x, (m, k), "float32")
        y = T.match_buffer(var_y, (m, n), "float32")
        for jo in T.serial(nb):
            acc = T.decl_buffer((R, F), "float32")
            sc = T.decl_buffer((F,), "float32")
            w = T.decl_buffer((F,), "float32")
            for ro in range(m // R):
                for r in T.unroll(R):
                    for f in T.vectorized(F):
                        acc[r, f] = T.float32(0)
                for b in range(n_blocks):
                    for f in T.vectorized(F):
                        sc[f] = T.Cast("float32", scale[jo, b, f])
                    for c in range(Q8_BLOCK):
                        for f in T.vectorized(F):
                            w[f] = T.Cast("float32", q[jo, b * Q8_BLOCK + c, f]) * sc[f]
                        for r in T.unroll(R):
                            for f in T.vectorized(F):
                                acc[r, f] = acc[r, f] + x[ro * R + r, b * Q8_BLOCK + c] * w[f]
                for r in T.unroll(R):
                    for f in T.vectorized(F):
                        y[ro * R + r, jo * F + f] = acc[r, f]
    return mm


def packed_decode_kernel(n: int, k: int):
    """m = 1: each block's sum scaled once (no prescale)."""
    nb, n_blocks = n // F, k // Q8_BLOCK

    @T.prim_func(private=True)
    def mm(var_x: T.handle, q: T.Buffer((nb, k, F), "int8"), scale: T.Buffer((nb, n_blocks, F), "float16"),
           var_y: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(var_x, (m, k), "float32")
        y = T.match_buffer(var_y, (m, n), "float32")
        for jo in T.serial(nb):
            acc = T.decl_buffer((F,), "float32")
            blk = T.decl_buffer((F,), "float32")
            for f in T.vectorized(F):
                acc[f] = T.float32(0)
            for b in range(n_blocks):
                for f in T.vectorized(F):
                    blk[f] = T.float32(0)
                for c in range(Q8_BLOCK):
                    for f in T.vectorized(F):
                        blk[f] = blk[f] + x[0, b * Q8_BLOCK + c] * T.Cast("float32", q[jo, b * Q8_BLOCK + c, f])
                for f in T.vectorized(F):
                    acc[f] = acc[f] + blk[f] * T.Cast("float32", scale[jo, b, f])
            for f in T.vectorized(F):
                y[0, jo * F + f] = acc[f]
    return mm


def main() -> None:
    target = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": 1})
    dev = tvm.cpu()
    print("| matmul | m | current us | packed us | current / packed |")
    cases = [tuple(map(int, c.split("x"))) for c in os.environ.get("CASES", "1x0,4x4,120x4,120x5,120x6").split(",")]
    for m, R in cases:
        assert R == 0 and m == 1 or R > 0 and m % R == 0, f"case {m}x{R}: R = 0 is m = 1, else R divides m"
        for name, (n, k) in SHAPES.items():
            rng = np.random.default_rng(0)
            wq = Q8Matrix.quantize(rng.standard_normal((n, k)).astype(np.float32))
            x = rng.standard_normal((m, k)).astype(np.float32)
            want = x.astype(np.float64) @ wq.dequantize(np.float64).T
            rows = "one" if m == 1 else ("block" if m <= 64 else "many")
            cur = tvm.compile(q8_matmul.q8_matmul_cpu(n, k, rows).with_attr("global_symbol", "mm"), target=target)["mm"]
            packed = packed_decode_kernel(n, k) if R == 0 else packed_kernel(n, k, R)
            new = tvm.compile(packed.with_attr("global_symbol", "mm"), target=target)["mm"]
            qp = np.ascontiguousarray(wq.q.reshape(n // F, F, k).transpose(0, 2, 1))
            sp = np.ascontiguousarray(wq.scale.reshape(n // F, F, k // Q8_BLOCK).transpose(0, 2, 1))
            a_cur = [tvm.runtime.tensor(a, dev) for a in (x, wq.q, wq.scale, np.zeros((m, n), np.float32))]
            a_new = [tvm.runtime.tensor(a, dev) for a in (x, qp, sp, np.zeros((m, n), np.float32))]
            t_cur, t_new = fastest_call_us(cur, a_cur, 30), fastest_call_us(new, a_new, 30)
            for a in (a_cur, a_new):
                assert np.abs(a[3].numpy() - want).max() <= 1e-4 * np.abs(want).max()
            print(f"| {name} {n}x{k} | {m} (R {R}) | {t_cur:.1f} | {t_new:.1f} | {t_cur / t_new:.2f} |", flush=True)


if __name__ == "__main__":
    main()
