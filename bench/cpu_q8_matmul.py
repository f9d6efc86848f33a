"""The CPU Q8_0 matmul kernel alone (compiler/kernels/q8_matmul.py), built for this processor,
timed at the default model's shapes and a few row counts; beside it, with --baseline REV, the
kernel as that revision wrote it (git show), or with --int8 this tree's int8-activation kernel
(on this processor's widest int8 dot product or --dot's; its quantize kernel's time
included), in the same process, for side by side ratios. --mcpu builds every kernel for
another processor (LLVM's name) whose instructions this one runs: `--mcpu alderlake --dot
avxvnni` times a client core without AVX-512, its AVX2 and AVX-VNNI.

    TVM_NUM_THREADS=1 python bench/cpu_q8_matmul.py [--rows 1,4,16,128] [--baseline REV | --int8]
        [--geometry 3b] [--mcpu NAME] [--dot avx512vnni|avxvnni|avx512bw|avx2]

--baseline REV --int8 times both revisions' int8-activation kernels; --amx the prefill's AMX
kernel beside the AVX-512 VNNI one (this processor needs AMX, and Linux must grant it).

Each figure is the fastest of --repeat calls (on a shared machine the minimum is what the
kernel costs; medians carry the neighbours' load). One thread by default is the kernel's own
cost; set TVM_NUM_THREADS to time the thread pool too.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tvm  # noqa: E402
from tvm.target import codegen  # noqa: E402

from trimode.artifacts import cpu_int8_dot  # noqa: E402
from trimode.compiler.kernels import q8_matmul, q8_matmul_amx  # noqa: E402
from trimode.model.config import GEOMETRIES  # noqa: E402
from trimode.model.reference import int8_rows  # noqa: E402
from trimode.model.weights import Q8Matrix, packed, packed_for_int8_dot  # noqa: E402

# (features, inputs) of the default model's matmuls (hidden 384, FFN 1024, vocab 4096)
SHAPES = {"qkv": (480, 384), "o": (384, 288), "gate_up": (2048, 384), "down": (384, 1024),
          "head": (4096, 384)}


def shapes_of(geometry: str) -> dict[str, tuple[int, int]]:
    """A named geometry's layer matmuls (its head, vocab x hidden, is left out: the float64
    check of it alone would take gigabytes)."""
    c = GEOMETRIES[geometry]
    attn = c.n_heads * c.head_dim
    return {"qkv": (attn + 2 * c.n_kv_heads * c.head_dim, c.hidden), "o": (c.hidden, attn),
            "gate_up": (2 * c.ffn, c.hidden), "down": (c.hidden, c.ffn)}


def kernel_of(rev: str, path: str = "trimode/compiler/kernels/q8_matmul.py") -> types.ModuleType:
    """A kernel module as `rev` wrote it, imported from a file (TVMScript reads its source)."""
    source = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True,
                            cwd=ROOT, check=True).stdout
    file = Path(tempfile.mkdtemp()) / f"{Path(path).stem}_{rev}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fastest_us(module, n: int, k: int, m: int, repeat: int, mcpu: str, int8: str | None = None,
               amx: bool = False, rows: str | None = None) -> float:
    """amx: the prefill kernel on AMX tiles (int8 avx512vnni); rows: the kernels' row class
    (default: decode's at m = 1, a block's to 64, prefill's past it)."""
    rows = rows or ("one" if m == 1 else "block" if m <= 64 else "many")
    mattr = (q8_matmul.INT8_DOTS[int8].mattr if int8 else []) + (q8_matmul_amx.MATTR if amx else [])
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu,
                                "num-cores": int(os.environ["TVM_NUM_THREADS"]),
                                **({"mattr": mattr} if mattr else {})})

    def built(func):
        return tvm.compile(func.with_attr("global_symbol", "f"), target=target)["f"]

    rng = np.random.default_rng(0)
    w = Q8Matrix.quantize(rng.standard_normal((n, k)).astype(np.float32))
    x = rng.standard_normal((m, k)).astype(np.float32)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros((m, n), np.float32), dev)
    if int8:
        kernel = q8_matmul_amx.q8_matmul_amx(n, k, rows) if amx else module.q8_matmul_cpu(n, k, rows, int8=int8)
        quantize, mm = built(module.quantize_rows(k, rows)), built(kernel)
        activations = [tvm.runtime.tensor(np.zeros(s, t), dev) for s, t in module.int8_activation_specs(m, k)]
        weights = [tvm.runtime.tensor(a, dev) for a in (packed_for_int8_dot(w.q), packed(w.scale))]

        def fn(x):
            quantize(x, *activations)
            mm(*activations, *weights, out)

        args = [tvm.runtime.tensor(x, dev)]
        want = int8_rows(x) @ w.dequantize(np.float64).T
    else:
        mm = built(module.q8_matmul_cpu(n, k, rows))
        q, scale = w.q, w.scale
        if hasattr(module, "packed_shape"):  # a kernel of the packed layout (a baseline may predate it)
            q, scale = packed(q), packed(scale)
        fn, args = mm, [tvm.runtime.tensor(a, dev) for a in (x, q, scale)] + [out]
        want = x.astype(np.float64) @ w.dequantize(np.float64).T
    fn(*args)
    assert np.abs(out.numpy() - want).max() <= 1e-4 * np.abs(want).max(), "wrong result"
    return fastest_call_us(fn, args, repeat)


