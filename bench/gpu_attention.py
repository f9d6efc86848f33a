"""Check and time the CUDA attention kernels on a GPU, with the TVM runtime libraries only.

Needs what bench/build_gpu_attention.py wrote (attention.so; the runtime libraries in
$TRIMODE_TVM_LIB_DIR, default .carry/tvmlib), tvm_ffi and numpy; never
imports tvm. For each entry at 14B heads (32 q / 8 kv, d 128, fp16) and cache fill:
fresh random data, output poisoned with NaN, GPU result vs a float64 numpy reference on
sampled query rows (relative error < 1e-2), then the median time of 20 runs with the L2
flushed before each (one layer's KV at 4k fits in L2; a real step reads a different layer's).
Prints a table; writes attention.json into OUT_DIR.
Usage: python bench/gpu_attention.py [BUILD_DIR] [OUT_DIR]
"""
from __future__ import annotations

import ctypes
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository travels

from trimode.schedules.measure_attention import reference_rows  # noqa: E402 (numpy only)

N_HEADS, N_KV_HEADS, HEAD_DIM = 32, 8, 128
COPY_BANDWIDTH = 3000e9  # bytes/s, the H100's measured copy bandwidth (issue 7)
# (entry, T, causal); each runs at every cache fill. `_fma`: the CUDA-core kernel the tensor-core
# one replaced for blocks and prefill (bench/build_gpu_attention.py), for the ratio.
CASES = [("decode", 1, True), ("verify", 16, True), ("verify", 32, True), ("verify_fma", 32, True),
         ("draft", 32, False), ("draft_fma", 32, False), ("prefill", 2048, True), ("prefill_fma", 2048, True)]
FILLS = (4096, 32768)
# the default plans' max_splits per row class (attention_cuda.py and attention_mma.py agree;
# not imported: no compiler here)
MAX_SPLITS = {"decode": 128, "verify": 64, "draft": 64, "prefill": 16}
SAMPLED_ROWS = 6
REPEATS = 20


def load_runtime(build_dir: Path):
    import tvm_ffi  # after numpy; needs the runtime libraries loaded globally first

    libs = Path(os.environ.get("TRIMODE_TVM_LIB_DIR", Path(__file__).resolve().parent.parent / ".carry" / "tvmlib"))
    for name in ("libtvm_runtime.so", "libtvm_runtime_cuda.so"):
        ctypes.CDLL(str(libs / name), mode=ctypes.RTLD_GLOBAL)
    return tvm_ffi, tvm_ffi.load_module(str((build_dir / "attention.so").resolve()))


class Device:
    """Device tensors through the runtime's global functions."""

    def __init__(self, tvm_ffi):
        self.ffi = tvm_ffi
        self.dev = tvm_ffi.device("cuda", 0)
        self._alloc = tvm_ffi.get_global_func("runtime.TVMTensorAllocWithScope")
        self._put = tvm_ffi.get_global_func("runtime.TVMTensorCopyFromBytes")
        self._get = tvm_ffi.get_global_func("runtime.TVMTensorCopyToBytes")
        self._sync = tvm_ffi.get_global_func("runtime.Device_StreamSync")

    def upload(self, array: np.ndarray):
        array = np.ascontiguousarray(array)
        tensor = self._alloc(self.ffi.Shape(array.shape), self.ffi.dtype(str(array.dtype)),
                             self.dev, None)
        self._put(tensor, ctypes.c_void_p(array.ctypes.data), array.nbytes)
        return tensor

    def download(self, tensor, shape, dtype) -> np.ndarray:
        self.sync()
        array = np.empty(shape, dtype)
        self._get(tensor, ctypes.c_void_p(array.ctypes.data), array.nbytes)
        return array

    def sync(self):
        self._sync(self.dev, 0)  # the default stream (this tvm_ffi refuses None)


