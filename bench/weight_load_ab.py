"""A/B of the host side of weight loading, one file, one run, alternating:

    python bench/weight_load_ab.py MODEL.gguf [--target llvm|cuda]

old: the loader before commit "stream weights" (every Q8_0 matrix unpacked in two strided
passes, q|k|v and gate|up concatenated, all held in host memory, then uploaded); new: the
engine's loader (runtime/engine.py parameter_groups: one pass per matrix straight into the
stacked parameter, row chunks on a thread pool, the next group unpacked while this one
uploads). Both start from a fresh load_model (a view of the memory map) and end with every
parameter on the device. The first pass may read the disk; later ones the page cache.
"""
import sys, time, gc
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from trimode.model.gguf_file import load_model
from trimode.model.weights import Q8Matrix
from trimode.runtime.engine import parameter_groups, quantized_parts, UNPACK_THREADS
from trimode.runtime.tvm_runtime import Device

path = sys.argv[1]
dev = Device(sys.argv[3] if len(sys.argv) > 3 and sys.argv[2] == "--target" else "llvm")

def eager_old(weights):
    # The previous loader: every matrix unpacked (two strided passes), stacks concatenated, all held, then uploaded.
    def mat(m): return (np.ascontiguousarray(m._blocks["qs"]).reshape(m.shape), np.ascontiguousarray(m._blocks["d"]))
    arrays = {}
    def put(prefix, mats):
        parts = [mat(m) for m in mats]
        arrays[prefix + ".q"] = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        arrays[prefix + ".scale"] = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    put("embed", [weights.embed])
    for i, l in enumerate(weights.layers):
        arrays[f"{i}.n1"] = np.asarray(l.attn_norm, np.float32); arrays[f"{i}.n2"] = np.asarray(l.ffn_norm, np.float32)
        put(f"{i}.qkv", [l.wq, l.wk, l.wv]); put(f"{i}.o", [l.wo]); put(f"{i}.gu", [l.w_gate, l.w_up]); put(f"{i}.d", [l.w_down])
    put("head", [weights.output])
    return [dev.upload(a) for a in arrays.values()]

def streamed_new(weights, quantized):
    out = []
    with ThreadPoolExecutor(UNPACK_THREADS) as pool, ThreadPoolExecutor(1) as ahead:
        groups = parameter_groups(weights, quantized, "float32", pool)
        pending = ahead.submit(next, groups, None)
        while (arrays := pending.result()) is not None:
            pending = ahead.submit(next, groups, None)
            out += [dev.upload(a) for a in arrays.values()]
    return out

def run(name, fn):
    model = load_model(path)  # fresh: nothing unpacked yet
    w = model.weights
    q = quantized_parts(w)
    t = time.perf_counter()
    tensors = fn(w) if name == "old" else fn(w, q)
    dt = time.perf_counter() - t
    nbytes = sum(int(np.prod(t.shape)) * np.dtype(str(t.dtype)).itemsize for t in tensors)
    del tensors, w, model; gc.collect()
    return dt, nbytes

for rep in range(2):
    for name, fn in (("old", eager_old), ("new", streamed_new)):
        dt, nbytes = run(name, fn)
        print(f"{name}: {dt:.2f} s for {nbytes/1e9:.2f} GB ({nbytes/dt/1e9:.2f} GB/s), threads {UNPACK_THREADS}", flush=True)