def fastest_call_us(fn, args, repeat: int) -> float:
    """The fastest of `repeat` calls fn(*args), in us."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - started)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,4,16,128", help="row counts (m) to time")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--baseline", metavar="REV", help="a git revision's kernel to time beside this tree's "
                    "(with --int8: both int8-activation kernels)")
    ap.add_argument("--int8", action="store_true", help="this tree's int8-activation kernel beside the fp32 one")
    ap.add_argument("--amx", action="store_true",
                    help="the prefill kernel on AMX tiles beside the AVX-512 VNNI prefill kernel "
                         "(both at every --rows, with their quantize kernel)")
    ap.add_argument("--geometry", choices=sorted(GEOMETRIES), help="that geometry's matmuls instead of the default model's")
    ap.add_argument("--mcpu", default=codegen.llvm_get_system_cpu(), help="the processor to build for (default: this one)")
    ap.add_argument("--dot", choices=sorted(q8_matmul.INT8_DOTS), default=cpu_int8_dot(),
                    help="--int8's dot product (default: this processor's widest)")
    args = ap.parse_args()
    if args.amx:
        from trimode.artifacts import cpu_amx
        if not cpu_amx():
            ap.error("no AMX tiles here (or Linux does not grant them)")
    if args.int8 and not args.dot:
        ap.error("this processor has no int8 dot product")
    shapes = shapes_of(args.geometry) if args.geometry else SHAPES
    os.environ.setdefault("TVM_NUM_THREADS", "1")  # before the first kernel starts the pool
    if args.amx:
        sources = [("vnni", q8_matmul, "avx512vnni", False), ("amx", q8_matmul, "avx512vnni", True)]
    elif args.baseline:
        dot = args.dot if args.int8 else None
        sources = [("this", q8_matmul, dot, False), ("baseline", kernel_of(args.baseline), dot, False)]
    else:
        sources = [("this", q8_matmul, None, False)] + ([("int8", q8_matmul, args.dot, False)] if args.int8 else [])
    by_int8 = (args.int8 and not args.baseline) or args.amx
    second = len(sources) > 1
    print(f"TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}, fastest of {args.repeat}; us; -mcpu={args.mcpu}"
          + (f", int8 on {args.dot}" if args.int8 else ""))
    head = "| matmul | n x k | m |" + "".join(f" {source[0]} |" for source in sources)
    ratio_name = " vnni / amx |" if args.amx else " this / int8 |" if by_int8 else " baseline / this |"
    print(head + (ratio_name if second else ""))
    print("|---" * (head.count("|") - 1 + second) + "|")
    for m in (int(r) for r in args.rows.split(",")):
        for name, (n, k) in shapes.items():
            times = [fastest_us(module, n, k, m, args.repeat, args.mcpu, int8, amx, "many" if args.amx else None)
                     for _, module, int8, amx in sources]
            line = f"| {name} | {n} x {k} | {m} |" + "".join(f" {t:.1f} |" for t in times)
            ratio = times[0] / times[1] if by_int8 else times[1] / times[0] if second else None
            print(line + (f" {ratio:.2f} |" if second else ""), flush=True)


if __name__ == "__main__":
    main()