def run_case(ffi, module, device, rng, entry, n_t, causal, pos):
    ctx = pos + n_t
    half = np.float16
    q = rng.standard_normal((n_t, N_HEADS, HEAD_DIM), np.float32).astype(half)
    kv = rng.standard_normal((1, 2, N_KV_HEADS, ctx, HEAD_DIM), np.float32).astype(half)
    k_new = rng.standard_normal((n_t, N_KV_HEADS, HEAD_DIM), np.float32).astype(half)
    v_new = rng.standard_normal((n_t, N_KV_HEADS, HEAD_DIM), np.float32).astype(half)
    out = device.upload(np.full(q.shape, np.nan, half))
    # pos lives on the device; the split scratch is the caller's (max_splits * T rows bound it)
    rows_bound = MAX_SPLITS[entry.removesuffix("_fma")] * n_t
    args = [device.upload(q), device.upload(kv), 0, device.upload(np.array([pos], np.int32)),
            device.upload(k_new), device.upload(v_new), out,
            device.upload(np.zeros((rows_bound, N_HEADS, HEAD_DIM), np.float32)),
            device.upload(np.zeros((rows_bound, N_HEADS), np.float32))]
    module[entry](*args)
    got = device.download(out, q.shape, half).astype(np.float64)
    rows = sorted({0, n_t - 1, *rng.integers(0, n_t, SAMPLED_ROWS).tolist()})
    want = reference_rows(q, kv, 0, pos, k_new, v_new, rows, causal)
    unwritten = int(np.isnan(got).sum())
    rel_err = float(np.linalg.norm(got[rows] - want) / np.linalg.norm(want))

    evaluator = ffi.get_global_func("runtime.RPCTimeEvaluator")(
        module, entry, device.dev.dlpack_device_type(), 0, 1, REPEATS, 0, 0, 0, 0,
        256 << 20, "")  # number 1, REPEATS repeats, flush 256 MB of cache before each
    times = struct.unpack("@" + "d" * REPEATS, bytes(evaluator(*args)))
    seconds = float(np.median(times))
    kv_bytes = 2 * N_KV_HEADS * ctx * HEAD_DIM * 2  # K and V of this layer, read once
    return {"entry": entry, "T": n_t, "causal": causal, "pos": pos, "rel_err": rel_err,
            "unwritten": unwritten, "ok": unwritten == 0 and rel_err < 1e-2,
            "us": seconds * 1e6, "kv_GBps": kv_bytes / seconds / 1e9,
            "pct_of_copy_bw": 100 * kv_bytes / seconds / COPY_BANDWIDTH,
            "times_us": [x * 1e6 for x in times]}


def main():
    build_dir = Path(sys.argv[1] if len(sys.argv) > 1 else ".carry/attention")
    out_dir = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    ffi, module = load_runtime(build_dir)
    device = Device(ffi)
    rng = np.random.default_rng(2024)
    results = []
    for pos in FILLS:
        for entry, n_t, causal in CASES:
            try:
                results.append(run_case(ffi, module, device, rng, entry, n_t, causal, pos))
            except Exception as error:  # one broken variant must not hide the others' numbers
                results.append({"entry": entry, "T": n_t, "pos": pos, "ok": False,
                                "error": f"{type(error).__name__}: {error}"[:300]})
            print(json.dumps(results[-1]), flush=True)
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "attention.json").write_text(json.dumps(results, indent=1))
    print(f"\n{'entry':8} {'T':>5} {'pos':>6} {'ok':>3} {'rel_err':>8} {'us':>9} "
          f"{'KV GB/s':>8} {'% 3TB/s':>7}")
    for r in results:
        if "error" in r:
            print(f"{r['entry']:8} {r['T']:>5} {r['pos']:>6}  NO  {r['error'][:60]}")
            continue
        print(f"{r['entry']:8} {r['T']:>5} {r['pos']:>6} {'yes' if r['ok'] else 'NO':>3} "
              f"{r['rel_err']:8.1e} {r['us']:9.1f} {r['kv_GBps']:8.0f} "
              f"{r['pct_of_copy_bw']:7.1f}")
    sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    main()
