"""The CPU attention kernel alone (compiler/kernels/attention.py), built for this processor,
timed at a model's heads over cache fills and block lengths; beside it, with --baseline REV,
the kernel as that revision wrote it, in the same process, for side by side ratios; with
--kv-caches, this tree's kernel over each K/V cache type (model/kv_cache.py), side by side.

    python bench/cpu_attention.py [--heads 32/8/128] [--fills 512,2048,8192] [--rows 1,4,16]
        [--layers 2] [--baseline REV] [--kv-caches f16,q8_0]

Each figure is the fastest of --repeat calls of one layer's attention (causal: a decode or a
verify; --bidirectional: a draft), on every core unless TVM_NUM_THREADS says otherwise (the
kernel's split over heads and positions is part of what it costs). Each result is checked
against float64 first.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import tvm  # noqa: E402
from cpu_q8_matmul import fastest_call_us, kernel_of  # noqa: E402
from test_attention_cuda import attention_reference  # noqa: E402
from tvm.target import codegen  # noqa: E402

from trimode.compiler.kernels import attention  # noqa: E402
from trimode.compiler.pipeline import register_lanes  # noqa: E402
from trimode.model.kv_cache import kv_round, q8_0_rows  # noqa: E402
from trimode.runtime.tvm_runtime import physical_cores  # noqa: E402


def fastest_us(module, heads: tuple[int, int, int], layers: int, fill: int, t: int, causal: bool,
               repeat: int, cache_type: str = "f16") -> float:
    n_heads, n_kv_heads, d = heads
    target = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    # the kernel takes its cache type (a baseline may predate them: an fp16 or fp32 dtype
    # then), one written for a register width takes the target's, as the model build gives it
    params = inspect.signature(module.attention_cpu).parameters
    cache_arg = {"kv_cache": [cache_type], "kv_dtype": ["float16"]}.get(next(iter(
        p for p in params if p in ("kv_cache", "kv_dtype")), None), [])
    func = module.attention_cpu(layers, n_heads, n_kv_heads, d, causal, *cache_arg,
                                *([register_lanes(target)] if "register_lanes" in params else []))
    fn = tvm.compile(func.with_attr("global_symbol", "attn"), target=target)["attn"]
    rng = np.random.default_rng(0)
    q = rng.standard_normal((t, n_heads, d)).astype(np.float32)
    kv = rng.standard_normal((layers, 2, n_kv_heads, fill + t, d))
    k_new, v_new = (rng.standard_normal((t, n_kv_heads, d)) for _ in "kv")
    if not cache_arg:  # a kernel from before the fp16 cache: fp32
        stored, seen = (lambda x: x.astype(np.float32)), (lambda x: x.astype(np.float32).astype(np.float64))
    elif cache_type == "q8_0":
        stored, seen = q8_0_rows, (lambda x: kv_round("q8_0", x))
    else:
        stored, seen = (lambda x: x.astype(np.float16)), (lambda x: kv_round("f16", x))
    layer, pos = layers - 1, tvm.runtime.tensor(np.array([fill], np.int32))
    out = tvm.runtime.tensor(np.zeros((t, n_heads, d), np.float32))
    args = [tvm.runtime.tensor(q), tvm.runtime.tensor(stored(kv)), layer, pos,
            tvm.runtime.tensor(stored(k_new)), tvm.runtime.tensor(stored(v_new)), out]
    fn(*args)
    want = attention_reference(q.astype(np.float64), seen(kv), layer, fill, seen(k_new), seen(v_new), causal)
    assert np.abs(out.numpy() - want).max() <= 1e-4, "wrong result"
    return fastest_call_us(fn, args, repeat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", default="32/8/128", help="query heads / kv heads / head size")
    ap.add_argument("--fills", default="512,2048,8192")
    ap.add_argument("--rows", default="1,4,16", help="block lengths (T) to time")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--bidirectional", action="store_true")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--baseline", metavar="REV", help="a git revision's kernel to time beside this tree's")
    ap.add_argument("--kv-caches", default="f16",
                    help="cache types to time this tree's kernel over (q8_0,f16: f16's time / q8_0's)")
    args = ap.parse_args()
    heads = tuple(int(h) for h in args.heads.split("/"))
    sources = [(f"this, {cache}", attention, cache) for cache in args.kv_caches.split(",")]
    if args.baseline:
        sources.append(("baseline", kernel_of(args.baseline, "trimode/compiler/kernels/attention.py"), "f16"))
    ratio = args.baseline or len(sources) == 2  # the second column's time over the first's
    # the engine's thread count (TVM's own default is half the logical CPUs on x86: one here)
    threads = os.environ.setdefault("TVM_NUM_THREADS", str(physical_cores()))
    print(f"heads {args.heads}, {'bidirectional' if args.bidirectional else 'causal'}, "
          f"threads {threads}, fastest of {args.repeat}; us")
    head = "| fill | T |" + "".join(f" {name} |" for name, _, _ in sources)
    print(head + (f" {sources[1][0]} / {sources[0][0]} |" if ratio else ""))
    print("|---" * (head.count("|") - 1 + bool(ratio)) + "|")
    # the first kernel a process times runs up to 1.5x slow for all its calls (the pool's
    # threads starting): one call of it, untimed
    fastest_us(attention, heads, args.layers, 512, 1, not args.bidirectional, 3)
    for fill in (int(f) for f in args.fills.split(",")):
        for t in (int(r) for r in args.rows.split(",")):
            times = [fastest_us(module, heads, args.layers, fill, t, not args.bidirectional, args.repeat,
                                cache) for _, module, cache in sources]
            line = f"| {fill} | {t} |" + "".join(f" {x:.1f} |" for x in times)
            print(line + (f" {times[1] / times[0]:.2f} |" if ratio else ""), flush=True)


if __name__ == "__main__":
    main()
