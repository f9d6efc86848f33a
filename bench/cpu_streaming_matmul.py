"""The CPU's int8 Q8_0 matmul kernel with its weights streaming from memory, as in a whole
model's step (bench/cpu_q8_matmul.py times it on weights in cache): copies of one matmul's
packed weights, 1.5 GB in all, called in turn. Each copy on 4 KB pages (TVM's allocator) and
on huge pages as the runtime uploads weights (tvm_runtime.huge_page_memory), side by side in
rounds; --phases also times huge pages at other offsets past a page (the runtime's is
tvm_runtime.PAGE_PHASE):

    TVM_NUM_THREADS=2 python bench/cpu_streaming_matmul.py [--geometry 3b] [--rows 1,4]
        [--phases 0,192] [--rounds 9]

Prints per matmul and row count the median over rounds of a call's time, and GB/s of weights.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tvm  # noqa: E402
from tvm.target import codegen  # noqa: E402

from trimode.artifacts import cpu_int8_dot  # noqa: E402
from trimode.compiler.kernels import q8_matmul  # noqa: E402
from trimode.model.weights import Q8Matrix, packed, packed_for_int8_dot  # noqa: E402
from trimode.runtime import tvm_runtime  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_q8_matmul import shapes_of  # noqa: E402

STREAMED_BYTES = 1.5e9  # well past this machine's L3 (480 MB)


def on_pages(array: np.ndarray, phase: int | None):
    """A tensor holding array: TVM's allocation (phase None), or a huge-page mapping phase
    bytes past a page."""
    if phase is None:
        return tvm.runtime.tensor(array, tvm.cpu())
    view = tvm_runtime.huge_page_memory(array.nbytes, phase).view(array.dtype).reshape(array.shape)
    view[...] = array
    return tvm.runtime.from_dlpack(view)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--geometry", default="3b")
    ap.add_argument("--rows", default="1,4")
    ap.add_argument("--phases", default="", help="more huge-page offsets past a page to time")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    if tvm_runtime.huge_page_memory(1) is None:
        ap.error("this OS cannot be asked for transparent huge pages")
    dot = cpu_int8_dot()
    if dot is None:
        ap.error("this processor has no int8 dot product")
    target = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(),
                                "num-cores": int(os.environ.get("TVM_NUM_THREADS", "1")),
                                "mattr": q8_matmul.INT8_DOTS[dot].mattr})
    pages = {"4 KB": None, f"huge +{tvm_runtime.PAGE_PHASE}": tvm_runtime.PAGE_PHASE}
    pages.update({f"huge +{p}": int(p) for p in args.phases.split(",") if p})
    rng = np.random.default_rng(0)
    print(f"TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', '1')}, int8 on {dot}, "
          f"median of {args.rounds} rounds; ms a call (GB/s of weights)")
    print("| matmul | n x k | m |" + "".join(f" {name} |" for name in pages))
    print("|---" * (3 + len(pages)) + "|")
    for name, (n, k) in shapes_of(args.geometry).items():
        w = Q8Matrix.quantize(rng.standard_normal((n, k)).astype(np.float32))
        q, scale = packed_for_int8_dot(w.q), packed(w.scale)
        copies = max(2, int(STREAMED_BYTES // q.nbytes))
        weights = {page: [(on_pages(q, phase), on_pages(scale, phase)) for _ in range(copies)]
                   for page, phase in pages.items()}
        for m in (int(r) for r in args.rows.split(",")):
            rows = "one" if m == 1 else "block"
            matmul = tvm.compile(q8_matmul.q8_matmul_cpu(n, k, rows, int8=dot).with_attr(
                "global_symbol", "f"), target=target)["f"]
            x = [tvm.runtime.tensor(a, tvm.cpu()) for a in (
                rng.integers(-127, 128, (m, k)).astype(np.int8), np.ones((m, k // 32), np.float32),
                np.zeros((m, k // 32), np.int32))]
            out = tvm.runtime.tensor(np.zeros((m, n), np.float32), tvm.cpu())
            times = {page: [] for page in pages}
            for _ in range(args.rounds):
                for page, copy in weights.items():
                    started = time.perf_counter()
                    for wq, ws in copy:
                        matmul(*x, wq, ws, out)
                    times[page].append((time.perf_counter() - started) / copies)
            cells = "".join(f" {1e3 * t:.3f} ({q.nbytes / t / 1e9:.1f}) |"
                            for t in (statistics.median(v) for v in times.values()))
            print(f"| {name} | {n} x {k} | {m} |{cells}", flush=True)
        del weights


if __name__ == "__main__":
    main()
